/* Integer affine weights with integer zero points (fxquant/formats/affine.py: compressed-tensors'
 * pack-quantized, GPTQ and AWQ layers): a small-M GEMV that reads the stored bit streams in place.
 * Compiled into the one library of native_cpu.py with the other kernels.
 *
 * W[n, k] = (q[n, k] - z[n, j]) * s[n, j], j = k / group_size, each row of q a little-endian stream of
 * b-bit codes in 32-bit words.  Per row and group the kernel decodes q - z into fp32 (small integers:
 * exact), dots it with each row of x, and scales the group's sum by s (fp32, the stored bf16 / fp16 /
 * fp32 scale converted exactly by the caller):  y[m, n] = sum_j s[n, j] * sum_{k in j} (q - z) x[m, k].
 * Every product (q - z) * s of the reference is exact in fp32 for bf16 / fp16 scales, so the GEMV
 * computes the reference's sums of the same terms in another fp32 order (factored per group: one
 * rounding per group product instead of per weight); it never subtracts z * sum(x) from a larger
 * sum, so there is no cancellation beyond the reference's own.
 *
 * Two builds of the exported kernel, as for the other formats: fxq_affine_gemv (plain C the compiler
 * vectorises for the target: a row decoded a piece at a time into a buffer, each row of x dotted with
 * it) and, when compiled for AVX-512, fxq512_affine_gemv (4-bit codes in whole groups of 32 decoded in
 * registers and multiplied right away; other layouts as the plain build).
 */
#include "native_avx512.h"

/* codes decoded per piece: the thread's buffer (a piece never spans two groups) */
#define AF_PIECE 512

/* out[i] = q[k0 + i] - z for i < n: codes of one row's stream (row: its 32-bit words; x86 is little
 * endian, so byte i of the stream is byte i of the words) */
static inline void af_decode(const uint32_t *row, int b, int64_t k0, int64_t n, float z, float *out) {
    const uint8_t *bytes = (const uint8_t *)row;
    if (b == 8) {
        const uint8_t *p = bytes + k0;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) out[i] = (float)p[i] - z;
        return;
    }
    if (b == 4 && !(k0 & 1) && !(n & 1)) {
        const uint8_t *p = bytes + k0 / 2;
#pragma omp simd
        for (int64_t i = 0; i < n / 2; i++) {
            out[2 * i] = (float)(p[i] & 15) - z;
            out[2 * i + 1] = (float)(p[i] >> 4) - z;
        }
        return;
    }
    if (b == 2 && !(k0 & 3) && !(n & 3)) {
        const uint8_t *p = bytes + k0 / 4;
#pragma omp simd
        for (int64_t i = 0; i < n / 4; i++)
            for (int s = 0; s < 4; s++) out[4 * i + s] = (float)((p[i] >> (2 * s)) & 3) - z;
        return;
    }
    const uint32_t mask = (1u << b) - 1;
    for (int64_t i = 0; i < n; i++) { /* any width: a 64-bit window over the code's one or two words */
        const int64_t bit = (k0 + i) * b, w = bit >> 5;
        const int sh = (int)(bit & 31);
        uint64_t v = row[w];
        if (sh + b > 32) v |= (uint64_t)row[w + 1] << 32;
        out[i] = (float)((uint32_t)(v >> sh) & mask) - z;
    }
}

typedef void (*af_decode_fn)(const uint32_t *row, int b, int64_t k0, int64_t n, float z, float *out);

/* acc[m] += sum_{i < n} w[i] x[m * K + i] */
static void af_dot(const float *w, const float *x, int64_t K, int64_t n, int64_t M, float *acc) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) s += w[i] * xm[i];
        acc[m] += s;
    }
}

static int af_gemv(const float *x, int64_t M, int64_t K, const uint32_t *q, int64_t words, int b, int64_t N,
                   int64_t gs, const float *scale, const uint8_t *zero, float mid, float *y, int64_t ldy,
                   int round_x, int nthreads, af_decode_fn decode) {
    if (b < 1 || b > 8 || gs < 1 || words != (K * b + 31) / 32) return FXQ_EARG;
    const int64_t G = (K + gs - 1) / gs;
    float *xr;
    if (!(x = fxq_x_rounded(x, M * K, round_x, &xr))) return FXQ_ENOMEM;
    const int64_t per = (AF_PIECE + 2 * M + 15) / 16 * 16; /* per thread: a piece, group sums, row sums */
    float *ws = (float *)fxq_aligned64(sizeof(float) * (size_t)(nthreads * per));
    if (!ws) {
        free(xr);
        return FXQ_ENOMEM;
    }
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = ws + (int64_t)omp_get_thread_num() * per, *gacc = buf + AF_PIECE, *acc = gacc + M;
#pragma omp for schedule(guided, 8)
        for (int64_t r = 0; r < N; r++) {
            const uint32_t *row = q + r * words;
            for (int64_t m = 0; m < M; m++) acc[m] = 0.f;
            for (int64_t j = 0; j < G; j++) {
                const int64_t k0 = j * gs, k1 = k0 + gs < K ? k0 + gs : K;
                const float z = zero ? (float)zero[r * G + j] : mid, s = scale[r * G + j];
                for (int64_t m = 0; m < M; m++) gacc[m] = 0.f;
                for (int64_t p = k0; p < k1; p += AF_PIECE) {
                    const int64_t n = k1 - p < AF_PIECE ? k1 - p : AF_PIECE;
                    decode(row, b, p, n, z, buf);
                    af_dot(buf, x + p, K, n, M, gacc);
                }
                for (int64_t m = 0; m < M; m++) acc[m] += s * gacc[m];
            }
            for (int64_t m = 0; m < M; m++) y[m * ldy + r] = acc[m];
        }
    }
    free(ws);
    free(xr);
    return FXQ_OK;
}

/* x fp32 [M, K]; q int32 [N, words] (words = ceil(K * bits / 32)); scale fp32 [N, G]; zero uint8 [N, G] or
 * NULL (then every z is mid); y fp32 [M, >= N] with row stride ldy */
int fxq_affine_gemv(const float *x, int64_t M, int64_t K, const uint32_t *q, int64_t words, int bits, int64_t N,
                    int64_t group_size, const float *scale, const uint8_t *zero, float mid, float *y, int64_t ldy,
                    int round_x, int nthreads) {
    return af_gemv(x, M, K, q, words, bits, N, group_size, scale, zero, mid, y, ldy, round_x, nthreads, af_decode);
}

#if FXQ_AVX512
/* ---- AVX-512 -------------------------------------------------------------------------------------------
 * 4-bit codes in groups that are whole multiples of 32 (the last one may be partial: K a multiple of 32,
 * e.g. K = 576 in groups of 128): decoded 32 at a time in registers (16 bytes split into low / high
 * nibbles, interleaved back into stream order: byte i holds codes 2i and 2i + 1; widened to 32-bit
 * lanes and converted exactly, minus z) and multiplied right away with up to MT rows of x (two
 * accumulator chains per row), nothing stored.  Other layouts: the plain build's decode-and-dot. */
INLINE void af512_nibbles(const uint8_t *p, __m512 vz, __m512 *w0, __m512 *w1) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    *w0 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))), vz);
    *w1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi))), vz);
}

/* acc[m] += sum_j s_j sum_{k in j} (q - z_j) x[m, k] over one row of 4-bit codes (bytes p), mb rows of x */
INLINE void af512_row4(const uint8_t *p, const float *x, int64_t K, int64_t G, int64_t gs, const float *s,
                       const uint8_t *z, float mid, float *acc, const int mb) {
    for (int64_t j = 0; j < G; j++) {
        __m512 a[2 * MT];
        for (int i = 0; i < 2 * mb; i++) a[i] = _mm512_setzero_ps();
        const __m512 vz = _mm512_set1_ps(z ? (float)z[j] : mid);
        const int64_t k1 = (j + 1) * gs < K ? (j + 1) * gs : K; /* a partial last group ends at K */
        for (int64_t k = j * gs; k < k1; k += 32) {
            if (!(k & 127)) _mm_prefetch((const char *)(p + k / 2 + PF_AHEAD), _MM_HINT_T1);
            __m512 w0, w1;
            af512_nibbles(p + k / 2, vz, &w0, &w1);
            for (int m = 0; m < mb; m++) {
                a[2 * m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), a[2 * m]);
                a[2 * m + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), a[2 * m + 1]);
            }
        }
        for (int m = 0; m < mb; m++) acc[m] += s[j] * _mm512_reduce_add_ps(_mm512_add_ps(a[2 * m], a[2 * m + 1]));
    }
}

static int af512_gemv4(const float *x, int64_t M, int64_t K, const uint32_t *q, int64_t words, int64_t N, int64_t gs,
                       const float *scale, const uint8_t *zero, float mid, float *y, int64_t ldy, int round_x,
                       int nthreads) {
    const int64_t G = (K + gs - 1) / gs;
    float *xr;
    if (!(x = fxq_x_rounded(x, M * K, round_x, &xr))) return FXQ_ENOMEM;
#pragma omp parallel for num_threads(nthreads) schedule(guided, 8)
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *p = (const uint8_t *)(q + r * words);
        const float *s = scale + r * G;
        const uint8_t *z = zero ? zero + r * G : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int64_t mb = M - m0 < MT ? M - m0 : MT;
            float acc[MT];
            for (int m = 0; m < MT; m++) acc[m] = 0.f;
#define AF_ROW(MB) af512_row4(p, x + m0 * K, K, G, gs, s, z, mid, acc, MB)
            DISPATCH_MB(mb, AF_ROW)
#undef AF_ROW
            for (int64_t m = 0; m < mb; m++) y[(m0 + m) * ldy + r] = acc[m];
        }
    }
    free(xr);
    return FXQ_OK;
}

int fxq512_affine_gemv(const float *x, int64_t M, int64_t K, const uint32_t *q, int64_t words, int bits, int64_t N,
                       int64_t group_size, const float *scale, const uint8_t *zero, float mid, float *y, int64_t ldy,
                       int round_x, int nthreads) {
    if (bits == 4 && group_size % 32 == 0 && K % 32 == 0 && words == K / 8)
        return af512_gemv4(x, M, K, q, words, N, group_size, scale, zero, mid, y, ldy, round_x, nthreads);
    return af_gemv(x, M, K, q, words, bits, N, group_size, scale, zero, mid, y, ldy, round_x, nthreads, af_decode);
}
#endif
