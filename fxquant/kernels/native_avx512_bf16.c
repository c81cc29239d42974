/* fxquant native CPU kernels, AVX512-BF16 (+ VBMI): the bf16 dot-product GEMVs and the large-M
 * weight-only GEMMs (split from native_avx512.c, whose header comment describes the family). */
#include "native_avx512.h"

#if FXQ_AVX512

#if FXQ_BF16DOT
/* ---------------------------------------------------------------------------------------------
 * int4 tile order, 64-row tiles, bf16 activations: vdpbf16ps multiplies 32 bf16 pairs per
 * instruction, twice the MACs of an fp32 FMA, and the codes become bf16 without a lookup.
 *
 * A 64-byte load holds the 32 nibble-pair bytes of k and of k+1.  vpermb puts byte i of both into
 * one 32-bit lane (bytes 0 and 2, the others zeroed): the lane's two 16-bit halves are one row at
 * k and k+1, so one dot-product lane sums exactly that row's two products.  A nibble q becomes the
 * bf16 bits of 16 + q (exponent of 16, q in the top 4 of the 7 mantissa bits: 0x4180 | q << 3),
 * with one shift and one ternary-logic op; the 16 is taken back with the group sum of x:
 *   sum_k ((q - mid) s + z) x = s sum_k (16 + q) x + (z - (mid + 16) s) sum_k x.
 * Products of bf16 values are exact in fp32, so against the fp32 reference on the same bf16 x
 * only the fp32 summation order differs.  Lanes: P0 rows 0..15 (low nibbles) / 32..47 (high),
 * P1 rows 16..31 / 48..63.  The tile 16 KB ahead is prefetched into L2 (int4wo-128 M=1 fp32 x through
 * the op, interleaved medians: 4096x4096 414 -> 386 us, 11008x4096 1518 -> 1213; 4 / 32 KB alike).
 */
#ifndef I4B_PF_AHEAD
#define I4B_PF_AHEAD 16384
#endif
INLINE void i4b_tile(const uint8_t *tile, int64_t K, int64_t gs, const uint16_t *x, const float *xs,
                     const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, float mid,
                     int64_t r0, int64_t N, const int mb, float *y, int64_t ldy) {
    const int64_t G = K / gs;
    const __m512 vmid = _mm512_set1_ps(mid + 16.f);
    __m512i idx0, idx1;
    i4pair_idx(&idx0, &idx1);
    const int ch = mb == 1 ? 2 : 1;
    __m512 yv[MT][4];
    for (int i = 0; i < mb; i++)
        for (int c = 0; c < 4; c++) yv[i][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; j++) {
        __m512 a[MT][2][4];
        for (int i = 0; i < mb; i++)
            for (int h = 0; h < 2; h++)
                for (int c = 0; c < 4; c++) a[i][h][c] = _mm512_setzero_ps();
        const uint8_t *wj = tile + j * gs * 32;
        if (j + 1 < G) sz64_prefetch(scale, zero, sz_row, sz_grp, j + 1, r0); /* next group's */
        for (int64_t p = 0; p < gs / 2; p++) {
            _mm_prefetch((const char *)(wj + p * 64 + I4B_PF_AHEAD), _MM_HINT_T1);
            __m512i w[4];
            i4pair_words(_mm512_loadu_si512((const void *)(wj + p * 64)), idx0, idx1, w);
            for (int i = 0; i < mb; i++) {
                int32_t pair;
                memcpy(&pair, x + i * K + j * gs + 2 * p, 4);
                const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
                for (int c = 0; c < 4; c++)
                    a[i][p % ch][c] = _mm512_dpbf16_ps(a[i][p % ch][c], (__m512bh)w[c], xp);
            }
        }
        for (int c = 0; c < 4; c++) {
            __m512 s, zc;
            sz16(scale, zero, sz_row, sz_grp, j, r0 + I4PAIR_ROWS[c], N, vmid, &s, &zc);
            for (int i = 0; i < mb; i++) {
                const __m512 xsum = _mm512_set1_ps(xs[i * G + j]);
                const __m512 acc = _mm512_add_ps(a[i][0][c], a[i][1][c]);
                yv[i][c] = _mm512_fmadd_ps(zc, xsum, _mm512_fmadd_ps(acc, s, yv[i][c]));
            }
        }
    }
    for (int c = 0; c < 4; c++) {
        const int64_t r = r0 + I4PAIR_ROWS[c];
        const __mmask16 kr = r < N ? tail16(N - r) : 0;
        for (int i = 0; i < mb; i++) _mm512_mask_storeu_ps(y + i * ldy + r, kr, yv[i][c]);
    }
}

/* x bf16 [M, K]; w: the 4-bit int4pack tiles of 64 rows (K/2 * 64 bytes each); gs even */
int fxq512_int4t_bf16_gemv(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t gs,
                           const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp,
                           float mid, float *y, int64_t ldy, int nthreads) {
    const int64_t G = K / gs, T = (N + 63) / 64;
    float *xs = (float *)fxq_malloc(sizeof(float) * (size_t)(M * G));
    if (!xs) return FXQ_ENOMEM;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < G; j++) {
            float s = 0.f;
            for (int64_t k = 0; k < gs; k++) s += fxq_bf16(x[m * K + j * gs + k]);
            xs[m * G + j] = s;
        }
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
#define I4B_CALL(c_) i4b_tile(w + t * K * 32, K, gs, x + m0 * K, xs + m0 * G, scale, zero, sz_row, sz_grp, \
                              mid, t * 64, N, c_, y + m0 * ldy, ldy)
            DISPATCH_MB(mb, I4B_CALL)
#undef I4B_CALL
        }
    free(xs);
    return FXQ_OK;
}
/* x [M, K] fp32 (or bf16 with x_bf16) -> y [M, N] fp32 (or bf16 with y_bf16, rounded once), the
 * conversions done here instead of two torch ops per call (a small layer at M = 1 feels each). */
int fxq512_int4t_bf16_gemv_x(const void *x, int x_bf16, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                             int64_t gs, const uint16_t *scale, const uint16_t *zero, int64_t sz_row,
                             int64_t sz_grp, float mid, void *y, int y_bf16, int64_t ldy, int nthreads) {
    uint16_t *xb = x_bf16 ? NULL : (uint16_t *)fxq_aligned64((size_t)(M * K * 2));
    float *yf = y_bf16 ? (float *)fxq_malloc(sizeof(float) * (size_t)(M * N)) : (float *)y;
    if ((!x_bf16 && !xb) || !yf) {
        free(xb);
        if (y_bf16) free(yf);
        return FXQ_ENOMEM;
    }
    if (!x_bf16)
        for (int64_t i = 0; i < M * K; i += 16) {
            const __mmask16 mk = tail16(M * K - i);
            _mm256_mask_storeu_epi16(xb + i, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, (const float *)x + i)));
        }
    const int st = fxq512_int4t_bf16_gemv(x_bf16 ? (const uint16_t *)x : xb, M, K, w, N, gs, scale, zero, sz_row,
                                          sz_grp, mid, yf, y_bf16 ? N : ldy, nthreads);
    if (y_bf16 && st == FXQ_OK)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n += 16) {
                const __mmask16 mk = tail16(N - n);
                _mm256_mask_storeu_epi16((uint16_t *)y + m * ldy + n, mk,
                                         (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, yf + m * N + n)));
            }
    free(xb);
    if (y_bf16) free(yf);
    return st;
}
/* 4-bit table codes (layout as fxq512_lut4_gemv), bf16 activations: vdpbf16ps on the table in
 * bf16.  32 bytes widen to 32 words; vpermw looks up 32 bf16 values per instruction with the low 5
 * bits of each word as index, so with the 16-entry table stored twice the word itself indexes its
 * low nibble and the word >> 4 its high one.  Word p of the high-nibble values meets xh[p] (= x at
 * k = 2p), of the low ones xl[p], in natural order.  The block scale multiplies the block's
 * partial sums (fp32), not the table.  Against the reference on the same bf16 x: the table
 * rounded to bf16 (exact for every fpX table, <= 2^-9 relative for bitsandbytes' NF4 and FP4 values), exact
 * products, fp32 sums. */
/* the partial sums of one block whose bb bytes are a multiple of 32: high- and low-nibble products
 * in separate chains (ph, pl), unmasked loads */
INLINE void lut4b_block(const uint8_t *p, const uint16_t *xh, const uint16_t *xl, int64_t C, int64_t bb,
                        __m512i t32, const int mb, __m512 ph[MT], __m512 pl[MT]) {
    for (int m = 0; m < mb; m++) ph[m] = pl[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < bb; i += 32) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + i)));
        const __m512bh h = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t32);
        const __m512bh l = (__m512bh)_mm512_permutexvar_epi16(b, t32);
        for (int m = 0; m < mb; m++) {
            ph[m] = _mm512_dpbf16_ps(ph[m], h, (__m512bh)_mm512_loadu_si512((const void *)(xh + m * C + i)));
            pl[m] = _mm512_dpbf16_ps(pl[m], l, (__m512bh)_mm512_loadu_si512((const void *)(xl + m * C + i)));
        }
    }
}

/* lut4b_tile for bb % 32 == 0: two blocks per step into four accumulator chains per row of x
 * (each chain one FMA per two blocks: the FMA latency no longer bounds a block) */
INLINE void lut4b_tile32(const uint8_t *row, const uint16_t *xh, const uint16_t *xl, int64_t C, int64_t bb,
                         const float *sbuf, __m512i t32, const int mb, float *out) {
    __m512 acc[MT][4];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    const int64_t nblk = C / bb;
    int64_t blk = 0;
    for (; blk + 2 <= nblk; blk += 2) {
        __m512 ph0[MT], pl0[MT], ph1[MT], pl1[MT];
        lut4b_block(row + blk * bb, xh + blk * bb, xl + blk * bb, C, bb, t32, mb, ph0, pl0);
        lut4b_block(row + (blk + 1) * bb, xh + (blk + 1) * bb, xl + (blk + 1) * bb, C, bb, t32, mb, ph1, pl1);
        const __m512 s0 = _mm512_set1_ps(sbuf[blk]), s1 = _mm512_set1_ps(sbuf[blk + 1]);
        for (int m = 0; m < mb; m++) {
            acc[m][0] = _mm512_fmadd_ps(ph0[m], s0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(pl0[m], s0, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(ph1[m], s1, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(pl1[m], s1, acc[m][3]);
        }
    }
    if (blk < nblk) {
        __m512 ph0[MT], pl0[MT];
        lut4b_block(row + blk * bb, xh + blk * bb, xl + blk * bb, C, bb, t32, mb, ph0, pl0);
        const __m512 s0 = _mm512_set1_ps(sbuf[blk]);
        for (int m = 0; m < mb; m++) {
            acc[m][0] = _mm512_fmadd_ps(ph0[m], s0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(pl0[m], s0, acc[m][1]);
        }
    }
    for (int m = 0; m < mb; m++)
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                    _mm512_add_ps(acc[m][2], acc[m][3])));
}

INLINE void lut4b_tile(const uint8_t *row, const uint16_t *xh, const uint16_t *xl, int64_t C, int64_t bb,
                       const float *sbuf, __m512i t32, const int mb, float *out) {
    if (bb % 32 == 0) {
        lut4b_tile32(row, xh, xl, C, bb, sbuf, t32, mb, out);
        return;
    }
    __m512 acc[MT][2];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t i0 = 0, blk = 0; i0 < C; i0 += bb, blk++) {
        __m512 part[MT];
        for (int i = 0; i < mb; i++) part[i] = _mm512_setzero_ps();
        for (int64_t i = i0; i < i0 + bb; i += 32) {
            const int64_t left = i0 + bb - i;
            const __mmask32 mk = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
            const __m512i b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mk, row + i));
            const __m512bh h = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t32);
            const __m512bh l = (__m512bh)_mm512_permutexvar_epi16(b, t32);
            for (int m = 0; m < mb; m++) {
                part[m] = _mm512_dpbf16_ps(part[m], h, (__m512bh)_mm512_maskz_loadu_epi16(mk, xh + m * C + i));
                part[m] = _mm512_dpbf16_ps(part[m], l, (__m512bh)_mm512_maskz_loadu_epi16(mk, xl + m * C + i));
            }
        }
        const __m512 sv = _mm512_set1_ps(sbuf[blk]);
        for (int m = 0; m < mb; m++) acc[m][blk & 1] = _mm512_fmadd_ps(part[m], sv, acc[m][blk & 1]);
    }
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

int fxq512_lut4_bf16_gemv(const uint16_t *xh, const uint16_t *xl, int64_t M, int64_t C, const uint8_t *codes,
                          int64_t row_stride, int64_t N, const float *table, int64_t bb, int mode,
                          const void *sc, const float *dq_code, const float *dq_scale, float dq_offset,
                          int64_t dq_block, float *y, int64_t ldy, int nthreads) {
    const int64_t nblk = C / bb;
    float *sb = (float *)fxq_malloc(sizeof(float) * (size_t)(nthreads * nblk));
    if (!sb) return FXQ_ENOMEM;
    const __m256i t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(table));
    const __m512i t32 = _mm512_inserti64x4(_mm512_castsi256_si512(t16), t16, 1);
#define LUT4B_CALL(c_) lut4b_tile(codes + n * row_stride, xh + m0 * C, xl + m0 * C, C, bb, sbuf, t32, c_, out)
    LUT4_ROWS(LUT4B_CALL, sb)
#undef LUT4B_CALL
    free(sb);
    return FXQ_OK;
}
/* 4-bit table codes, rows of whole 64-byte chunks (C % 64 == 0) and blocks of 32 bytes or a multiple
 * of 64: one 64-byte load per 128 codes, no widening.  The load read as 32 words: word j holds
 * bytes 2j (low) and 2j+1 (high), and vpermw indexes with a word's low 5 bits (the table stored
 * twice, so bit 4 never matters), so the word shifted by 0 / 4 / 8 / 12 looks up the codes of k =
 * 4j+1 / 4j / 4j+3 / 4j+2 of the chunk.  x comes in that order (lut4q_x), so four lookups meet four
 * contiguous 32-value runs of x.  fp32 lanes 0-7 hold bytes 0-31 of the chunk, lanes 8-15 bytes
 * 32-63: with 32-byte blocks the scale vector carries the two blocks' scales in its halves.
 * Measured (11008x4096, nf4-64, M=1, 2 threads, interleaved medians): 1365 -> 1049 us against the
 * split-halves kernel below, a plain 2-thread read of the same bytes 932 us.  The codes 16 KB ahead
 * are prefetched into L2: through the op, interleaved medians 1265 -> 760 us (8 KB 744, 32 KB 759;
 * NTA hints 886-923), nf4-64+dq 1207 -> 966 us. */
#define LUT4Q_PF_AHEAD 16384
INLINE void lut4q_tile(const uint8_t *row, const uint16_t *x4, int64_t C, int64_t bb, const float *sbuf,
                       __m512i t32, const int mb, float *out) {
    __m512 acc[MT][2];
    for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t c = 0; c < C; c += 64) {
        _mm_prefetch((const char *)(row + c + LUT4Q_PF_AHEAD), _MM_HINT_T1);
        const __m512i b = _mm512_loadu_si512((const void *)(row + c));
        const __m512bh v0 = (__m512bh)_mm512_permutexvar_epi16(b, t32);
        const __m512bh v1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t32);
        const __m512bh v2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 8), t32);
        const __m512bh v3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 12), t32);
        const __m512 s = bb == 32 ? _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(
                                        _mm_load_sd((const double *)(sbuf + c / 32)))))
                                  : _mm512_set1_ps(sbuf[c / bb]);
        for (int m = 0; m < mb; m++) {
            const uint16_t *xp = x4 + m * 2 * C + 2 * c;
            __m512 t0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), v0, (__m512bh)_mm512_load_si512((const void *)xp));
            __m512 t1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), v2, (__m512bh)_mm512_load_si512((const void *)(xp + 64)));
            t0 = _mm512_dpbf16_ps(t0, v1, (__m512bh)_mm512_load_si512((const void *)(xp + 32)));
            t1 = _mm512_dpbf16_ps(t1, v3, (__m512bh)_mm512_load_si512((const void *)(xp + 96)));
            acc[m][0] = _mm512_fmadd_ps(t0, s, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(t1, s, acc[m][1]);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

/* x [M, K] (K % 128 == 0; fp32, or bf16 with x_bf16) rounded to bf16 into lut4q_tile's order: per 128
 * values, the runs k = 4j+1, 4j, 4j+3, 4j+2 (j < 32) */
static void lut4q_x(const void *x, int x_bf16, int64_t M, int64_t K, uint16_t *x4) {
    int16_t ix[4][32];
    static const int off[4] = {1, 0, 3, 2};
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 32; j++) ix[r][j] = (int16_t)(4 * (j % 16) + off[r]); /* 0..63 of a register pair */
    __m512i idx[4];
    for (int r = 0; r < 4; r++) idx[r] = _mm512_loadu_si512(ix[r]);
    for (int64_t i = 0; i < M * K; i += 128) {
        __m512i v[4];
        for (int q = 0; q < 4; q++) {
            if (x_bf16)
                v[q] = _mm512_loadu_si512((const void *)((const uint16_t *)x + i + 32 * q));
            else {
                const float *xf = (const float *)x + i + 32 * q;
                v[q] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xf + 16), _mm512_loadu_ps(xf));
            }
        }
        for (int r = 0; r < 4; r++)
            _mm512_store_si512((void *)(x4 + i + 32 * r),
                               _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_permutex2var_epi16(v[0], idx[r], v[1]),
                                                       _mm512_permutex2var_epi16(v[2], idx[r], v[3])));
    }
}

static int lut4q_gemv_x(const void *x, int x_bf16, int64_t M, int64_t C, const uint8_t *codes, int64_t row_stride,
                        int64_t N, const float *table, int64_t bb, int mode, const void *sc, const float *dq_code,
                        const float *dq_scale, float dq_offset, int64_t dq_block, float *y, int64_t ldy,
                        int nthreads) {
    const int64_t K = 2 * C, nblk = C / bb;
    uint16_t *x4 = (uint16_t *)fxq_aligned64(sizeof(uint16_t) * (size_t)(M * K));
    float *sb = (float *)fxq_malloc(sizeof(float) * (size_t)(nthreads * nblk));
    if (!x4 || !sb) {
        free(x4);
        free(sb);
        return FXQ_ENOMEM;
    }
    lut4q_x(x, x_bf16, M, K, x4);
    const __m256i t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(table));
    const __m512i t32 = _mm512_inserti64x4(_mm512_castsi256_si512(t16), t16, 1);
#define LUT4Q_CALL(c_) lut4q_tile(codes + n * row_stride, x4 + m0 * K, C, bb, sbuf, t32, c_, out)
    LUT4_ROWS(LUT4Q_CALL, sb)
#undef LUT4Q_CALL
    free(x4);
    free(sb);
    return FXQ_OK;
}

/* The same with x [M, 2C] (fp32, or bf16 with x_bf16) as the op receives it: rows of whole 64-byte
 * chunks with 32-byte or 64-byte-multiple blocks take lut4q_gemv_x; otherwise x is split into the
 * high- and low-nibble halves (even / odd k) and rounded to bf16 here, one pass, instead of two
 * strided torch conversions per call (~40 us of a ~1 ms GEMV at 11008x4096). */
int fxq512_lut4_bf16_gemv_x(const void *x, int x_bf16, int64_t M, int64_t C, const uint8_t *codes,
                            int64_t row_stride, int64_t N, const float *table, int64_t bb, int mode,
                            const void *sc, const float *dq_code, const float *dq_scale, float dq_offset,
                            int64_t dq_block, float *y, int64_t ldy, int nthreads) {
    if (C > 0 && C % 64 == 0 && (bb == 32 || bb % 64 == 0))
        return lut4q_gemv_x(x, x_bf16, M, C, codes, row_stride, N, table, bb, mode, sc, dq_code, dq_scale,
                            dq_offset, dq_block, y, ldy, nthreads);
    /* 64-byte aligned halves: every row of codes reloads all of x (unaligned: a split line per load) */
    const int64_t half = (M * C + 31) / 32 * 32;
    uint16_t *xh = (uint16_t *)fxq_aligned64(sizeof(uint16_t) * (size_t)(2 * half));
    if (!xh) return FXQ_ENOMEM;
    uint16_t *xl = xh + half;
    int16_t ev[32];
    for (int i = 0; i < 16; i++) ev[i] = (int16_t)(2 * i), ev[16 + i] = (int16_t)(2 * i + 1);
    const __m512i perm = _mm512_loadu_si512(ev);
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < C; j += 16) { /* 32 values of x -> 16 even (xh) + 16 odd (xl) */
            const __mmask16 mk = tail16(C - j);
            const __mmask32 m32 = (__mmask32)(C - j >= 16 ? 0xFFFFFFFFu : ((1u << (2 * (C - j))) - 1));
            __m512i v;
            if (x_bf16) {
                v = _mm512_maskz_loadu_epi16(m32, (const uint16_t *)x + m * 2 * C + 2 * j);
            } else {
                const float *xf = (const float *)x + m * 2 * C + 2 * j;
                const __mmask16 a = (__mmask16)m32, b = (__mmask16)(m32 >> 16);
                v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(b, xf + 16), _mm512_maskz_loadu_ps(a, xf));
            }
            v = _mm512_permutexvar_epi16(perm, v);
            _mm256_mask_storeu_epi16(xh + m * C + j, mk, _mm512_castsi512_si256(v));
            _mm256_mask_storeu_epi16(xl + m * C + j, mk, _mm512_extracti64x4_epi64(v, 1));
        }
    const int st = fxq512_lut4_bf16_gemv(xh, xl, M, C, codes, row_stride, N, table, bb, mode, sc, dq_code, dq_scale,
                                         dq_offset, dq_block, y, ldy, nthreads);
    free(xh);
    return st;
}
/* fpX, X = 3 (layout: fxq512_fpx_gemv), bf16 activations: 32 codes per step.  The 3-bit index
 * 2 * (2-bit plane bits) + (1-bit plane bit) is built on bytes (the epi16 shifts move a neighbour
 * byte's bits only into bits the masks clear), widened to words and looked up with vpermw in the
 * 8-entry table (stored four times) in bf16, exact: every fp3 value is a small integer times a
 * power of two.  The row's scale multiplies the row's sum; products of bf16 values are exact in
 * fp32, so only the fp32 summation order differs from the reference on the same bf16 x. */
INLINE void fpx3b_tile(const uint8_t *row, const uint16_t *x, int64_t Kp, __m512i t32, const int mb,
                       float *out) {
    const int64_t c2 = Kp / 4, c1 = Kp / 8;
    __m512 acc[MT][2];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    for (int64_t sg = 0; sg < 8; sg++) {
        const int64_t c0 = sg * c1, i2 = c0 / c2;
        const uint8_t *p2 = row + (c0 - i2 * c2), *p1 = row + c2;
        const __m128i sh2 = _mm_cvtsi32_si128((int)(2 * i2)), sh1 = _mm_cvtsi32_si128((int)sg);
        for (int64_t j = 0; j < c1; j += 64)
            for (int h = 0; h < 2; h++) {
                const int64_t jj = j + 32 * h;
                if (jj >= c1) break;
                const int64_t left = c1 - jj;
                const __mmask32 mk = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
                const __m256i b2 = _mm256_and_si256(_mm256_srl_epi16(_mm256_maskz_loadu_epi8(mk, p2 + jj), sh2), three);
                const __m256i b1 = _mm256_and_si256(_mm256_srl_epi16(_mm256_maskz_loadu_epi8(mk, p1 + jj), sh1), one);
                const __m512i idx = _mm512_cvtepu8_epi16(_mm256_or_si256(_mm256_add_epi8(b2, b2), b1));
                const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, t32);
                for (int i = 0; i < mb; i++)
                    acc[i][h] = _mm512_dpbf16_ps(acc[i][h], w,
                                                 (__m512bh)_mm512_maskz_loadu_epi16(mk, x + i * Kp + c0 + jj));
            }
    }
    for (int i = 0; i < mb; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

/* arguments as fxq512_fpx_gemv with x bf16 [M, Kp] */
int fxq512_fpx3_bf16_gemv(const uint16_t *x, int64_t M, int64_t Kp, const uint8_t *codes, int64_t row_bytes,
                          int64_t N, int bits, const int8_t *table, const uint16_t *scale, float factor,
                          float *y, int64_t ldy, int nthreads) {
    if (bits != 3) return FXQ_EARG;
    float tf[16];
    for (int c = 0; c < 16; c++) tf[c] = (float)table[c & 7] * factor;
    const __m256i t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(tf));
    const __m512i t32 = _mm512_inserti64x4(_mm512_castsi256_si512(t16), t16, 1);
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const float s = fxq_bf16(scale[n]);
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT];
#define FPX3B_CALL(c_) fpx3b_tile(codes + n * row_bytes, x + m0 * Kp, Kp, t32, c_, out)
            DISPATCH_MB(mb, FPX3B_CALL)
#undef FPX3B_CALL
            for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + n] = out[i] * s;
        }
    }
    return FXQ_OK;
}

#endif /* FXQ_BF16DOT */

#endif /* FXQ_AVX512 */
