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
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#include <immintrin.h>
#define FXQ_AVX512 1
#else
#define FXQ_AVX512 0
#endif

int fxq_avx512(void) { return FXQ_AVX512; }

#if FXQ_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define FXQ_BF16DOT 1
#else
#define FXQ_BF16DOT 0
#endif
/* whether fxq512_int4t_bf16_gemv exists (AVX512-BF16 dot products and VBMI byte permutes) */
int fxq512_bf16dot(void) { return FXQ_BF16DOT; }

#if FXQ_AVX512

#define INLINE static inline __attribute__((always_inline))
#define MT 4 /* rows of x per tile */
/* Bytes ahead of a weight stream that the GEMVs prefetch into L2 (i8_tile, M > 1).  The hardware prefetchers alone
 * keep too few DRAM requests in flight per core: measured int8wo 11008x4096, M=1, 2 threads,
 * interleaved medians (ms): none 2.53, 12 KB 1.90, 16 KB 1.38, 32 KB 1.33, 64 KB 1.28; 4096x11008:
 * none 2.16, 16 KB 1.48, 64 KB 1.09 (T0 hints and shorter distances were slower).  Zen 5 (same-process
 * medians, 11008x4096 M=1, fp32 x, us): weight from DRAM 64 KB 1304, 128 KB 1251, 256 KB 1254; the
 * weight partly in L3 (repeated calls) 753 / 581 / 594; 4096x4096 from DRAM 415 / 411 / 467. */
#ifndef PF_AHEAD
#define PF_AHEAD 131072
#endif

INLINE __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* call F(..., mb) with a compile-time constant mb in 1..MT */
#define DISPATCH_MB(mb, CALL) \
    switch (mb) {             \
    case 1: CALL(1); break;   \
    case 2: CALL(2); break;   \
    case 3: CALL(3); break;   \
    default: CALL(4); break;  \
    }

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
 * Sub-4-bit planes are rebuilt into nibble-pair bytes from their shards (np16 below).
 */
struct np_src {      /* where the 16 nibble-pair bytes of one k come from */
    const uint8_t *q0, *q1;  /* shard bytes at k = 0 of the group (q1 NULL: one shard) */
    __m128i c0, c1, mk0, mk1, sh1;
    int fast4;       /* the stored 4-bit bytes themselves */
};

/* the shard-independent fields of an np_src: shard widths w0 (and w1 when s1 is set) */
INLINE struct np_src np_src_init(int64_t w0, const uint8_t *s1, int64_t w1) {
    struct np_src s;
    memset(&s, 0, sizeof s);
    s.fast4 = w0 == 4 && s1 == NULL;
    s.sh1 = _mm_cvtsi32_si128((int)w0);
    s.mk0 = _mm_set1_epi8(w0 == 1 ? 0x11 : 0x33);
    s.mk1 = _mm_set1_epi8(w1 == 1 ? 0x11 : 0x33);
    return s;
}

INLINE __m128i np16(const struct np_src *s, int64_t off) {
    const __m128i v0 = _mm_loadu_si128((const __m128i *)(s->q0 + off));
    if (s->fast4) return v0;
    __m128i v = _mm_and_si128(_mm_srl_epi16(v0, s->c0), s->mk0);
    if (s->q1)
        v = _mm_or_si128(v, _mm_sll_epi16(_mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(s->q1 + off)),
                                                                       s->c1), s->mk1), s->sh1));
    return v;
}

/* prefetches the scales (and separate zeros) of 64 rows from row r of group j: they lie a stride of N
 * rows from the previous group's, beyond the hardware prefetchers (a miss at every group otherwise) */
INLINE void sz64_prefetch(const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, int64_t j,
                          int64_t r) {
    const char *sp = (const char *)(scale + j * sz_grp + r * sz_row);
    const char *zp = zero && zero != scale + 1 ? (const char *)(zero + j * sz_grp + r * sz_row) : NULL;
    for (int64_t b = 0; b < 128 * sz_row; b += 64) {
        _mm_prefetch(sp + b, _MM_HINT_T0);
        if (zp) _mm_prefetch(zp + b, _MM_HINT_T0);
    }
}

/* 16 rows' scale and (zero - mid*scale) of group j from row r; rows >= N get 0 */
INLINE void sz16(const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, int64_t j,
                 int64_t r, int64_t N, __m512 vmid, __m512 *s, __m512 *zc) {
    __m512 z = _mm512_setzero_ps();
    if (r + 16 <= N && sz_row == 2 && zero == scale + 1) {
        const __m512i v = _mm512_loadu_si512((const void *)(scale + j * sz_grp + r * 2));
        *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else if (r + 16 <= N && sz_row == 1) {
#define BF16X16(P) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(P))), 16))
        *s = BF16X16(scale + j * sz_grp + r);
        if (zero) z = BF16X16(zero + j * sz_grp + r);
#undef BF16X16
    } else {
        float sv[16], zv[16];
        for (int i = 0; i < 16; i++) {
            sv[i] = r + i < N ? fxq_bf16(scale[j * sz_grp + (r + i) * sz_row]) : 0.f;
            zv[i] = r + i < N && zero ? fxq_bf16(zero[j * sz_grp + (r + i) * sz_row]) : 0.f;
        }
        *s = _mm512_loadu_ps(sv);
        z = _mm512_loadu_ps(zv);
    }
    *zc = _mm512_fnmadd_ps(vmid, *s, z);
}

/* the codes of one nibble-pair byte vector as fp32 lanes: vpermps reads the low 4 bits of each
 * lane, so the identity table 0..15 turns a widened byte into its low nibble without a mask */
#define I4_LO(v, ident) _mm512_permutexvar_ps((v), (ident))
#define I4_HI(v, ident) _mm512_permutexvar_ps(_mm512_srli_epi32((v), 4), (ident))

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
 * fxq_row_scales with the double-quant mode vectorized: 16 block scales per step, the absmax codes
 * gathered from dq_code (the scalar loop cost a quarter of the 4-bit GEMV's time at bs 64).  The
 * nested scale changes at most once in 16 blocks when dq_block >= 16 (else the scalar helper).
 */
/* table[q] for 16 indices q in 0..255 from a 256-entry fp32 table held in 16 registers: eight
 * 32-entry two-register permutes, then a select tree on index bits 5..7.  Replaces a 16-lane
 * gather per 16 double-quant blocks: measured nf4-64+dq 11008x4096 M=1 raw kernel, interleaved
 * medians, 1324 -> 1095 us (bit-identical results). */
INLINE __m512 code256(__m512i q, const __m512 tab[16]) {
    __m512 r[8];
    for (int j = 0; j < 8; j++) r[j] = _mm512_permutex2var_ps(tab[2 * j], q, tab[2 * j + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(128));
    const __m512 a0 = _mm512_mask_blend_ps(b5, r[0], r[1]), a1 = _mm512_mask_blend_ps(b5, r[2], r[3]);
    const __m512 a2 = _mm512_mask_blend_ps(b5, r[4], r[5]), a3 = _mm512_mask_blend_ps(b5, r[6], r[7]);
    return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, a0, a1), _mm512_mask_blend_ps(b6, a2, a3));
}

INLINE void row_scales512(int64_t n, int64_t nblk, int mode, const void *sc, const float *dq_code,
                          const float *dq_scale, float dq_offset, int64_t dq_block, float *out) {
    if (mode != 2 || dq_block < 16) {
        fxq_row_scales(n, nblk, mode, sc, dq_code, dq_scale, dq_offset, dq_block, out);
        return;
    }
    const int64_t b0 = n * nblk;
    const uint8_t *q = (const uint8_t *)sc + b0;
    const __m512 off = _mm512_set1_ps(dq_offset);
    __m512 tab[16]; /* dq_code has 256 entries (native_cpu pads it) */
    for (int i = 0; i < 16; i++) tab[i] = _mm512_loadu_ps(dq_code + 16 * i);
    int64_t nested = b0 / dq_block, left = dq_block - b0 % dq_block; /* blocks left in `nested` */
    for (int64_t blk = 0; blk < nblk; blk += 16) {
        const __mmask16 mk = tail16(nblk - blk);
        const __m512 c = code256(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, q + blk)), tab);
        __m512 s = _mm512_set1_ps(dq_scale[nested]);
        if (left <= 16) { /* lanes from `left` on are in the next nested block */
            if (left < 16 && left < nblk - blk)
                s = _mm512_mask_blend_ps((__mmask16)((1u << left) - 1), _mm512_set1_ps(dq_scale[nested + 1]), s);
            nested++, left += dq_block;
        }
        left -= 16;
        _mm512_mask_storeu_ps(out + blk, mk, _mm512_fmadd_ps(c, s, off));
    }
}

/* ---------------------------------------------------------------------------------------------
 * intx grouped along axis 0 (fxquant/formats/intx.py): codes in int4 tile order as above, but
 * W[n, k] = (q - mid) s[n % R, k] + z[n % R, k] with s, z bf16 [R, K] (z NULL: 0), R = N / g.
 * With A = s * x and c[r] = sum_k (z - mid s)[r, k] x[k] (both per row of x):
 *   y[n] = sum_k q[n, k] A[n % R, k] + c[n % R].
 * A is stored transposed and widened, AT[k * W + j] = A[j % R, k] for j < W = R + BN, so the BN rows
 * of a tile starting at n0 read BN contiguous values at AT[k * W + n0 % R].  K is walked in chunks
 * whose AT slice stays in L2 while every tile passes over it; the tiles' sums wait in y.
 * ws: the caller's scratch of K * (R + BN) + R floats.
 */
/* tmpl placed at nibble-pair byte b (any b): the shard chunks b falls in, their bytes and shifts */
INLINE struct np_src np_src_at(const uint8_t *s0, int64_t w0, int64_t ch0, const uint8_t *s1, int64_t w1,
                               int64_t ch1, const struct np_src *tmpl, int64_t b) {
    struct np_src one = *tmpl;
    const int64_t a0 = one.fast4 ? 0 : b / ch0, a1 = s1 ? b / ch1 : 0;
    one.q0 = s0 + b - a0 * ch0;
    one.q1 = s1 ? s1 + b - a1 * ch1 : NULL;
    one.c0 = _mm_cvtsi32_si128((int)(w0 * a0));
    one.c1 = _mm_cvtsi32_si128((int)(w1 * a1));
    return one;
}

INLINE __m128i np16_at(const uint8_t *s0, int64_t w0, int64_t ch0, const uint8_t *s1, int64_t w1, int64_t ch1,
                       const struct np_src *tmpl, int64_t b) { /* nibble-pair bytes b .. b+15, any b */
    const struct np_src one = np_src_at(s0, w0, ch0, s1, w1, ch1, tmpl, b);
    return np16(&one, 0);
}

/* where a work item's nibble-pair bytes come from: the template placed once at the item's first
 * byte pb (fixed: every byte of the item in the same shard chunks), or placed per 16 bytes */
struct ax0_src {
    const uint8_t *s0, *s1;
    int64_t w0, ch0, w1, ch1, pb;
    struct np_src at; /* fixed: tmpl at pb */
    __m256i mk0, mk1;
    const struct np_src *tmpl;
};

INLINE struct ax0_src ax0_src_init(const uint8_t *s0, int64_t w0, int64_t ch0, const uint8_t *s1, int64_t w1,
                                   int64_t ch1, const struct np_src *tmpl, int64_t pb, const int fixed) {
    struct ax0_src r;
    memset(&r, 0, sizeof r);
    r.s0 = s0, r.s1 = s1, r.w0 = w0, r.ch0 = ch0, r.w1 = w1, r.ch1 = ch1, r.pb = pb, r.tmpl = tmpl;
    if (fixed) r.at = np_src_at(s0, w0, ch0, s1, w1, ch1, tmpl, pb);
    r.mk0 = _mm256_broadcastsi128_si256(tmpl->mk0), r.mk1 = _mm256_broadcastsi128_si256(tmpl->mk1);
    return r;
}

/* the nc * 16 nibble-pair bytes of k (chunk cc in 128-bit lane cc; lane 1 undefined when nc = 1);
 * fixed: mode 0 the stored 4-bit bytes, 1 one shard, 2 two shards */
INLINE __m256i ax0_bytes(const struct ax0_src *r, int64_t half, int64_t k, const int nc, const int fixed,
                         const int mode) {
    if (!fixed) {
        const int64_t b = r->pb + k * half;
        const __m128i lo = np16_at(r->s0, r->w0, r->ch0, r->s1, r->w1, r->ch1, r->tmpl, b);
        const __m128i hi = nc == 2 ? np16_at(r->s0, r->w0, r->ch0, r->s1, r->w1, r->ch1, r->tmpl, b + 16) : lo;
        return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    }
    const int64_t off = k * half;
#ifndef AX0_PF
#define AX0_PF 1024
#endif
    if ((k & 1) == 0) {
        _mm_prefetch((const char *)(r->at.q0 + off + AX0_PF), _MM_HINT_T0);
        if (mode == 2) _mm_prefetch((const char *)(r->at.q1 + off + AX0_PF), _MM_HINT_T0);
    }
    __m256i v;
    if (nc == 2) v = _mm256_loadu_si256((const __m256i *)(r->at.q0 + off));
    else v = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(r->at.q0 + off)));
    if (mode >= 1) v = _mm256_and_si256(_mm256_srl_epi16(v, r->at.c0), r->mk0);
    if (mode == 2) {
        __m256i u;
        if (nc == 2) u = _mm256_loadu_si256((const __m256i *)(r->at.q1 + off));
        else u = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(r->at.q1 + off)));
        v = _mm256_or_si256(v, _mm256_sll_epi16(_mm256_and_si256(_mm256_srl_epi16(u, r->at.c1), r->mk1), r->tmpl->sh1));
    }
    return v;
}

/* kn k's of one work item (nc chunks of 16 nibble-pair bytes per k, from byte pb; AT from a0 with row
 * stride W): acc[h][2cc + 0 / 1] for chunk cc's low / high nibble rows, h = k parity.  fixed: every
 * byte of the range is in the same shard chunks (shifts fixed), else each load finds its own; mode
 * (fixed only): 0 the stored 4-bit bytes, 1 one shard, 2 two shards.  All three are constants at
 * each call, so the loop has no run-time branches and the accumulators stay in registers. */
INLINE void ax0_chunk(const uint8_t *s0, int64_t w0, int64_t ch0, const uint8_t *s1, int64_t w1, int64_t ch1,
                      const struct np_src *tmpl, int64_t pb, int64_t half, int64_t kn, const float *a0, int64_t W,
                      const int nc, const int fixed, const int mode, __m512 acc[2][4]) {
    const __m512 ident = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    struct ax0_src src = ax0_src_init(s0, w0, ch0, s1, w1, ch1, tmpl, pb, fixed);
    for (int h = 0; h < 2; h++)
        for (int q = 0; q < 4; q++) acc[h][q] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < kn; k0 += 2)
        for (int h = 0; h < 2; h++) {
            const int64_t k = k0 + h;
            if (k >= kn) break;
            const float *a = a0 + k * W;
            const __m256i v = ax0_bytes(&src, half, k, nc, fixed, mode);
            const __m128i nb[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
            for (int cc = 0; cc < nc; cc++) {
                const __m512i v = _mm512_cvtepu8_epi32(nb[cc]);
                acc[h][2 * cc] = _mm512_fmadd_ps(I4_LO(v, ident), _mm512_loadu_ps(a + 16 * cc), acc[h][2 * cc]);
                acc[h][2 * cc + 1] = _mm512_fmadd_ps(I4_HI(v, ident), _mm512_loadu_ps(a + half + 16 * cc),
                                                     acc[h][2 * cc + 1]);
            }
        }
}

#if FXQ_BF16DOT
/* The int4 bf16-dot decode (i4b_tile's comment): a 64-byte load holds the 32 nibble-pair bytes of k
 * and of k+1; the indices put byte i of both halves into bytes 0 and 2 of lane i (P0: bytes 0..15,
 * P1: 16..31), and each nibble becomes the bf16 bits of 16 + q.  w[c] holds rows {0, 32, 16, 48}[c]
 * + lane of the 64 rows, (k, k+1) in each lane's two halves. */
INLINE void i4pair_idx(__m512i *idx0, __m512i *idx1) {
    uint8_t ix0[64], ix1[64];
    for (int i = 0; i < 16; i++) {
        ix0[4 * i] = (uint8_t)i, ix0[4 * i + 2] = (uint8_t)(32 + i);
        ix1[4 * i] = (uint8_t)(16 + i), ix1[4 * i + 2] = (uint8_t)(48 + i);
        ix0[4 * i + 1] = ix0[4 * i + 3] = ix1[4 * i + 1] = ix1[4 * i + 3] = 0;
    }
    *idx0 = _mm512_loadu_si512(ix0), *idx1 = _mm512_loadu_si512(ix1);
}

static const int I4PAIR_ROWS[4] = {0, 32, 16, 48}; /* w[c]'s first row in the 64-row tile */

#define I4PAIR_M78 0x00780078 /* the code's bits once shifted into the mantissa */
#define I4PAIR_C41 0x41804180 /* bf16 16.0 in both halves */
/* i4pair_words with its two constants (I4PAIR_M78, I4PAIR_C41 in every dword) passed in */
INLINE void i4pair_words_k(__m512i v, __m512i idx0, __m512i idx1, __m512i m78, __m512i c41, __m512i w[4]) {
    const __mmask64 even = 0x5555555555555555ull;
    const __m512i p0 = _mm512_maskz_permutexvar_epi8(even, idx0, v);
    const __m512i p1 = _mm512_maskz_permutexvar_epi8(even, idx1, v);
    w[0] = _mm512_ternarylogic_epi32(_mm512_slli_epi32(p0, 3), m78, c41, 0xEA);
    w[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(p0, 1), m78, c41, 0xEA);
    w[2] = _mm512_ternarylogic_epi32(_mm512_slli_epi32(p1, 3), m78, c41, 0xEA);
    w[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(p1, 1), m78, c41, 0xEA);
}

INLINE void i4pair_words(__m512i v, __m512i idx0, __m512i idx1, __m512i w[4]) {
    i4pair_words_k(v, idx0, idx1, _mm512_set1_epi32(I4PAIR_M78), _mm512_set1_epi32(I4PAIR_C41), w);
}

/* The bf16 dot-product form for 64-row tiles (BN = 64), K even: A rounded to bf16 and stored in k
 * pairs, AT2[(k / 2) * W + j] = bf16 A[j % R, k] | bf16 A[j % R, k + 1] << 16; the bytes of k and
 * k + 1 side by side in one register, then i4b_tile's decode (vpermb pairs byte i of both in one
 * lane; code q as the bf16 value 16 + q) and one vdpbf16ps per 16 rows and two k's.  The 16 (and
 * mid) come back through c[r] (fxq512_int4t_axis0_gemv).  Against the fp32 reference: A rounded to bf16
 * (2^-9 relative, as the other bf16-dot kernels round x), exact products, fp32 sums.
 * acc[h][c]: rows {0, 32, 16, 48}[c] + lane of the tile, h = parity of the pair. */
#define AX0B_PAIR(h_, k_)                                                                                     \
    do {                                                                                                      \
        __m512i w[4];                                                                                         \
        i4pair_words(_mm512_inserti64x4(_mm512_castsi256_si512(ax0_bytes(src, 32, (k_), 2, fixed, mode)),     \
                                        ax0_bytes(src, 32, (k_) + 1, 2, fixed, mode), 1), idx0, idx1, w);     \
        const uint32_t *a = a0 + ((k_) >> 1) * W;                                                             \
        for (int c = 0; c < 4; c++)                                                                           \
            acc[h_][c] = _mm512_dpbf16_ps(acc[h_][c], (__m512bh)w[c],                                         \
                                          (__m512bh)_mm512_loadu_si512((const void *)(a + I4PAIR_ROWS[c])));  \
    } while (0)
INLINE void ax0b_chunk(const struct ax0_src *src, int64_t kn, const uint32_t *a0, int64_t W, const int fixed,
                       const int mode, __m512 acc[2][4]) {
    __m512i idx0, idx1;
    i4pair_idx(&idx0, &idx1);
    for (int h = 0; h < 2; h++)
        for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_ps();
    /* two pairs per step into the two accumulator sets (constant indices: with a run-time set index
     * the accumulators lived in memory; uint3 g128 11008x4096 M=1, interleaved medians 2504 -> 2231 us) */
    for (int64_t k = 0; k < kn; k += 4) {
        AX0B_PAIR(0, k);
        if (k + 2 < kn) AX0B_PAIR(1, k + 2);
    }
}
#undef AX0B_PAIR
#endif

int fxq512_int4t_axis0_gemv(const float *x, int64_t M, int64_t K, const uint8_t *s0, int64_t w0, int64_t ch0,
                            const uint8_t *s1, int64_t w1, int64_t ch1, int64_t N, int64_t BN,
                            const uint16_t *scale, const uint16_t *zero, int64_t R, float mid, float *y,
                            int64_t ldy, float *ws, int round_x, int exact, int nthreads) {
    const int64_t T = (N + BN - 1) / BN, half = BN / 2, CH = BN / 32, P = (CH + 1) / 2, W = R + BN;
    /* Tiles t and t + PT read the same AT window ((t * BN) % R).  A work item is up to GT tiles of
     * one such group, walked together along K in chunks of KC: the window's chunk (KC x BN floats)
     * is read from L2 once and from L1 by the item's other tiles, and each tile's codes are one
     * sequential stream (GT streams per thread, which the hardware prefetchers follow; a software
     * prefetch runs AX0_PF bytes ahead).  Measured, 11008x4096 uint3 g128, M=1, 2 threads: see
     * docs/formats/intx.md. */
    const int64_t KC = 64, GT = 4;
    const struct np_src tmpl = np_src_init(w0, s1, w1);
    int64_t gcd = BN, rr = R;
    while (rr) { const int64_t t_ = gcd % rr; gcd = rr; rr = t_; }
    const int64_t PT = R / gcd; /* tiles per period of the window */
    int64_t *order = (int64_t *)fxq_malloc(sizeof(int64_t) * (size_t)(2 * T + 2));
    float *xr;
    if (!order || !(x = fxq_x_rounded(x, M * K, round_x, &xr))) {
        free(order);
        return FXQ_ENOMEM;
    }
    int64_t *item = order + T, n_items = 0; /* item i: order[item[i] .. item[i + 1]) */
    for (int64_t g = 0, i = 0; g < PT && g < T; g++) {
        int64_t in_item = 0;
        for (int64_t t = g; t < T; t += PT) {
            if (in_item == 0) item[n_items++] = i;
            order[i++] = t;
            in_item = (in_item + 1) % GT;
        }
    }
    item[n_items] = T;
    /* ws: K * W + R floats from the caller, reused across calls (a fresh multi-MB allocation
     * page-faults on every call: measured ~1 ms here for 11008x4096) */
    float *AT = ws, *cr = ws + K * W;
    uint32_t *AT2 = (uint32_t *)ws; /* the bf16 pairs (ax0b_chunk) in the same scratch: K / 2 * W */
#if FXQ_BF16DOT
    const int bdot = !exact && BN == 64 && K % 2 == 0; /* exact: A = scale * x is not rounded to bf16 */
#else
    const int bdot = 0;
#endif
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *ym = y + m * ldy;
#pragma omp parallel num_threads(nthreads)
        {
            /* AT in blocks of 16 k: each row r of s read 16 values at a time (reading a column of s
             * strides by 2K bytes, which alias in L1: measured 1 ms for 11008x4096 g128 that way) */
#pragma omp for schedule(static)
            for (int64_t kb = 0; kb < K; kb += 16) {
                const __mmask16 mk = tail16(K - kb);
                const __m512 xv = _mm512_maskz_loadu_ps(mk, xm + kb);
                const int64_t kn = K - kb < 16 ? K - kb : 16;
                float v[16];
                for (int64_t r = 0; r < R; r++) {
                    const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, scale + r * K + kb)), 16));
                    if (bdot) {
                        uint32_t u[8];
                        _mm256_storeu_si256((__m256i *)u, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sv, xv)));
                        for (int64_t i = 0; i < kn / 2; i++) AT2[(kb / 2 + i) * W + r] = u[i];
                        continue;
                    }
                    _mm512_storeu_ps(v, _mm512_mul_ps(sv, xv));
                    for (int64_t i = 0; i < kn; i++) AT[(kb + i) * W + r] = v[i];
                }
                /* the window's wrap: columns R .. W repeat 0 .. W - R (4-byte values either way) */
                uint32_t *const wrap = bdot ? AT2 + kb / 2 * W : (uint32_t *)(AT + kb * W);
                for (int64_t i = 0; i < (bdot ? kn / 2 : kn); i++) {
                    uint32_t *a = wrap + i * W;
                    for (int64_t j = R; j < W; j++) a[j] = a[j - R];
                }
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) {
                __m512 acc = _mm512_setzero_ps(), asum = acc, afsum = acc; /* bdot: sums of bf16(A), A */
                const __m512 vmid = _mm512_set1_ps(mid);
                for (int64_t k = 0; k < K; k += 16) {
                    const __mmask16 mk = tail16(K - k);
#define BF16X16M(P) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (P))), 16))
                    const __m512 sv = BF16X16M(scale + r * K + k);
                    const __m512 zv = zero ? BF16X16M(zero + r * K + k) : _mm512_setzero_ps();
#undef BF16X16M
                    const __m512 xv = _mm512_maskz_loadu_ps(mk, xm + k);
                    acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(vmid, sv, zv), xv, acc);
                    if (bdot) { /* A, and A exactly as AT2 holds it */
                        const __m512 av = _mm512_mul_ps(sv, xv);
                        afsum = _mm512_add_ps(afsum, av);
                        asum = _mm512_add_ps(asum, _mm512_castsi512_ps(_mm512_slli_epi32(
                                                       _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(av)), 16)));
                    }
                }
                /* bdot: sum_k q A = sum_k (16 + q) bf16(A) - (16 + mid) sum_k bf16(A) + mid sum_k A, so A's
                 * rounding meets q - mid (the code part of the weight), not q: uint3 g128 11008x4096 rel.
                 * error vs the reference 0.48% with q, 0.18% with q - mid (bf16 F.linear: 0.29%) */
                cr[r] = _mm512_reduce_add_ps(acc) +
                        (bdot ? mid * _mm512_reduce_add_ps(afsum) - (16.f + mid) * _mm512_reduce_add_ps(asum) : 0.f);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t ii = 0; ii < n_items; ii++)
                for (int64_t kc = 0; kc < K; kc += KC) {
                    const int64_t ke = K - kc < KC ? K : kc + KC;
                    for (int64_t it = item[ii]; it < item[ii + 1]; it++)
                        for (int64_t p = 0; p < P; p++) {
                            const int64_t t = order[it];
#if FXQ_BF16DOT
                            if (bdot) { /* P = 1: the whole 64-row tile */
                                const int64_t r0 = t * 64;
                                if (r0 >= N) continue;
                                const int64_t pb = t * K * 32 + kc * 32, pe = t * K * 32 + (ke - 1) * 32 + 31;
                                const int fixed = tmpl.fast4 || (pb / ch0 == pe / ch0 && (!s1 || pb / ch1 == pe / ch1));
                                const int mode = tmpl.fast4 ? 0 : s1 ? 2 : 1;
                                const struct ax0_src src = ax0_src_init(s0, w0, ch0, s1, w1, ch1, &tmpl, pb, fixed);
                                const uint32_t *a0 = AT2 + kc / 2 * W + (t * 64) % R;
                                __m512 acc[2][4];
#define AX0B(fixed_, mode_) ax0b_chunk(&src, ke - kc, a0, W, fixed_, mode_, acc)
                                if (!fixed) AX0B(0, 0);
                                else if (mode == 0) AX0B(1, 0);
                                else if (mode == 1) AX0B(1, 1);
                                else AX0B(1, 2);
#undef AX0B
                                for (int c = 0; c < 4; c++) {
                                    const int64_t r = r0 + I4PAIR_ROWS[c];
                                    const __mmask16 kr = r < N ? tail16(N - r) : 0;
                                    __m512 v = _mm512_add_ps(acc[0][c], acc[1][c]);
                                    if (kc) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(kr, ym + r));
                                    _mm512_mask_storeu_ps(ym + r, kr, v);
                                }
                                continue;
                            }
#endif
                            const int64_t c = 2 * p, nc = CH - c < 2 ? CH - c : 2;
                            const int64_t rlo = t * BN + 16 * c, rhi = t * BN + half + 16 * c;
                            if (rlo >= N) continue;
                            const int64_t ab = (t * BN) % R + 16 * c; /* AT column of row rlo */
                            __m512 acc[2][4];
                            const int64_t pb = t * K * half + kc * half + 16 * c;
                            const int64_t pe = t * K * half + (ke - 1) * half + 16 * c + 16 * nc - 1;
                            const int fixed = tmpl.fast4 || (pb / ch0 == pe / ch0 && (!s1 || pb / ch1 == pe / ch1));
                            const float *a0 = AT + kc * W + ab;
                            /* constant nc and shard mode per call: the accumulators stay in registers */
#define AX0(nc_, fixed_, mode_) ax0_chunk(s0, w0, ch0, s1, w1, ch1, &tmpl, pb, half, ke - kc, a0, W, nc_, fixed_, mode_, acc)
                            const int mode = tmpl.fast4 ? 0 : s1 ? 2 : 1;
                            if (!fixed) {
                                if (nc == 2) AX0(2, 0, 0); else AX0(1, 0, 0);
                            } else if (nc == 2) {
                                if (mode == 0) AX0(2, 1, 0); else if (mode == 1) AX0(2, 1, 1); else AX0(2, 1, 2);
                            } else {
                                if (mode == 0) AX0(1, 1, 0); else if (mode == 1) AX0(1, 1, 1); else AX0(1, 1, 2);
                            }
#undef AX0
                            for (int cc = 0; cc < nc; cc++) {
                                const int64_t lo = rlo + 16 * cc, hi = rhi + 16 * cc;
                                const __mmask16 klo = lo < N ? tail16(N - lo) : 0, khi = hi < N ? tail16(N - hi) : 0;
                                __m512 vlo = _mm512_add_ps(acc[0][2 * cc], acc[1][2 * cc]);
                                __m512 vhi = _mm512_add_ps(acc[0][2 * cc + 1], acc[1][2 * cc + 1]);
                                if (kc) {
                                    vlo = _mm512_add_ps(vlo, _mm512_maskz_loadu_ps(klo, ym + lo));
                                    vhi = _mm512_add_ps(vhi, _mm512_maskz_loadu_ps(khi, ym + hi));
                                }
                                _mm512_mask_storeu_ps(ym + lo, klo, vlo);
                                _mm512_mask_storeu_ps(ym + hi, khi, vhi);
                            }
                        }
                }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) ym[n] += cr[n % R];
        }
    }
    free(order);
    free(xr);
    return FXQ_OK;
}

/* the row loop of the 4-bit table GEMVs: per row of codes its block scales (sbuf: the thread's nblk
 * floats of SB, which holds nthreads * nblk), then tiles of up to MT rows of x through CALL(mb),
 * which writes out[] */
#define LUT4_ROWS(CALL, SB)                                                                             \
    _Pragma("omp parallel num_threads(nthreads)") {                                                    \
        float *sbuf = (SB) + omp_get_thread_num() * nblk;                                              \
        _Pragma("omp for schedule(guided)") for (int64_t n = 0; n < N; n++) {                          \
            row_scales512(n, nblk, mode, sc, dq_code, dq_scale, dq_offset, dq_block, sbuf);             \
            for (int64_t m0 = 0; m0 < M; m0 += MT) {                                                    \
                const int mb = M - m0 < MT ? (int)(M - m0) : MT;                                        \
                float out[MT];                                                                          \
                DISPATCH_MB(mb, CALL)                                                                   \
                for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + n] = out[i];                            \
            }                                                                                           \
        }                                                                                               \
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

/* ---------------------------------------------------------------------------------------------
 * Weight-only GEMM for large M: y [M, N] = (x [M, K] bf16 @ W.T) * rs[N], W decoded to bf16 a
 * panel of GM_NR weight rows x GM_KC columns at a time, straight into the buffer the microkernel
 * reads (the decoded weight never leaves L1/L2; dense bf16 GEMMs instead read a bf16 weight
 * twice the size of int8 codes).  Microkernel: GM_NR weight rows x 32 rows of x, 28 fp32
 * accumulators; per pair of k, two vectors of x pairs (x.T packed once per call: xt[mb][p][32])
 * and one broadcast dword (two bf16 of a weight row) per weight row, vdpbf16ps.  The broadcast
 * side reads decoded rows at a stride that is not a multiple of 4 KB (rows at 4 KB strides share
 * an L1 set).  The accumulators of all M rows of a thread's block of panels stay in a per-thread
 * buffer ct [panel][GM_NR][Mp]; stored transposed into y when the block ends.  Measured (11008x4096, M=256, 2 threads,
 * interleaved medians): 57.5 ms vs bf16 F.linear 57.4 ms (the blocked decode + dense GEMM it
 * replaces: 72-77 ms); x.T rows at the weight stride and gathers for the transposed weight were
 * slower (95 ms, 70 ms).  Then (same-process medians, M=256, ms, before / after): each panel's decode
 * moved into the microkernel calls of the panel before it (perf: the separate decode was 5-7% of the
 * microkernel time, mostly stalled on its loads), 11008x4096 61.9 / 58.0; the x.T packing and the
 * output by 16 x 16 register transposes instead of gathers, 4096x4096 24.2 / 24.6 (min 21.4 / 20.7).
 */
#define GM_NR 14
#ifndef GM_BLK
#define GM_BLK 8 /* most panels (tiles) a thread takes at once */
#endif
#ifndef GM_KC
#define GM_KC 1024
#endif
#define GM_WS (GM_KC + 32) /* bf16 row stride of the decoded panel */

/* The microkernel: NR broadcast rows x NV (1 or 2) vectors of 16 lanes, NV*NR fp32 accumulators over np
 * pairs of k; ct += (row i) x (lanes), stored at ct[i * ldct + lane].  Broadcast row i at pair p is
 * the dword bc[i * BI + p * BP], the lane vectors at vec + VP * p (+ 16 v).  Two families: int8 (the
 * decoded weight rows broadcast, x.T pairs in the lanes) and int4 tiles (x broadcast, the weight's
 * columns in the lanes). */
#define GM_UKR_BODY(NR, BI, BP, VP, NV, STEP) /* STEP: side work before pair p's products */            \
    __m512 acc[NR][NV];                                                                                         \
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++)   \
        acc[i][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(ct + i * ldct + 16 * v);                       \
    for (int64_t p = 0; p < np; p++) {                                                                          \
        STEP;                                                                                                   \
        __m512bh a[NV];                                                                                         \
        _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) a[v] = (__m512bh)_mm512_load_si512(vec + (VP) * p + 16 * v); \
        _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) {                                                 \
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)bc[i * (BI) + p * (BP)]);                       \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b, a[v]); \
        }                                                                                                       \
    }                                                                                                           \
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++)   \
        _mm512_store_ps(ct + i * ldct + 16 * v, acc[i][v]);
#define GM_UKR(NAME, NR, BI, BP, VP, NV)                                                                        \
    static void NAME##NR(const uint32_t *bc, const uint32_t *vec, int64_t np, float *ct, int64_t ldct, int first) { \
        enum { nr_ = NR }; /* what BP may name */                                                              \
        GM_UKR_BODY(NR, BI, BP, VP, NV, (void)0)                                                                \
    }
#define GM_FAMILY(NAME, BI, BP, VP, NV)                                                                         \
    GM_UKR(NAME, 1, BI, BP, VP, NV) GM_UKR(NAME, 2, BI, BP, VP, NV) GM_UKR(NAME, 3, BI, BP, VP, NV)            \
    GM_UKR(NAME, 4, BI, BP, VP, NV) GM_UKR(NAME, 5, BI, BP, VP, NV) GM_UKR(NAME, 6, BI, BP, VP, NV)            \
    GM_UKR(NAME, 7, BI, BP, VP, NV) GM_UKR(NAME, 8, BI, BP, VP, NV) GM_UKR(NAME, 9, BI, BP, VP, NV)            \
    GM_UKR(NAME, 10, BI, BP, VP, NV) GM_UKR(NAME, 11, BI, BP, VP, NV) GM_UKR(NAME, 12, BI, BP, VP, NV)         \
    GM_UKR(NAME, 13, BI, BP, VP, NV) GM_UKR(NAME, 14, BI, BP, VP, NV)                                          \
    static const gm_ukr_t NAME##S[GM_NR + 1] = {0, NAME##1, NAME##2, NAME##3, NAME##4, NAME##5, NAME##6,       \
                                                NAME##7, NAME##8, NAME##9, NAME##10, NAME##11, NAME##12,       \
                                                NAME##13, NAME##14};
typedef void (*gm_ukr_t)(const uint32_t *, const uint32_t *, int64_t, float *, int64_t, int);
/* int8: decoded weight rows broadcast (row stride GM_WS bf16), x.T pairs xt[p][32] in the lanes;
 * a last block of <= 16 rows of x is packed xt[p][16] and takes one vector */
GM_FAMILY(gm_ukr, GM_WS / 2, 1, 32, 2)
GM_FAMILY(gm_ukrh, GM_WS / 2, 1, 16, 1)
/* int4 tiles: x pairs broadcast from a block of nr rows packed [p][nr], weight pairs bp[p][64] */
GM_FAMILY(gm4_ukr, 1, nr_, 64, 2)

/* A grow-only scratch buffer of the calling thread, kept between calls (slot: one of GM_SLOTS uses), so
 * that the few-MB packed x is not a fresh malloc (often a fresh mmap) per call.  Kept: the largest size
 * asked per slot and thread (the OpenMP pool's threads persist); at most GEMM_ROWS * K * 2 bytes for x
 * (the Python wrappers call with <= 256 rows).  No time change measured on its own: the page faults
 * left per call (60-115 at 4096x4096 M=256, fp32 x) are those of the fp32 output torch allocates. */
#define GM_SLOTS 4 /* 0: packed x, 1 and 2: a worker's scratch, 3: the grouped int4 GEMM's group sums */
static void *gm_tls(int slot, size_t bytes) {
    static __thread void *buf[GM_SLOTS];
    static __thread size_t cap[GM_SLOTS];
    if (FXQ_FAULT()) return NULL; /* test builds: every request counts, cached or not */
    bytes = (bytes + 63) / 64 * 64;
    if (cap[slot] < bytes) {
        free(buf[slot]);
        buf[slot] = aligned_alloc(64, bytes);
        cap[slot] = buf[slot] ? bytes : 0;
    }
    return buf[slot];
}

/* the two per-thread scratch buffers of a GEMM's worker (slots 1, 2; slot 0 is the caller's packed x);
 * sets the shared *failed when one is missing */
INLINE void gm_scratch(size_t a_bytes, size_t b_bytes, void **a, void **b, int *failed) {
    *a = gm_tls(1, a_bytes);
    *b = gm_tls(2, b_bytes);
    if (!*a || !*b) {
#pragma omp atomic write
        *failed = 1;
    }
}

/* Transposes 16 vectors of 16 floats in place: r[j] lane i <- r[i] lane j. */
INLINE void tr16_ps(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + j], 128-bit lane L: rows 4i .. 4i + 3 at column 4L + j */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        t[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    for (int j = 0; j < 16; j++) r[j] = t[j];
}

/* The outputs of panels [n0 / GM_NR, + np) (columns n0 .. N): y[m][n0 + 14 p + i] = ct[(14 p + i) * ldct + m]
 * * rs[n0 + 14 p + i] (rs NULL: 1), y fp32 or bf16 at row stride ldc; ct holds at least M rounded up to
 * 16 columns per row.  By 16 x 16 register transposes, rows of y outer: each row gets the block's columns
 * in one run (one panel at a time, 56-byte pieces 256 rows apart, was ~3% of the GEMM at M=256). */
static void gm_store_t(const float *ct, int64_t ldct, int64_t np, int64_t n0, int64_t N, int64_t M, const float *rs,
                       void *y, int64_t ldc, int out_bf16) {
    for (int64_t m0 = 0; m0 < M; m0 += 16)
        for (int64_t pi = 0; pi < np; pi++) {
            const int64_t c0 = n0 + pi * GM_NR;
            const int nr = N - c0 < GM_NR ? (int)(N - c0) : GM_NR;
            const __mmask16 mk = tail16(nr);
            const __m512 sv = rs ? _mm512_maskz_loadu_ps(mk, rs + c0) : _mm512_set1_ps(1.f);
            const float *cp = ct + pi * GM_NR * ldct + m0;
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = i < nr ? _mm512_load_ps(cp + i * ldct) : _mm512_setzero_ps();
            tr16_ps(r);
            for (int j = 0; j < 16 && m0 + j < M; j++) {
                const __m512 v = _mm512_mul_ps(sv, r[j]);
                if (out_bf16)
                    _mm256_mask_storeu_epi16((uint16_t *)y + (m0 + j) * ldc + c0, mk, (__m256i)_mm512_cvtneps_pbh(v));
                else
                    _mm512_mask_storeu_ps((float *)y + (m0 + j) * ldc + c0, mk, v);
            }
        }
}

/* The decode of int8 codes (exact in bf16) in units of 32 codes along a panel's rows: a cursor over rows
 * of kc codes at stride K (src) written as bf16 rows at stride GM_WS (dst).  The GEMM runs it beside the
 * microkernel's dot products (the conversions issue on other pipes than vdpbf16ps: measured free when
 * interleaved), decoding the next panel while the current one is multiplied. */
struct gm_cur { const void *src; uint16_t *dst; int64_t ld, kc, col, left; }; /* ld: src's row stride, elements */

INLINE void gm_i8_unit(struct gm_cur *c) {
    const int8_t *row = (const int8_t *)c->src, *s = row + c->col;
    const int64_t rest = c->kc - c->col, ahead = c->col + 128; /* four units ahead, into the next row at its end */
    _mm_prefetch((const char *)(ahead < c->kc ? s + 128 : row + c->ld + (ahead - c->kc)), _MM_HINT_T0);
    __m128i c0, c1;
    if (rest >= 32) {
        c0 = _mm_loadu_si128((const __m128i *)s);
        c1 = _mm_loadu_si128((const __m128i *)(s + 16));
    } else {
        c0 = _mm_maskz_loadu_epi8(tail16(rest), s);
        c1 = _mm_maskz_loadu_epi8(tail16(rest > 16 ? rest - 16 : 0), s + 16);
    }
    const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c0)), f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c1));
    _mm512_store_si512(c->dst + c->col, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
    if ((c->col += 32) >= c->kc) c->col = 0, c->src = row + c->ld, c->dst += GM_WS;
    c->left--;
}
#define GM_I8_LEFT(c) ((c)->left)

/* runs n units of the cursor (at most what is left) */
INLINE void gm_i8_units(struct gm_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && c->left; u++) gm_i8_unit(c);
}

/* The same cursor over rows of bf16 values already decoded (fxq512_bf16_gemm): 32 copied per unit. */
INLINE void gm_b16_unit(struct gm_cur *c) {
    const uint16_t *row = (const uint16_t *)c->src, *s = row + c->col;
    const int64_t rest = c->kc - c->col, ahead = c->col + 128;
    _mm_prefetch((const char *)(ahead < c->kc ? s + 128 : row + c->ld + (ahead - c->kc)), _MM_HINT_T0);
    const __mmask32 mk = rest >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << rest) - 1);
    _mm512_store_si512(c->dst + c->col, _mm512_maskz_loadu_epi16(mk, s));
    if ((c->col += 32) >= c->kc) c->col = 0, c->src = row + c->ld, c->dst += GM_WS;
    c->left--;
}

INLINE void gm_b16_units(struct gm_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && c->left; u++) gm_b16_unit(c);
}

/* A GM_NR-row microkernel (GM_UKR's) that also runs `quota` units of a decode cursor (type CUR, units
 * left LEFT(cur), one unit UNIT(cur)), one every np / quota pairs of k. */
#define GM_UKR_SIDE(NAME, CUR, LEFT, UNIT, BI, BP, VP, NV)                                                      \
    static void NAME(const uint32_t *bc, const uint32_t *vec, int64_t np, float *ct, int64_t ldct, int first,    \
                     CUR *cur, int64_t quota) {                                                                  \
        if (quota > LEFT(cur)) quota = LEFT(cur);                                                               \
        const int64_t every = quota && np / quota > 0 ? np / quota : 1;                                         \
        int64_t cd = every, done = 0;                                                                           \
        GM_UKR_BODY(GM_NR, BI, BP, VP, NV, if (--cd == 0) {                                                     \
            cd = every;                                                                                         \
            if (done < quota) { UNIT(cur); done++; }                                                            \
        })                                                                                                      \
        for (; done < quota; done++) UNIT(cur);                                                                 \
    }
GM_UKR_SIDE(gm_ukr_side, struct gm_cur, GM_I8_LEFT, gm_i8_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side, struct gm_cur, GM_I8_LEFT, gm_i8_unit, GM_WS / 2, 1, 16, 1)
GM_UKR_SIDE(gm_ukr_side_b, struct gm_cur, GM_I8_LEFT, gm_b16_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side_b, struct gm_cur, GM_I8_LEFT, gm_b16_unit, GM_WS / 2, 1, 16, 1)

/* panels [b, b + n) of GM_NR weight rows; a block taken from *next: guided, shrinking to one panel at the end
 * so that on a shared machine a descheduled thread does not leave the other one waiting long */
INLINE int64_t gm_take(int64_t *next, int64_t NP, int nthreads, int64_t *n) {
    int64_t cur = __atomic_load_n(next, __ATOMIC_RELAXED), sz;
    do {
        if (cur >= NP) return NP;
        sz = (NP - cur) / (4 * nthreads);
        sz = sz < 1 ? 1 : sz > GM_BLK ? GM_BLK : sz;
    } while (!__atomic_compare_exchange_n(next, &cur, cur + sz, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *n = sz;
    return cur;
}

/* The `io` argument of the large-M GEMMs: bf16 output (else fp32), fp32 x rounded to bf16 while it is
 * packed (else bf16 x; lda counts elements of x's type).  Rounding here instead of a torch cast first
 * saves a pass over x and an allocation per call. */
#define GM_OUT_BF16 1
#define GM_X_FP32 2
#define GM_EXACT 4 /* int4 GEMM only: codes exact in bf16, group scales applied in fp32 (int4_gemm_grouped) */

/* dwords p0 .. p0 + 15 (bf16 pairs, zero past NPAIR) of row r of x */
INLINE __m512 gm_xpairs(const void *x, int io, int64_t lda, int64_t r, int64_t p0, int64_t NPAIR) {
    if (io & GM_X_FP32) {
        const float *row = (const float *)x + r * lda + 2 * p0;
        const int64_t n = 2 * (NPAIR - p0); /* floats left in the row, >= 2 */
        const __m512 lo = _mm512_maskz_loadu_ps(tail16(n), row), hi = _mm512_maskz_loadu_ps(tail16(n > 16 ? n - 16 : 0), row + 16);
        return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(tail16(NPAIR - p0), (const uint32_t *)((const uint16_t *)x + r * lda) + p0));
}

/* Block mb of x.T pairs: dst[p][wid] = dword p (bf16 k = 2p, 2p + 1) of row 32 mb + lane, wid 32, or 16 for a
 * last block of <= 16 rows; rows past M zero.  16 x 16 dword blocks transposed in registers (gathers at the
 * row stride were ~8x slower). */
static void gm_pack_xt(const void *x, int io, int64_t M, int64_t NPAIR, int64_t lda, int64_t mb, uint32_t *dst) {
    const int wid = M - 32 * mb <= 16 ? 16 : 32;
    for (int v = 0; v < wid / 16; v++) {
        const int64_t r0 = 32 * mb + 16 * v;
        for (int64_t p0 = 0; p0 < NPAIR; p0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = r0 + i < M ? gm_xpairs(x, io, lda, r0 + i, p0, NPAIR) : _mm512_setzero_ps();
            tr16_ps(r);
            for (int j = 0; j < 16 && p0 + j < NPAIR; j++)
                _mm512_store_si512(dst + wid * (p0 + j) + 16 * v, _mm512_castps_si512(r[j]));
        }
    }
}

/* int8wo, M large: y [M, N] = (x [M, K] @ q.T) * rs[N] (x as bf16), K even, x rows at stride lda, y at
 * stride ldc, types per io (GM_OUT_BF16, GM_X_FP32).  Per thread a block of panels; chunks of GM_KC columns
 * outer, the block's panels inner, so that x.T's chunk (256 rows: 512 KB) is read from L2 by every panel of
 * the block instead of all of x.T (2 MB, from L3) per panel (Zen 5, 4096x4096 M=256 same-process medians
 * 9.46 -> 9.25 ms, bit-identical); the next (panel, chunk) is decoded into the other of two buffers by the
 * microkernel calls of the current one.  Returns 0, or -1 (out of memory: nothing written).
 * gm8_gemm is the body for either weight source (wbf16, a constant: int8 codes q [N, K], or bf16 rows at
 * stride ldw, fxq512_bf16_gemm), each compiled on its own. */
INLINE int gm8_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const void *q, int64_t ldw, const int wbf16,
                    int64_t N, const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    const int out_bf16 = io & GM_OUT_BF16;
    const int64_t es = wbf16 ? 2 : 1; /* bytes per weight element */
    const int64_t MB = (M + 31) / 32, NPAIR = K / 2, NP = (N + GM_NR - 1) / GM_NR;
    uint32_t *xt = gm_tls(0, (size_t)(MB * NPAIR * 32 * 4 + 64));
    if (!xt) return FXQ_ENOMEM;
    int failed = 0;
    int64_t next = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < MB; mb++) /* x.T pairs, rows past M zero */
            gm_pack_xt(x, io, M, NPAIR, lda, mb, xt + mb * NPAIR * 32);
        uint16_t *wb;
        float *ct;
        gm_scratch(2 * GM_NR * GM_WS * 2, (size_t)(GM_BLK * GM_NR * MB * 32 * 4), (void **)&wb, (void **)&ct, &failed);
#pragma omp barrier
        if (!failed) {
            const int64_t ldct = MB * 32;
            int64_t nb = 0;
            for (int64_t b0; (b0 = gm_take(&next, NP, nthreads, &nb)) < NP;) {
                int buf = 0, ready = 0; /* ready: the chunk's panel is already in wb[buf] */
                for (int64_t k0 = 0; k0 < K; k0 += GM_KC) { /* chunks outer: x.T's chunk stays in L2 for the block */
                    const int64_t kc = K - k0 < GM_KC ? K - k0 : GM_KC;
                    for (int64_t pn = b0; pn < b0 + nb; pn++) {
                        const int64_t n0 = pn * GM_NR;
                        const int nr = N - n0 < GM_NR ? (int)(N - n0) : GM_NR;
                        uint16_t *cur_wb = wb + buf * GM_NR * GM_WS;
                        if (!ready) {
                            struct gm_cur now = {(const char *)q + (n0 * ldw + k0) * es, cur_wb, ldw, kc, 0,
                                                 nr * ((kc + 31) / 32)};
                            if (wbf16) gm_b16_units(&now, now.left);
                            else gm_i8_units(&now, now.left);
                        }
                        /* the next (panel, chunk) of this block: the next panel, or the first one's next chunk */
                        const int lastp = pn + 1 >= b0 + nb, more = !lastp || k0 + GM_KC < K;
                        const int64_t pn0 = (lastp ? b0 : pn + 1) * GM_NR, pk0 = lastp ? k0 + GM_KC : k0;
                        const int pnr = !more ? 0 : N - pn0 < GM_NR ? (int)(N - pn0) : GM_NR;
                        const int64_t pkc = !more ? 0 : K - pk0 < GM_KC ? K - pk0 : GM_KC;
                        struct gm_cur side = {(const char *)q + (pn0 * ldw + pk0) * es, wb + (buf ^ 1) * GM_NR * GM_WS,
                                              ldw, pkc, 0, pnr * ((pkc + 31) / 32)};
                        const int64_t units = side.left;
                        for (int64_t mb = 0; mb < MB; mb++) {
                            const int wid = M - 32 * mb <= 16 ? 16 : 32;
                            const uint32_t *xv = xt + mb * NPAIR * 32 + (k0 / 2) * wid;
                            float *cm = ct + (pn - b0) * GM_NR * ldct + mb * 32;
                            const int64_t quota = units * (mb + 1) / MB - units * mb / MB;
                            if (nr == GM_NR && quota && wbf16)
                                (wid == 16 ? gm_ukrh_side_b : gm_ukr_side_b)((const uint32_t *)cur_wb, xv, kc / 2, cm,
                                                                            ldct, k0 == 0, &side, quota);
                            else if (nr == GM_NR && quota)
                                (wid == 16 ? gm_ukrh_side : gm_ukr_side)((const uint32_t *)cur_wb, xv, kc / 2, cm, ldct,
                                                                        k0 == 0, &side, quota);
                            else
                                (wid == 16 ? gm_ukrhS : gm_ukrS)[nr]((const uint32_t *)cur_wb, xv, kc / 2, cm, ldct, k0 == 0);
                        }
                        if (wbf16) gm_b16_units(&side, side.left);
                        else gm_i8_units(&side, side.left);
                        ready = more;
                        buf ^= 1;
                    }
                }
                gm_store_t(ct, ldct, nb, b0 * GM_NR, N, M, rs, y, ldc, out_bf16);
            }
        }
    }
    return failed ? FXQ_ENOMEM : FXQ_OK;
}

int fxq512_int8_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const int8_t *q, int64_t N,
                          const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    return gm8_gemm(x, M, K, lda, q, K, 0, N, rs, y, ldc, io, nthreads);
}

/* The same GEMM on a weight already decoded to bf16, w [N, K] at row stride ldw (K even): y = (x @ w.T) * rs
 * (rs NULL: 1).  With bf16 x the products are exact and the sums fp32, so a weight whose values are bf16
 * numbers (float8, fpX codes) times bf16 x gives the fp32 reference's result, fp32 out (io without
 * GM_OUT_BF16): the blocked dequantize paths' fp32-exact GEMM (fxquant/ops/_dequant_gemm.py). */
int fxq512_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const uint16_t *w, int64_t ldw, int64_t N,
                     const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    return gm8_gemm(x, M, K, lda, w, ldw, 1, N, rs, y, ldc, io, nthreads);
}

/* int4 tiles (layout: fxq512_int4t_gemv), M large: y [M, N] = x @ W.T (bf16, or fp32 when !out_bf16) with
 * W = bf16((q - mid) * s + zc) per group, rounded once (the reference's fp32 dequant).  The
 * weight's natural unit is a 64-row tile whose k-th 32 bytes hold all 64 rows, so here the weight
 * is the lane side: per tile and chunk of GM4_KC columns, the decoded pairs bp[p][64] (lane c =
 * rows c of k = 2p, 2p + 1), multiplied by x pairs broadcast from blocks of 14 rows packed once per
 * call ap[block][p][rows]; the tile's accumulators ct [Mp][64] stay in a per-thread buffer.  As in
 * the int8 GEMM, each chunk is decoded inside the microkernel calls of the chunk before it (perf: the
 * separate decode was ~5% of the microkernel time, its loads of codes and of each group's scales, a
 * stride of N rows apart, stalling), and x is packed by register transposes.  Same-process medians,
 * M=256, fp32 x, ms, before / after: 11008x4096 58.1 / 57.3, 4096x4096 25.8 / 24.2 (bf16 F.linear 58.8 / 24.8). */
#ifndef GM4_KC
#define GM4_KC 1024
#endif

/* Decoded pairs (k, k + 1), k even, of a tile's 64 rows into o[64] (lane c: rows c of k, k + 1) with the
 * group's scale and offset vectors of the 64 rows, the offset for codes read as 16 + q: z - (mid + 16) s.
 * One 64-byte load holds both k's codes; i4pair_words makes each nibble the bf16 bits of 16 + q (exact)
 * in lane pairs (k, k + 1) of rows {0, 32, 16, 48}[c] + lane; as fp32 (the dword's halves moved up) they
 * take one FMA each, and are rounded to bf16 and paired again by one vcvtne2ps2bf16 and one vpermw
 * (fewer instructions than the zero-extend / int-to-float decode of 16 codes it replaced, but measured
 * no faster on its own: Zen 5, 4096x4096 M=256, 10.72 / 10.70 ms).  Its constants are passed in memory
 * (struct gm4_k in the cursor; the loop's stores keep GCC from hoisting their loads): held in registers
 * across the microkernel loop, a constant took one of the 28 accumulators' registers, spilled and
 * reloaded every pair (11.28 -> 9.90 ms without; `gcc -S`: no zmm stack access in the loop). */
struct gm4_k { __m512i idx0, idx1, ilv, m78, c41, hi16; };
INLINE void gm4_pair(const uint8_t *tile, int64_t k, const float *sc, const float *zc, const struct gm4_k *q, uint32_t *o) {
    __m512i w[4];
    i4pair_words_k(_mm512_loadu_si512((const void *)(tile + k * 32)), q->idx0, q->idx1, q->m78, q->c41, w);
    for (int c = 0; c < 4; c++) {
        const int r = I4PAIR_ROWS[c];
        const __m512 s = _mm512_load_ps(sc + r), z = _mm512_load_ps(zc + r);
        const __m512 lo = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w[c], 16)), s, z);
        const __m512 hi = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w[c], q->hi16)), s, z);
        _mm512_store_si512(o + r, _mm512_permutexvar_epi16(q->ilv, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
    }
}

/* A cursor over the pairs of one tile's chunk [k, kend) (decoded into bp from k0), holding the current
 * group's scale / offset vectors; the next group's scales are prefetched when a group starts (they lie
 * a stride of N rows apart: otherwise a miss at every group). */
struct gm4_cur {
    float sc[64], zc[64]; /* first: 64-byte aligned in an aligned struct (_Alignas(64)) */
    struct gm4_k q; /* gm4_pair's constants, read from memory: kept in registers across the microkernel
                     * loop they took one of the 28 accumulators' registers (spilled every pair) */
    const uint8_t *tile;
    const uint16_t *scale, *zero;
    int64_t N, gs, sz_row, sz_grp, rt, k, kend, k0, gend;
    uint32_t *bp;
    float mid;
};

INLINE void gm4_unit(struct gm4_cur *c) {
    if (c->k >= c->gend) {
        const int64_t j = c->k / c->gs;
        const __m512 vmid = _mm512_set1_ps(c->mid + 16.f); /* codes decode as 16 + q (gm4_pair) */
        for (int q = 0; q < 4; q++) {
            __m512 sv, zv;
            sz16(c->scale, c->zero, c->sz_row, c->sz_grp, j, c->rt + 16 * q, c->N, vmid, &sv, &zv);
            _mm512_store_ps(c->sc + 16 * q, sv);
            _mm512_store_ps(c->zc + 16 * q, zv);
        }
        sz64_prefetch(c->scale, c->zero, c->sz_row, c->sz_grp, j + 1, c->rt);
        c->gend = (j + 1) * c->gs;
    }
    _mm_prefetch((const char *)(c->tile + (c->k + 32) * 32), _MM_HINT_T0);
    gm4_pair(c->tile, c->k, c->sc, c->zc, &c->q, c->bp + ((c->k - c->k0) / 2) * 64);
    c->k += 2;
}

#define GM4_LEFT(c) (((c)->kend - (c)->k) / 2) /* pairs left */

INLINE void gm4_units(struct gm4_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && GM4_LEFT(c); u++) gm4_unit(c);
}

GM_UKR_SIDE(gm4_ukr_side, struct gm4_cur, GM4_LEFT, gm4_unit, 1, GM_NR, 64, 2) /* gm4_ukr14 with the cursor */

/* x pairs of the 14-row block mb: dst[p][mr] (mr rows of the block), by register transposes */
INLINE void gm4_pack_x(const void *x, int io, int64_t M, int64_t NPAIR, int64_t lda, int64_t mb, uint32_t *dst) {
    const int mr = M - mb * GM_NR < GM_NR ? (int)(M - mb * GM_NR) : GM_NR;
    for (int64_t p0 = 0; p0 < NPAIR; p0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < mr ? gm_xpairs(x, io, lda, mb * GM_NR + i, p0, NPAIR) : _mm512_setzero_ps();
        tr16_ps(r);
        for (int j = 0; j < 16 && p0 + j < NPAIR; j++) _mm512_mask_storeu_ps(dst + (p0 + j) * mr, tail16(mr), r[j]);
    }
}

/* ---------------------------------------------------------------------------------------------
 * The grouped (exact) int4 GEMM (io & GM_EXACT): the GEMV's numerics at large M.  The codes are decoded as
 * the bf16 integers 16 + q (exact, i4pair_words: no scale, no rounding), each segment of a chunk that lies
 * in one group g is multiplied on its own (exact products, fp32 sums) into a 14 x 32 tile, and the segment
 * enters the output in fp32: c += s_g * acc (+ (z_g - (mid + 16) s_g) * sum_g(x) once per group), as
 *   sum_k ((q - mid) s + z) x = s sum_k (16 + q) x + (z - (mid + 16) s) sum_k x
 * per group, so no weight is rounded to bf16 (the W-rounding GEMM above rounds (q - mid) s + z).  The
 * group sums of x come from the packed bf16 pairs (xs[mb][g][16], the block's rows in lanes). */
INLINE void gm4e_unit(struct gm4_cur *c) {
    _mm_prefetch((const char *)(c->tile + (c->k + 32) * 32), _MM_HINT_T0);
    __m512i w[4];
    i4pair_words_k(_mm512_loadu_si512((const void *)(c->tile + c->k * 32)), c->q.idx0, c->q.idx1, c->q.m78, c->q.c41, w);
    uint32_t *o = c->bp + ((c->k - c->k0) / 2) * 64;
    for (int i = 0; i < 4; i++) _mm512_store_si512(o + I4PAIR_ROWS[i], w[i]);
    c->k += 2;
}

INLINE void gm4e_units(struct gm4_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && GM4_LEFT(c); u++) gm4e_unit(c);
}

GM_UKR_SIDE(gm4e_ukr_side, struct gm4_cur, GM4_LEFT, gm4e_unit, 1, GM_NR, 64, 2)

/* xs[g * 16 + i] = sum of the bf16 x of row i (< mr) of a packed block a[p][mr] over group g (k in order) */
INLINE void gm4_group_sums(const uint32_t *a, int mr, int64_t NPAIR, int64_t gs, float *xs) {
    const __mmask16 mk = tail16(mr);
    const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t p = 0, left = gs / 2, g = 0; p < NPAIR; p++) {
        const __m512i v = _mm512_maskz_loadu_epi32(mk, a + p * mr);
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_and_si512(v, hi16)));
        if (--left == 0) {
            _mm512_store_ps(xs + 16 * g++, acc);
            acc = _mm512_setzero_ps();
            left = gs / 2;
        }
    }
}

/* a segment's 14 x 32 products (tmp, rows at a stride of 32) into the tile's accumulators (cm, stride 64):
 * cm = (first ? 0 : cm) + tmp * s (+ zc * xs[i] at the group's first segment) */
INLINE void gm4e_flush(float *cm, const float *tmp, int mr, const float *s, const float *zc, const float *xs,
                       int group_start, int first) {
    const __m512 s0 = _mm512_load_ps(s), s1 = _mm512_load_ps(s + 16);
    const __m512 z0 = _mm512_load_ps(zc), z1 = _mm512_load_ps(zc + 16);
    for (int i = 0; i < mr; i++) {
        __m512 c0 = first ? _mm512_setzero_ps() : _mm512_load_ps(cm + i * 64);
        __m512 c1 = first ? _mm512_setzero_ps() : _mm512_load_ps(cm + i * 64 + 16);
        c0 = _mm512_fmadd_ps(_mm512_load_ps(tmp + i * 32), s0, c0);
        c1 = _mm512_fmadd_ps(_mm512_load_ps(tmp + i * 32 + 16), s1, c1);
        if (group_start) {
            const __m512 xv = _mm512_set1_ps(xs[i]);
            c0 = _mm512_fmadd_ps(z0, xv, c0);
            c1 = _mm512_fmadd_ps(z1, xv, c1);
        }
        _mm512_store_ps(cm + i * 64, c0);
        _mm512_store_ps(cm + i * 64 + 16, c1);
    }
}

/* the tile's accumulators ct [M][64] into y (columns 64 t ..), fp32 or bf16 */
INLINE void gm4_store(const float *ct, int64_t M, int64_t N, int64_t t, void *y, int64_t ldc, int out_bf16) {
    const int64_t nc = N - 64 * t < 64 ? N - 64 * t : 64;
    for (int64_t m = 0; m < M; m++)
        for (int c = 0; c < 4; c++) {
            if (16 * c >= nc) break;
            const __m512 v = _mm512_load_ps(ct + m * 64 + 16 * c);
            const int64_t o = m * ldc + 64 * t + 16 * c;
            if (out_bf16)
                _mm256_mask_storeu_epi16((uint16_t *)y + o, tail16(nc - 16 * c), (__m256i)_mm512_cvtneps_pbh(v));
            else
                _mm512_mask_storeu_ps((float *)y + o, tail16(nc - 16 * c), v);
        }
}

static int int4_gemm_grouped(const void *x, int64_t M, int64_t K, int64_t lda, const uint8_t *w, int64_t N,
                             int64_t gs, const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp,
                             float mid, void *y, int64_t ldc, int io, int nthreads) {
    const int out_bf16 = io & GM_OUT_BF16;
    const int64_t MB = (M + GM_NR - 1) / GM_NR, NPAIR = K / 2, NT = (N + 63) / 64, G = K / gs;
    uint32_t *ap = gm_tls(0, (size_t)(MB * GM_NR * NPAIR * 4));
    float *xs = gm_tls(3, (size_t)(MB * G * 16 * 4));
    if (!ap || !xs) return FXQ_ENOMEM;
    int failed = 0;
    int64_t next = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < MB; mb++) {
            const int mr = M - mb * GM_NR < GM_NR ? (int)(M - mb * GM_NR) : GM_NR;
            gm4_pack_x(x, io, M, NPAIR, lda, mb, ap + mb * GM_NR * NPAIR);
            gm4_group_sums(ap + mb * GM_NR * NPAIR, mr, NPAIR, gs, xs + mb * G * 16);
        }
        uint32_t *bp;
        float *ct;
        gm_scratch(2 * GM4_KC / 2 * 64 * 4, (size_t)(MB * GM_NR * 64 * 4), (void **)&bp, (void **)&ct, &failed);
        _Alignas(64) struct gm4_cur cur_, *const cur = &cur_;
        _Alignas(64) float tmp[GM_NR * 32], sg[64], zg[64];
#pragma omp barrier
        if (!failed) {
            i4pair_idx(&cur->q.idx0, &cur->q.idx1);
            cur->q.m78 = _mm512_set1_epi32(I4PAIR_M78), cur->q.c41 = _mm512_set1_epi32(I4PAIR_C41);
            const __m512 vmid = _mm512_set1_ps(mid + 16.f); /* codes decode as 16 + q */
            int64_t nb = 0;
            for (int64_t b0; (b0 = gm_take(&next, NT, nthreads, &nb)) < NT;) {
                int buf = 0, ready = 0;
                for (int64_t t = b0; t < b0 + nb; t++) {
                    for (int64_t k0 = 0; k0 < K; k0 += GM4_KC) {
                        const int64_t kc = K - k0 < GM4_KC ? K - k0 : GM4_KC;
                        uint32_t *cbp = bp + buf * (GM4_KC / 2 * 64);
                        if (!ready) { /* this chunk, now */
                            cur->tile = w + t * K * 32, cur->k = cur->k0 = k0, cur->kend = k0 + kc, cur->bp = cbp;
                            gm4e_units(cur, kc / 2);
                        }
                        const int last = k0 + GM4_KC >= K, more = !last || t + 1 < b0 + nb;
                        const int64_t nt = last ? t + 1 : t, nk0 = last ? 0 : k0 + GM4_KC;
                        /* the next chunk, during this one's products */
                        cur->tile = w + nt * K * 32, cur->k = cur->k0 = nk0;
                        cur->kend = more ? nk0 + (K - nk0 < GM4_KC ? K - nk0 : GM4_KC) : nk0;
                        cur->bp = bp + (buf ^ 1) * (GM4_KC / 2 * 64);
                        const int64_t units = (cur->kend - cur->k) / 2;
                        const int64_t calls = 2 * MB * ((k0 + kc - 1) / gs - k0 / gs + 1);
                        int64_t call = 0;
                        for (int64_t ka = k0, kb; ka < k0 + kc; ka = kb) { /* segments: the chunk cut at group edges */
                            const int64_t g = ka / gs, gend = (g + 1) * gs;
                            kb = gend < k0 + kc ? gend : k0 + kc;
                            for (int q = 0; q < 4; q++) {
                                __m512 sv, zv;
                                sz16(scale, zero, sz_row, sz_grp, g, 64 * t + 16 * q, N, vmid, &sv, &zv);
                                _mm512_store_ps(sg + 16 * q, sv);
                                _mm512_store_ps(zg + 16 * q, zv);
                            }
                            if (g + 1 < G) sz64_prefetch(scale, zero, sz_row, sz_grp, g + 1, 64 * t);
                            const int gstart = ka == g * gs, first = ka == 0;
                            for (int64_t mb = 0; mb < MB; mb++) {
                                const int mr = M - mb * GM_NR < GM_NR ? (int)(M - mb * GM_NR) : GM_NR;
                                const uint32_t *a = ap + mb * GM_NR * NPAIR + (ka / 2) * mr;
                                for (int h = 0; h < 2; h++, call++) {
                                    const int64_t quota = units * (call + 1) / calls - units * call / calls;
                                    const uint32_t *bv = cbp + ((ka - k0) / 2) * 64 + 32 * h;
                                    if (mr == GM_NR && quota)
                                        gm4e_ukr_side(a, bv, (kb - ka) / 2, tmp, 32, 1, cur, quota);
                                    else
                                        gm4_ukrS[mr](a, bv, (kb - ka) / 2, tmp, 32, 1);
                                    gm4e_flush(ct + mb * GM_NR * 64 + 32 * h, tmp, mr, sg + 32 * h, zg + 32 * h,
                                               xs + (mb * G + g) * 16, gstart, first);
                                }
                            }
                        }
                        gm4e_units(cur, units);
                        ready = more;
                        buf ^= 1;
                    }
                    gm4_store(ct, M, N, t, y, ldc, out_bf16);
                }
            }
        }
    }
    return failed ? FXQ_ENOMEM : FXQ_OK;
}

/* returns 0, or -1 (out of memory: nothing written); K and gs even; x, y and lda as in
 * fxq512_int8_bf16_gemm.  Per thread a block of tiles (as in
 * fxq512_int8_bf16_gemm); the chunk after the current one in the block is decoded by its microkernel calls. */
int fxq512_int4t_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const uint8_t *w, int64_t N,
                           int64_t gs, const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp,
                           float mid, void *y, int64_t ldc, int io, int nthreads) {
    if (io & GM_EXACT)
        return int4_gemm_grouped(x, M, K, lda, w, N, gs, scale, zero, sz_row, sz_grp, mid, y, ldc, io, nthreads);
    const int out_bf16 = io & GM_OUT_BF16;
    const int64_t MB = (M + GM_NR - 1) / GM_NR, NPAIR = K / 2, NT = (N + 63) / 64;
    uint32_t *ap = gm_tls(0, (size_t)(MB * GM_NR * NPAIR * 4));
    if (!ap) return FXQ_ENOMEM;
    int failed = 0;
    int64_t next = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < MB; mb++) gm4_pack_x(x, io, M, NPAIR, lda, mb, ap + mb * GM_NR * NPAIR);
        uint32_t *bp;
        float *ct;
        gm_scratch(2 * GM4_KC / 2 * 64 * 4, (size_t)(MB * GM_NR * 64 * 4), (void **)&bp, (void **)&ct, &failed);
        _Alignas(64) struct gm4_cur cur_, *const cur = &cur_;
#pragma omp barrier
        if (!failed) {
            int16_t ilv[32];
            for (int i = 0; i < 16; i++) ilv[2 * i] = (int16_t)i, ilv[2 * i + 1] = (int16_t)(16 + i);
            cur->q.ilv = _mm512_loadu_si512(ilv);
            i4pair_idx(&cur->q.idx0, &cur->q.idx1);
            cur->q.m78 = _mm512_set1_epi32(I4PAIR_M78), cur->q.c41 = _mm512_set1_epi32(I4PAIR_C41);
            cur->q.hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
            cur->scale = scale, cur->zero = zero, cur->N = N, cur->gs = gs, cur->sz_row = sz_row, cur->sz_grp = sz_grp;
            cur->mid = mid;
            int64_t nb = 0;
            for (int64_t b0; (b0 = gm_take(&next, NT, nthreads, &nb)) < NT;) {
                int buf = 0, ready = 0;
                for (int64_t t = b0; t < b0 + nb; t++) {
                    for (int64_t k0 = 0; k0 < K; k0 += GM4_KC) {
                        const int64_t kc = K - k0 < GM4_KC ? K - k0 : GM4_KC;
                        uint32_t *cbp = bp + buf * (GM4_KC / 2 * 64);
                        if (!ready) { /* this chunk, now */
                            cur->tile = w + t * K * 32, cur->rt = 64 * t, cur->k = cur->k0 = k0, cur->kend = k0 + kc;
                            cur->gend = k0, cur->bp = cbp;
                            gm4_units(cur, kc / 2);
                        }
                        const int last = k0 + GM4_KC >= K, more = !last || t + 1 < b0 + nb;
                        const int64_t nt = last ? t + 1 : t, nk0 = last ? 0 : k0 + GM4_KC;
                        /* the next chunk, during this one's products */
                        cur->tile = w + nt * K * 32, cur->rt = 64 * nt, cur->k = cur->k0 = nk0, cur->gend = nk0;
                        cur->kend = more ? nk0 + (K - nk0 < GM4_KC ? K - nk0 : GM4_KC) : nk0;
                        cur->bp = bp + (buf ^ 1) * (GM4_KC / 2 * 64);
                        const int64_t units = (cur->kend - cur->k) / 2, calls = 2 * MB;
                        for (int64_t mb = 0; mb < MB; mb++) {
                            const int mr = M - mb * GM_NR < GM_NR ? (int)(M - mb * GM_NR) : GM_NR;
                            const uint32_t *a = ap + mb * GM_NR * NPAIR + (k0 / 2) * mr;
                            for (int h = 0; h < 2; h++) {
                                const int64_t call = 2 * mb + h, quota = units * (call + 1) / calls - units * call / calls;
                                float *cm = ct + mb * GM_NR * 64 + 32 * h;
                                if (mr == GM_NR && quota)
                                    gm4_ukr_side(a, cbp + 32 * h, kc / 2, cm, 64, k0 == 0, cur, quota);
                                else
                                    gm4_ukrS[mr](a, cbp + 32 * h, kc / 2, cm, 64, k0 == 0);
                            }
                        }
                        gm4_units(cur, units);
                        ready = more;
                        buf ^= 1;
                    }
                    gm4_store(ct, M, N, t, y, ldc, out_bf16);
                }
            }
        }
    }
    return failed ? FXQ_ENOMEM : FXQ_OK;
}

#endif /* FXQ_BF16DOT */

#endif /* FXQ_AVX512 */
