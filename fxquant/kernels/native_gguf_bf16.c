/* GGUF GEMV with AVX512-BF16 dot products (fxq512_gguf_bf16_gemv); empty unless the compiler targets
 * AVX-512 with BF16 and VBMI. */
#include "native_gguf.h"

#if FXQ_BF16DOT
/* ---- bf16 dot products (AVX512-BF16), for x whose values are bf16 numbers ----------------------------
 * Every value of a (sub-)block is A * c + B with an integer code c (|c| <= 32, exact in bf16) and fp32
 * A, B per (sub-)block (q4_0: A = d, c = q - 8; q4_1 / q5_1: A = d, B = m; q4_k / q5_k: A = d * sc,
 * B = -dmin * mn; q6_k: A = d * sc, c = q - 32).  The codes become bf16 words by a table lookup
 * (vpermw / vpermi2w: exact), vdpbf16ps sums their products with x (exact products of bf16 values,
 * fp32 sums) and the block's A scales that sum, the B terms coming from the sums of x over each block
 * (computed once per call): sum_i w_i x_i = A * sum_i c_i x_i + B * sum_i x_i.  The products are the
 * reference's; the fp32 roundings are those of a reordered sum (as the int4 kernels' s * sum(q x) +
 * (z - mid s) * sum(x)).  q8_0, q2_k and q3_k keep the fp32 kernel (FXQ_EARG here). */
typedef struct {
    const uint16_t *x; /* bf16 [M, K] */
    const float *xs;   /* fp32 [M, K / 16]: sums of x over 16 consecutive values */
    int64_t K, G;      /* G = K / 16 */
} gb_x;

/* the 64 bf16 words of c - bias for c = 0 .. n-1 (the rest 0), as two zmm tables */
static void gb_table(int n, int bias, __m512i *t0, __m512i *t1) {
    uint16_t w[64] = {0};
    for (int c = 0; c < n; c++) w[c] = gg_to_bf16((float)(c - bias));
    *t0 = _mm512_loadu_si512((const void *)w);
    *t1 = _mm512_loadu_si512((const void *)(w + 32));
}

INLINE __m512 gb_dot(__m512i w, const uint16_t *x) {
    return _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)_mm512_loadu_si512((const void *)x));
}

/* sum of x over values [v, v + n) of row m (n a multiple of 16, v too) */
INLINE float gb_xsum(const gb_x *X, int m, int64_t v, int n) {
    const float *p = X->xs + m * X->G + v / 16;
    float s = p[0];
    for (int i = 1; i < n / 16; i++) s += p[i];
    return s;
}

/* legacy blocks of 32: words = [lo nibbles of the 16 bytes, high nibbles] (+16 where the q5 bit is set) */
INLINE __m512i gb_legacy_words(const uint8_t *qs, int five, uint32_t qh) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)qs));
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
    __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    if (five) idx = _mm512_mask_add_epi16(idx, (__mmask32)qh, idx, _mm512_set1_epi16(16));
    return idx;
}

INLINE void gb_row_legacy(int t, const uint8_t *row, int64_t nb, const gb_x *X, const uint16_t *x, const int m0,
                          const int mb, __m512i t0, float *out) {
    __m512 acc[MT][2];
    float corr[MT] = {0};
    for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk;
        __m512i idx;
        float d, mn = 0.f;
        if (t == 2) {
            blk = row + 18 * b, d = gg_f16(blk);
            idx = gb_legacy_words(blk + 2, 0, 0);
        } else if (t == 3) {
            blk = row + 20 * b, d = gg_f16(blk), mn = gg_f16(blk + 2);
            idx = gb_legacy_words(blk + 4, 0, 0);
        } else if (t == 6) {
            blk = row + 22 * b, d = gg_f16(blk);
            idx = gb_legacy_words(blk + 6, 1, gg_u32(blk + 2));
        } else {
            blk = row + 24 * b, d = gg_f16(blk), mn = gg_f16(blk + 2);
            idx = gb_legacy_words(blk + 8, 1, gg_u32(blk + 4));
        }
        _mm_prefetch((const char *)blk + GG_PF, _MM_HINT_T0);
        const __m512i w = _mm512_permutexvar_epi16(idx, t0);
        const __m512 dv = _mm512_set1_ps(d);
        for (int m = 0; m < mb; m++) {
            acc[m][b & 1] = _mm512_fmadd_ps(dv, gb_dot(w, x + m * X->K + 32 * b), acc[m][b & 1]);
            if (t == 3 || t == 7) corr[m] += mn * gb_xsum(X, m0 + m, 32 * b, 32);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + corr[m];
}

INLINE void gb_row_k45(int t, const uint8_t *row, int64_t nb, const gb_x *X, const uint16_t *x, const int m0,
                       const int mb, __m512i t0, float *out) {
    const int ts = t == 12 ? 144 : 176;
    __m512 acc[MT][2];
    float corr[MT] = {0};
    for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + ts * b, *qs = blk + (t == 12 ? 16 : 48);
        _mm_prefetch((const char *)blk + GG_PF, _MM_HINT_T0);
        const float d = gg_f16(blk), dmin = gg_f16(blk + 2);
        const __m512i qh = t == 13 ? _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 16)))
                                   : _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            int s0, n0, s1, n1;
            gg_scale_min(2 * j, blk + 4, &s0, &n0);
            gg_scale_min(2 * j + 1, blk + 4, &s1, &n1);
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(qs + 32 * j)));
            __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(v, 4);
            if (t == 13) {
                const __m512i one = _mm512_set1_epi16(1);
                lo = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 2 * j), one), 4));
                hi = _mm512_or_si512(hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 2 * j + 1), one), 4));
            }
            const __m512i wl = _mm512_permutexvar_epi16(lo, t0), wh = _mm512_permutexvar_epi16(hi, t0);
            const __m512 a0 = _mm512_set1_ps(d * (float)s0), a1 = _mm512_set1_ps(d * (float)s1);
            const float b0 = dmin * (float)n0, b1 = dmin * (float)n1;
            const int64_t v0 = 256 * b + 64 * j;
            for (int m = 0; m < mb; m++) {
                const uint16_t *xm = x + m * X->K + v0;
                acc[m][0] = _mm512_fmadd_ps(a0, gb_dot(wl, xm), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(a1, gb_dot(wh, xm + 32), acc[m][1]);
                corr[m] -= b0 * gb_xsum(X, m0 + m, v0, 32) + b1 * gb_xsum(X, m0 + m, v0 + 32, 32);
            }
        }
    }
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + corr[m];
}

INLINE void gb_row_q6k(const uint8_t *row, int64_t nb, const gb_x *X, const uint16_t *x, const int mb, __m512i t0,
                       __m512i t1, float *out) {
    __m512 acc[MT][2];
    for (int m = 0; m < mb; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const __m512i f15 = _mm512_set1_epi16(15), three = _mm512_set1_epi16(3);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + 210 * b;
        _mm_prefetch((const char *)blk + GG_PF, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + GG_PF + 64, _MM_HINT_T0);
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = gg_f16(blk + 208);
        for (int h = 0; h < 2; h++) {
            const __m512i qh = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
            const __m512i l0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 64 * h)));
            const __m512i l1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32)));
            for (int s = 0; s < 4; s++) {
                const __m512i l = s & 1 ? l1 : l0;
                const __m512i lo = _mm512_and_si512(s < 2 ? l : _mm512_srli_epi16(l, 4), f15);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(qh, 2 * s), three);
                const __m512i idx = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
                const __m512i w = _mm512_permutex2var_epi16(t0, idx, t1);
                const int j = 8 * h + 2 * s; /* sub-blocks j (values 0..15 of the 32) and j + 1 */
                const __m512 a = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(d * (float)sc[j]),
                                                      _mm512_set1_ps(d * (float)sc[j + 1]));
                for (int m = 0; m < mb; m++)
                    acc[m][s & 1] =
                        _mm512_fmadd_ps(a, gb_dot(w, x + m * X->K + 256 * b + 128 * h + 32 * s), acc[m][s & 1]);
            }
        }
    }
    for (int m = 0; m < mb; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

INLINE void gb_row(int t, const uint8_t *row, int64_t nb, const gb_x *X, const int m0, const int mb, __m512i t0,
                   __m512i t1, float *out) {
    const uint16_t *x = X->x + m0 * X->K;
    if (t == 14) gb_row_q6k(row, nb, X, x, mb, t0, t1, out);
    else if (t == 12 || t == 13) gb_row_k45(t, row, nb, X, x, m0, mb, t0, out);
    else gb_row_legacy(t, row, nb, X, x, m0, mb, t0, out);
}

/* x bf16 [M, K] (its values: bf16 x, or fp32 x rounded by the caller) -> y fp32 [M, ldy]; FXQ_EARG for
 * the types this kernel does not take (q8_0, q2_k, q3_k: the fp32 kernel) */
int fxq512_gguf_bf16_gemv(int t, const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, int64_t row_bytes,
                          int64_t N, float *y, int64_t ldy, int nthreads) {
    int qk, ts;
    if (!gg_block(t, &qk, &ts) || row_bytes % ts || row_bytes / ts * qk != K || t == 8 || t == 10 || t == 11)
        return FXQ_EARG;
    const int64_t nb = row_bytes / ts, G = K / 16;
    float *xs = (float *)fxq_malloc(sizeof(float) * (size_t)(M * G));
    if (!xs) return FXQ_ENOMEM;
    for (int64_t i = 0; i < M * G; i++) {
        float s = 0.f;
        for (int l = 0; l < 16; l++) s += fxq_bf16(x[16 * i + l]);
        xs[i] = s;
    }
    const gb_x X = {x, xs, K, G};
    __m512i t0, t1;
    if (t == 2) gb_table(16, 8, &t0, &t1);
    else if (t == 3 || t == 12) gb_table(16, 0, &t0, &t1);
    else if (t == 6) gb_table(32, 16, &t0, &t1);
    else if (t == 14) gb_table(64, 32, &t0, &t1);
    else gb_table(32, 0, &t0, &t1); /* q5_1, q5_k */
#pragma omp parallel for schedule(guided, 8) num_threads(nthreads)
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *row = w + r * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT];
#define GB_CALL(c) gb_row(t, row, nb, &X, (int)m0, c, t0, t1, out)
            DISPATCH_MB(mb, GB_CALL)
#undef GB_CALL
            for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + r] = out[i];
        }
    }
    free(xs);
    return FXQ_OK;
}
#endif /* FXQ_BF16DOT */
