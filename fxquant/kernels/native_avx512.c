/* fxquant native CPU GEMV kernels, AVX-512 (F/BW/VL/DQ) variants of those in native_cpu.c.
 *
 * Same exported arguments, same stored layouts (documented in native_cpu.c and in
 * fxquant/formats/<format>.py), same fp32 accumulation; named fxq512_*.  What AVX-512 changes:
 * 16 lanes per op, masked loads/stores for every tail (no scalar remainders), and vpermps, which
 * looks up 16 fp32 values at once with the low 4 bits of each lane as the index, so a 4-bit code
 * decodes exactly in one instruction: the table codes (NF4/FP4/fpX) cost what integer codes cost.
 *
 * Every kernel also tiles M: up to 4 rows of x are multiplied with one decoded piece of weight
 * (the decode, not the FMA, dominates at M = 1), with more independent accumulator chains when M
 * is small (FMA latency 4, two FMA pipes).  The tile functions are always_inline and called with
 * constant tile sizes, so each size compiles to its own fully unrolled loop.
 * Compiled without AVX-512, fxq_avx512() returns 0 and the Python side uses the AVX2 kernels.
 * Every exported kernel returns a status, as the AVX2 ones (native_common.h).
 */
#include "native_avx512.h"

int fxq_avx512(void) { return FXQ_AVX512; }

/* whether fxq512_int4t_bf16_gemv exists (AVX512-BF16 dot products and VBMI byte permutes) */
int fxq512_bf16dot(void) { return FXQ_BF16DOT; }

#if FXQ_AVX512
/* ---------------------------------------------------------------------------------------------
 * int8wo: w int8 [N, K], scale bf16 [N].  Four weight rows (a missing row repeats row 0 and is
 * not stored) times mb rows of x; two chains per (row, m) when mb <= 2.
 */
INLINE __m512 i8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* the first n <= 16 of them (the rest 0) */
INLINE __m512 i8x16_tail(const int8_t *p, int64_t n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail16(n), p)));
}

INLINE void i8_tile(const float *x, int64_t K, const int8_t *const w[4], const int mb, float out[4][MT]) {
    const int ch = mb <= 2 ? 2 : 1;
    __m512 acc[4][MT][2];
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < mb; i++) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if ((k & 63) == 0) /* software prefetch into L2 far ahead (see PF_AHEAD) */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w[r] + k + PF_AHEAD), _MM_HINT_T1);
        for (int h = 0; h < 2; h++) {
            __m512 wv[4];
            for (int r = 0; r < 4; r++) wv[r] = i8x16(w[r] + k + 16 * h);
            for (int i = 0; i < mb; i++) {
                const __m512 xv = _mm512_loadu_ps(x + i * K + k + 16 * h);
                for (int r = 0; r < 4; r++) acc[r][i][h % ch] = _mm512_fmadd_ps(wv[r], xv, acc[r][i][h % ch]);
            }
        }
    }
    for (; k < K; k += 16) {
        const __mmask16 mk = tail16(K - k);
        __m512 wv[4];
        for (int r = 0; r < 4; r++)
            wv[r] = i8x16_tail(w[r] + k, K - k);
        for (int i = 0; i < mb; i++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, x + i * K + k);
            for (int r = 0; r < 4; r++) acc[r][i][0] = _mm512_fmadd_ps(wv[r], xv, acc[r][i][0]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < mb; i++) out[r][i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
}

/* M = 1: one row of w against x, the row read as one sequential stream (prefetched I8_ROW_PF ahead into
 * L2).  Rows of 4 interleaved streams (i8_tile) read DRAM slower: Zen 5, same-process medians, weight
 * from DRAM, us: 11008x4096 1306 -> 1025 (bf16 F.linear 3153), 4096x4096 496 -> 394; 8 / 16 / 32 KB
 * ahead alike, 1-4 KB slower. */
#define I8_ROW_PF 16384
INLINE float i8_row(const float *x, int64_t K, const int8_t *w) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k + I8_ROW_PF), _MM_HINT_T1);
        a0 = _mm512_fmadd_ps(i8x16(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(i8x16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(i8x16(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(i8x16(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k < K; k += 16) {
        const __mmask16 mk = tail16(K - k);
        a0 = _mm512_fmadd_ps(i8x16_tail(w + k, K - k), _mm512_maskz_loadu_ps(mk, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

int fxq512_int8_gemv(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *scale,
                     int64_t N, float *y, int64_t ldy, int round_x, int nthreads) {
    float *xr;
    if (!(x = fxq_x_rounded(x, M * K, round_x, &xr))) return FXQ_ENOMEM;
    if (M == 1) {
#pragma omp parallel for schedule(guided, 16) num_threads(nthreads)
        for (int64_t r = 0; r < N; r++) y[r] = i8_row(x, K, w + r * K) * fxq_bf16(scale[r]);
        free(xr);
        return FXQ_OK;
    }
    const int64_t nb = (N + 3) / 4;
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t blk = 0; blk < nb; blk++) {
        const int64_t r0 = blk * 4, nr = N - r0 < 4 ? N - r0 : 4;
        const int8_t *rows[4];
        for (int r = 0; r < 4; r++) rows[r] = w + (r0 + (r < nr ? r : 0)) * K;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
            float out[4][MT];
#define I8_CALL(c) i8_tile(x + m0 * K, K, rows, c, out)
            DISPATCH_MB(mb, I8_CALL)
#undef I8_CALL
            for (int r = 0; r < nr; r++)
                for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + r0 + r] = out[r][i] * fxq_bf16(scale[r0 + r]);
        }
    }
    free(xr);
    return FXQ_OK;
}

/* int8wo's large-M decoder: n int8 codes -> bf16, exactly (|q| <= 128 has 8 significant bits, so
 * its bf16 is the top half of its fp32), 64 per step; rows of W stay rows (oneDNN's bf16 GEMM reads
 * x @ block.T faster than x @ (a W.T block), measured). */
int fxq512_int8_to_bf16(const int8_t *src, int64_t n, uint16_t *dst, int nthreads) {
    const int64_t steps = (n + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < steps; t++) {
        const int64_t i0 = 64 * t, left = n - i0;
        for (int c = 0; c < 4; c++) {
            const int64_t i = i0 + 16 * c;
            if (16 * c >= left) break;
            const __mmask16 mk = tail16(left - 16 * c);
            const __m512i f = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, src + i))));
            _mm256_mask_storeu_epi16(dst + i, mk, _mm512_cvtepi32_epi16(_mm512_srli_epi32(f, 16)));
        }
    }
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * 4-bit codes in int4pack's tile order (layout: native_cpu.c, fxq_int4t_gemv).  One work item is
 * a 16-byte chunk of a tile column: 16 rows from the low nibbles, 16 from the high ones.  Per group
 * j: acc = sum_k q x (fp32, exact integer codes), then y += s * acc + (z - mid*s) * sum_k x.
 * Sub-4-bit planes are rebuilt into nibble-pair bytes from their shards (np16, native_avx512.h).
 * The axis-0 intx GEMV reading the same bytes is in native_avx512_axis0.c.
 */

/* one group, nc (1 or 2) chunks of 16 nibble-pair bytes per k (contiguous): acc[i][2c + 0 / 1]
 * (+= over k) for chunk c's low / high nibble rows, mb rows of x at xj[i*K] */
INLINE void i4_group(const struct np_src *src, int64_t half, int64_t gs, const float *xj, int64_t K, const int nc,
                     const int mb, __m512 acc[MT][4]) {
    const __m512 ident = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int ch = mb == 1 ? 2 : 1; /* M = 1: even and odd k in separate chains */
    __m512 a[MT][2][4];
    for (int i = 0; i < mb; i++)
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < 4; c++) a[i][h][c] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < gs; k0 += 2)
        for (int h = 0; h < 2; h++) { /* h a constant once unrolled: the chains stay in registers */
            const int64_t k = k0 + h;
            if (k >= gs) break;
            __m512 w[4];
            for (int c = 0; c < nc; c++) {
                const __m512i v = _mm512_cvtepu8_epi32(np16(src, k * half + 16 * c));
                w[2 * c] = I4_LO(v, ident);
                w[2 * c + 1] = I4_HI(v, ident);
            }
            for (int i = 0; i < mb; i++) {
                const __m512 xk = _mm512_set1_ps(xj[i * K + k]);
                for (int c = 0; c < 2 * nc; c++) a[i][h % ch][c] = _mm512_fmadd_ps(w[c], xk, a[i][h % ch][c]);
            }
        }
    for (int i = 0; i < mb; i++)
        for (int c = 0; c < 2 * nc; c++) acc[i][c] = _mm512_add_ps(a[i][0][c], a[i][1][c]);
}

/* nc chunks (16 nibble-pair bytes each, contiguous per k) of one tile: rows rlo + 16c (low
 * nibbles) and rhi + 16c (high nibbles), c < nc */
INLINE void i4_tile(const uint8_t *s0, int64_t w0, int64_t ch0, const uint8_t *s1, int64_t w1, int64_t ch1,
                    int64_t pb0, int64_t half, int64_t K, int64_t gs, const float *x, const float *xs,
                    const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, float mid,
                    int64_t rlo, int64_t rhi, int64_t N, const int nc, const int mb, float *y, int64_t ldy) {
    const int64_t G = K / gs;
    const __m512 vmid = _mm512_set1_ps(mid);
    __m512 yv[MT][4];
    for (int i = 0; i < mb; i++)
        for (int c = 0; c < 4; c++) yv[i][c] = _mm512_setzero_ps();
    struct np_src src = np_src_init(w0, s1, w1);
    for (int64_t j = 0; j < G; j++) {
        __m512 acc[MT][4];
        /* nibble-pair bytes of the group: first at k = 0, last at k = gs-1 */
        const int64_t pb = pb0 + j * gs * half, pe = pb + (gs - 1) * half + 16 * nc - 1;
        const int64_t i0 = src.fast4 ? 0 : pb / ch0, i1 = s1 ? pb / ch1 : 0;
        if (src.fast4 || (pe / ch0 == i0 && (!s1 || pe / ch1 == i1))) { /* shifts fixed over the group */
            src.q0 = s0 + pb - i0 * ch0;
            src.q1 = s1 ? s1 + pb - i1 * ch1 : NULL;
            src.c0 = _mm_cvtsi32_si128((int)(w0 * i0));
            src.c1 = _mm_cvtsi32_si128((int)(w1 * i1));
            i4_group(&src, half, gs, x + j * gs, K, nc, mb, acc);
        } else { /* the group crosses a shard chunk boundary (a few groups per weight): byte run by run */
            const __m512 ident = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            for (int i = 0; i < mb; i++)
                for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
            for (int64_t k = 0; k < gs; k++)
                for (int c = 0; c < nc; c++) {
                    struct np_src one = src;
                    const int64_t mk = pb + k * half + 16 * c, a0 = mk / ch0, a1 = s1 ? mk / ch1 : 0;
                    one.q0 = s0 + mk - a0 * ch0;
                    one.q1 = s1 ? s1 + mk - a1 * ch1 : NULL;
                    one.c0 = _mm_cvtsi32_si128((int)(w0 * a0));
                    one.c1 = _mm_cvtsi32_si128((int)(w1 * a1));
                    const __m512i v = _mm512_cvtepu8_epi32(np16(&one, 0));
                    const __m512 lo = I4_LO(v, ident), hi = I4_HI(v, ident);
                    for (int i = 0; i < mb; i++) {
                        const __m512 xk = _mm512_set1_ps(x[i * K + j * gs + k]);
                        acc[i][2 * c] = _mm512_fmadd_ps(lo, xk, acc[i][2 * c]);
                        acc[i][2 * c + 1] = _mm512_fmadd_ps(hi, xk, acc[i][2 * c + 1]);
                    }
                }
        }
        for (int c = 0; c < nc; c++) {
            __m512 slo, zlo, shi, zhi;
            sz16(scale, zero, sz_row, sz_grp, j, rlo + 16 * c, N, vmid, &slo, &zlo);
            sz16(scale, zero, sz_row, sz_grp, j, rhi + 16 * c, N, vmid, &shi, &zhi);
            for (int i = 0; i < mb; i++) {
                const __m512 xsum = _mm512_set1_ps(xs[i * G + j]);
                yv[i][2 * c] = _mm512_fmadd_ps(zlo, xsum, _mm512_fmadd_ps(acc[i][2 * c], slo, yv[i][2 * c]));
                yv[i][2 * c + 1] = _mm512_fmadd_ps(zhi, xsum, _mm512_fmadd_ps(acc[i][2 * c + 1], shi, yv[i][2 * c + 1]));
            }
        }
    }
    for (int c = 0; c < nc; c++) {
        const int64_t lo = rlo + 16 * c, hi = rhi + 16 * c;
        const __mmask16 klo = lo < N ? tail16(N - lo) : 0, khi = hi < N ? tail16(N - hi) : 0;
        for (int i = 0; i < mb; i++) {
            _mm512_mask_storeu_ps(y + i * ldy + lo, klo, yv[i][2 * c]);
            _mm512_mask_storeu_ps(y + i * ldy + hi, khi, yv[i][2 * c + 1]);
        }
    }
}

/* Work items: pairs of 16-byte chunks of a tile (a whole 64-row tile, whose 32 bytes per k share
 * cache lines: one thread reads each line once); a tile of 32 rows is one chunk. */
int fxq512_int4t_gemv(const float *x, int64_t M, int64_t K, const uint8_t *s0, int64_t w0, int64_t ch0,
                      const uint8_t *s1, int64_t w1, int64_t ch1, int64_t N, int64_t BN,
                      int64_t gs, const uint16_t *scale, const uint16_t *zero, int64_t sz_row,
                      int64_t sz_grp, float mid, float *y, int64_t ldy, int round_x, int nthreads) {
    const int64_t G = K / gs, T = (N + BN - 1) / BN, CH = BN / 32, half = BN / 2, P = (CH + 1) / 2;
    float *xr, *xs = (float *)fxq_malloc(sizeof(float) * (size_t)(M * G));
    if (!xs || !(x = fxq_x_rounded(x, M * K, round_x, &xr))) {
        free(xs);
        return FXQ_ENOMEM;
    }
    fxq_group_sums(x, M, G, gs, xs);
#pragma omp parallel for collapse(2) schedule(guided) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++)
        for (int64_t p = 0; p < P; p++) {
            const int64_t c = 2 * p, nc = CH - c < 2 ? CH - c : 2;
            const int64_t rlo = t * BN + c * 16, rhi = t * BN + half + c * 16;
            if (rlo >= N) continue;
            for (int64_t m0 = 0; m0 < M; m0 += MT) {
                const int mb = M - m0 < MT ? (int)(M - m0) : MT;
#define I4_ARGS(nc_, c_)                                                                                  \
    s0, w0, ch0, s1, w1, ch1, t * K * half + c * 16, half, K, gs, x + m0 * K, xs + m0 * G, scale, zero,   \
        sz_row, sz_grp, mid, rlo, rhi, N, nc_, c_, y + m0 * ldy, ldy
#define I4_CALL1(c_) i4_tile(I4_ARGS(1, c_))
#define I4_CALL2(c_) i4_tile(I4_ARGS(2, c_))
                if (nc == 2) {
                    DISPATCH_MB(mb, I4_CALL2)
                } else {
                    DISPATCH_MB(mb, I4_CALL1)
                }
#undef I4_CALL1
#undef I4_CALL2
#undef I4_ARGS
            }
        }
    free(xs);
    free(xr);
    return FXQ_OK;
}


/* ---------------------------------------------------------------------------------------------
 * 4-bit codes through a 16-entry table, two per byte (layout: native_cpu.c, fxq_lut4_gemv).
 * Per block the table is multiplied by the block's scale (t[c] = table[c] * s: the dequantized
 * value exactly as the reference computes it), then vpermps decodes 16 codes per instruction:
 * a byte widened to a lane is its own index for the low nibble, shifted right by 4 for the high.
 */
INLINE void lut4_tile(const uint8_t *row, const float *xh, const float *xl, int64_t C, int64_t bb,
                      const float *sbuf, __m512 table, const int mb, float *out) {
    const int ch = mb == 1 ? 4 : mb == 2 ? 2 : 1;
    __m512 acc[MT][4];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    for (int64_t i0 = 0, blk = 0; i0 < C; i0 += bb, blk++) {
        const __m512 t = _mm512_mul_ps(table, _mm512_set1_ps(sbuf[blk]));
        int64_t i = i0;
        for (; i + 32 <= i0 + bb; i += 32) {
            const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i)));
            const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + i + 16)));
            const __m512 h0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), t), l0 = _mm512_permutexvar_ps(v0, t);
            const __m512 h1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), t), l1 = _mm512_permutexvar_ps(v1, t);
            for (int m = 0; m < mb; m++) {
                const float *h = xh + m * C + i, *l = xl + m * C + i;
                acc[m][0] = _mm512_fmadd_ps(h0, _mm512_loadu_ps(h), acc[m][0]);
                acc[m][1 % ch] = _mm512_fmadd_ps(l0, _mm512_loadu_ps(l), acc[m][1 % ch]);
                acc[m][2 % ch] = _mm512_fmadd_ps(h1, _mm512_loadu_ps(h + 16), acc[m][2 % ch]);
                acc[m][3 % ch] = _mm512_fmadd_ps(l1, _mm512_loadu_ps(l + 16), acc[m][3 % ch]);
            }
        }
        for (; i < i0 + bb; i += 16) { /* block tail: masked (x lanes past it are 0) */
            const __mmask16 mk = tail16(i0 + bb - i);
            const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, row + i));
            const __m512 h0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t), l0 = _mm512_permutexvar_ps(v, t);
            for (int m = 0; m < mb; m++) {
                acc[m][0] = _mm512_fmadd_ps(h0, _mm512_maskz_loadu_ps(mk, xh + m * C + i), acc[m][0]);
                acc[m][1 % ch] = _mm512_fmadd_ps(l0, _mm512_maskz_loadu_ps(mk, xl + m * C + i), acc[m][1 % ch]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
}

int fxq512_lut4_gemv(const float *xh, const float *xl, int64_t M, int64_t C, const uint8_t *codes,
                     int64_t row_stride, int64_t N, const float *table, int64_t bb, int mode,
                     const void *sc, const float *dq_code, const float *dq_scale, float dq_offset,
                     int64_t dq_block, float *y, int64_t ldy, int round_x, int nthreads) {
    const int64_t nblk = C / bb;
    /* the threads' block scales (nblk floats each), then xh and xl rounded (round_x) */
    float *sb = (float *)fxq_malloc(sizeof(float) * (size_t)(nthreads * nblk + (round_x ? 2 * M * C : 0)));
    if (!sb) return FXQ_ENOMEM;
    if (round_x) {
        float *r = sb + nthreads * nblk;
        fxq_round_bf16_into(xh, M * C, r);
        fxq_round_bf16_into(xl, M * C, r + M * C);
        xh = r, xl = r + M * C;
    }
    const __m512 tv = _mm512_loadu_ps(table);
#define LUT4_CALL(c_) lut4_tile(codes + n * row_stride, xh + m0 * C, xl + m0 * C, C, bb, sbuf, tv, c_, out)
    LUT4_ROWS(LUT4_CALL, sb)
#undef LUT4_CALL
    free(sb);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * fpX, X = 3 (layout: native_cpu.c, fxq_fpx_gemv; X = 4 goes through fxq512_lut4_gemv): the code
 * of 16 columns is rebuilt in lanes from its 2-bit and 1-bit planes and looked up (vpermps) in the
 * exact fp32 table table[c] * factor * scale[n].  Columns are walked in runs of the 1-bit plane's
 * segment, over which both planes' shifts are fixed.
 */
INLINE void fpx3_tile(const uint8_t *row, const float *x, int64_t Kp, __m512 t, const int mb, float *out) {
    const int64_t c2 = Kp / 4, c1 = Kp / 8; /* bytes of the 2-bit and the 1-bit plane */
    const int ch = mb == 1 ? 2 : 1;
    __m512 acc[MT][2];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
    for (int64_t sg = 0; sg < 8; sg++) {
        const int64_t c0 = sg * c1, i2 = c0 / c2; /* columns c0.. : 2-bit shard i2, 1-bit shard sg */
        const uint8_t *p2 = row + (c0 - i2 * c2), *p1 = row + c2;
        const __m128i sh2 = _mm_cvtsi32_si128((int)(2 * i2)), sh1 = _mm_cvtsi32_si128((int)sg);
        for (int64_t j = 0; j < c1; j += 32)
            for (int h = 0; h < 2; h++) { /* h: a constant once unrolled, so acc stays in registers */
                const int64_t jj = j + 16 * h;
                if (jj >= c1) break;
                const __mmask16 mk = tail16(c1 - jj);
                const __m512i b2 = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, p2 + jj)), sh2), three);
                const __m512i b1 = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, p1 + jj)), sh1), one);
                const __m512 w = _mm512_permutexvar_ps(_mm512_or_si512(_mm512_add_epi32(b2, b2), b1), t);
                for (int i = 0; i < mb; i++)
                    acc[i][h % ch] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mk, x + i * Kp + c0 + jj), acc[i][h % ch]);
            }
    }
    for (int i = 0; i < mb; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

int fxq512_fpx_gemv(const float *x, int64_t M, int64_t Kp, const uint8_t *codes, int64_t row_bytes,
                    int64_t N, int bits, const int8_t *table, const uint16_t *scale, float factor,
                    float *y, int64_t ldy, int round_x, int nthreads) {
    if (bits != 3) return FXQ_EARG; /* the Python side routes 4-bit fpX to the table kernel */
    float *xr;
    if (!(x = fxq_x_rounded(x, M * Kp, round_x, &xr))) return FXQ_ENOMEM;
    float tf[16];
    for (int c = 0; c < 16; c++) tf[c] = (float)table[c & 7] * factor;
    const __m512 tv = _mm512_loadu_ps(tf);
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const __m512 t = _mm512_mul_ps(tv, _mm512_set1_ps(fxq_bf16(scale[n])));
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT];
#define FPX_CALL(c_) fpx3_tile(codes + n * row_bytes, x + m0 * Kp, Kp, t, c_, out)
            DISPATCH_MB(mb, FPX_CALL)
#undef FPX_CALL
            for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + n] = out[i];
        }
    }
    free(xr);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * OneBit (layout: native_cpu.c, fxq_onebit_gemv): 16 sign bits are a mask register, and
 * sum over set bits of x' is one masked add per 16 elements.
 */
INLINE void onebit_tile(const uint8_t *row, const float *xb, int64_t CB, const int mb, float *out) {
    const int ch = mb == 1 ? 4 : mb == 2 ? 2 : 1;
    const int64_t K = 8 * CB;
    __m512 acc[MT][4];
    for (int i = 0; i < mb; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= CB; c += 8) {
        uint64_t word;
        memcpy(&word, row + c, 8);
        for (int q = 0; q < 4; q++) {
            const __mmask16 mk = (__mmask16)(word >> (16 * q));
            for (int i = 0; i < mb; i++)
                acc[i][q % ch] = _mm512_mask_add_ps(acc[i][q % ch], mk, acc[i][q % ch], _mm512_loadu_ps(xb + i * K + 8 * c + 16 * q));
        }
    }
    for (; c < CB; c += 2) { /* 1 or 2 bytes: 8 or 16 lanes (x is zero-padded to 8 * CB) */
        const int64_t nb = CB - c < 2 ? 1 : 2;
        uint16_t hw = row[c];
        if (nb == 2) hw |= (uint16_t)(row[c + 1] << 8);
        const __mmask16 lanes = tail16(8 * nb);
        for (int i = 0; i < mb; i++)
            acc[i][0] = _mm512_mask_add_ps(acc[i][0], (__mmask16)hw & lanes, acc[i][0], _mm512_maskz_loadu_ps(lanes, xb + i * K + 8 * c));
    }
    for (int i = 0; i < mb; i++)
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
}

int fxq512_onebit_gemv(const float *x, int64_t M, int64_t K, const uint16_t *b, int64_t CB, const uint8_t *bits,
                       int64_t N, const uint16_t *a, float *y, int64_t ldy, int round_x, int nthreads) {
    float *xb = (float *)fxq_malloc(sizeof(float) * (size_t)(M * 8 * CB + M));
    if (!xb) return FXQ_ENOMEM;
    float *tot = xb + M * 8 * CB;
    fxq_onebit_xb(x, M, K, b, 8 * CB, round_x, xb);
    fxq_row_totals(xb, M, 8 * CB, tot);
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT];
#define ONEBIT_CALL(c_) onebit_tile(bits + n * CB, xb + m0 * 8 * CB, CB, c_, out)
            DISPATCH_MB(mb, ONEBIT_CALL)
#undef ONEBIT_CALL
            for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + n] = fxq_bf16(a[n]) * (2.f * out[i] - tot[m0 + i]);
        }
    free(xb);
    return FXQ_OK;
}


#endif /* FXQ_AVX512 */
