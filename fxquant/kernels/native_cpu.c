/* fxquant native CPU GEMV kernels for small M (AVX2 + FMA), built on first use by native_cpu.py
 * (native_avx512.c holds the AVX-512 versions of the same kernels, same arguments).
 *
 * Every kernel reads the format's *stored* bytes as they are (no repacking, no decoded copy of the
 * weight) and accumulates in fp32: x is fp32 [M, K] row-major, y is fp32 [M, ldy]; with round_x the
 * kernel works on x rounded to bf16 (a rounded copy made first: the compute_dtype policy rounds fp32
 * activations once, in C instead of two torch conversions per call).  Every kernel returns a status
 * (FXQ_OK, or FXQ_ENOMEM / FXQ_EARG before writing anything: native_common.h).  The math of
 * each layout is documented once, in fxquant/formats/<format>.py; the comments here only say how
 * the bytes are walked.  Threads: OpenMP over output rows (or tiles of rows), guided schedule (a thread that wakes up
 * late takes less work: measured a few % lower medians than static here).
 * Compiled without AVX2/FMA (another CPU), fxq_simd() returns 0 and the Python side never calls
 * the kernels: the ops keep their ATen paths.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FXQ_SIMD 1
#else
#define FXQ_SIMD 0
#endif

int fxq_simd(void) { return FXQ_SIMD; }

#ifdef FXQ_FAULT_INJECT
int fxq_fault_countdown = 0;
/* the n-th allocation request from now fails (n <= 0: none); see native_common.h */
void fxq_fail_alloc(int n) { __atomic_store_n(&fxq_fault_countdown, n, __ATOMIC_RELAXED); }
/* requests left before the failure (0 once it happened or when none is armed) */
int fxq_fail_alloc_pending(void) { return __atomic_load_n(&fxq_fault_countdown, __ATOMIC_RELAXED); }
#endif

#if FXQ_SIMD

#define bf16_to_f32 fxq_bf16

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 int8 at p -> 8 floats */
static inline __m256 load_i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* ---------------------------------------------------------------------------------------------
 * int8wo: w int8 [N, K] row-major, scale bf16 [N].  y[m, n] = scale[n] * sum_k w[n, k] x[m, k].
 * Four rows at a time share each load of x (two accumulator chains per row).
 */
static float dot_i8(const int8_t *w, const float *x, int64_t K) {
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a = _mm256_fmadd_ps(load_i8x8(w + k), _mm256_loadu_ps(x + k), a);
        b = _mm256_fmadd_ps(load_i8x8(w + k + 8), _mm256_loadu_ps(x + k + 8), b);
    }
    float s = hsum8(_mm256_add_ps(a, b));
    for (; k < K; k++) s += (float)w[k] * x[k];
    return s;
}

int fxq_int8_gemv(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *scale,
                  int64_t N, float *y, int64_t ldy, int round_x, int nthreads) {
    float *xr;
    if (!(x = fxq_x_rounded(x, M * K, round_x, &xr))) return FXQ_ENOMEM;
    int64_t nb = (N + 3) / 4;
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t blk = 0; blk < nb; blk++) {
        int64_t r0 = blk * 4;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float out[4];
            if (r0 + 4 <= N) {
                const int8_t *w0 = w + r0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
                int64_t k = 0;
                for (; k + 16 <= K; k += 16) {
                    __m256 x0 = _mm256_loadu_ps(xm + k), x1 = _mm256_loadu_ps(xm + k + 8);
                    a0 = _mm256_fmadd_ps(load_i8x8(w0 + k), x0, a0);
                    c0 = _mm256_fmadd_ps(load_i8x8(w0 + k + 8), x1, c0);
                    a1 = _mm256_fmadd_ps(load_i8x8(w1 + k), x0, a1);
                    c1 = _mm256_fmadd_ps(load_i8x8(w1 + k + 8), x1, c1);
                    a2 = _mm256_fmadd_ps(load_i8x8(w2 + k), x0, a2);
                    c2 = _mm256_fmadd_ps(load_i8x8(w2 + k + 8), x1, c2);
                    a3 = _mm256_fmadd_ps(load_i8x8(w3 + k), x0, a3);
                    c3 = _mm256_fmadd_ps(load_i8x8(w3 + k + 8), x1, c3);
                }
                out[0] = hsum8(_mm256_add_ps(a0, c0));
                out[1] = hsum8(_mm256_add_ps(a1, c1));
                out[2] = hsum8(_mm256_add_ps(a2, c2));
                out[3] = hsum8(_mm256_add_ps(a3, c3));
                for (; k < K; k++) {
                    out[0] += (float)w0[k] * xm[k];
                    out[1] += (float)w1[k] * xm[k];
                    out[2] += (float)w2[k] * xm[k];
                    out[3] += (float)w3[k] * xm[k];
                }
                for (int i = 0; i < 4; i++) y[m * ldy + r0 + i] = out[i] * bf16_to_f32(scale[r0 + i]);
            } else {
                for (int64_t r = r0; r < N; r++)
                    y[m * ldy + r] = dot_i8(w + r * K, xm, K) * bf16_to_f32(scale[r]);
            }
        }
    }
    free(xr);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * 4-bit codes in the tiled layout of aten._convert_weight_to_int4pack_for_cpu (int4wo, and intx
 * with b = 4 grouped along K): tile t of BN rows, column k, byte d < BN/2 at
 * (t*K + k)*BN/2 + d holds row t*BN + d (low nibble) and row t*BN + BN/2 + d (high nibble).
 * W[n, k] = (q - mid) * s[j, n] + z[j, n] for group j = k / gs, with s, z bf16 at
 * s[j*sz_grp + n*sz_row] (int4wo: interleaved scales_and_zeros, intx: separate arrays; z may be
 * NULL for 0).  Per group: y += s * sum_k q x + (z - mid*s) * sum_k x.
 * A 16-byte chunk of a tile column gives 32 rows: 16 low nibbles and 16 high nibbles.
 */
/* 8 rows' (scale, zero - mid*scale) of group j, rows r..r+7, as floats.  Vector loads when the
 * layout allows (interleaved pairs: sz_row == 2 and zero == scale + 1; separate arrays: sz_row == 1)
 * and all 8 rows exist; otherwise element by element (rows >= N get 0). */
static inline void load_sz8(const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp,
                            int64_t j, int64_t r, int64_t N, float mid, __m256 *s, __m256 *zc) {
    const __m256 vmid = _mm256_set1_ps(mid);
    if (r + 8 <= N && sz_row == 2 && zero == scale + 1) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(scale + j * sz_grp + r * 2));
        *s = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
        __m256 z = _mm256_castsi256_ps(_mm256_and_si256(wv, _mm256_set1_epi32((int)0xFFFF0000u)));
        *zc = _mm256_fnmadd_ps(vmid, *s, z);
        return;
    }
    if (r + 8 <= N && sz_row == 1) {
        const uint16_t *sp = scale + j * sz_grp + r;
        *s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)sp)), 16));
        __m256 z = _mm256_setzero_ps();
        if (zero)
            z = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(zero + j * sz_grp + r))), 16));
        *zc = _mm256_fnmadd_ps(vmid, *s, z);
        return;
    }
    float sv[8], zv[8];
    for (int i = 0; i < 8; i++) {
        sv[i] = zv[i] = 0.f;
        if (r + i < N) {
            sv[i] = bf16_to_f32(scale[j * sz_grp + (r + i) * sz_row]);
            zv[i] = (zero ? bf16_to_f32(zero[j * sz_grp + (r + i) * sz_row]) : 0.f) - mid * sv[i];
        }
    }
    *s = _mm256_loadu_ps(sv);
    *zc = _mm256_loadu_ps(zv);
}

/* one tile column k: 16 bytes = 16 low-nibble rows + 16 high-nibble rows, widened 8 bytes at a
 * time (vpmovzxbd from memory); both nibbles are exact small integers in fp32. */
#define INT4T_STEP(P, XK, A0, A1, A2, A3)                                                          \
    {                                                                                              \
        __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(P)));                 \
        __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((P) + 8)));           \
        A0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, m0f)), XK, A0);               \
        A1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, m0f)), XK, A1);               \
        A2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), XK, A2);                \
        A3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), XK, A3);                \
    }

/* the same from 16 nibble-pair bytes in a register (rebuilt from shards) */
#define INT4R_STEP(V, XK, A0, A1, A2, A3)                                                          \
    {                                                                                              \
        __m256i v0 = _mm256_cvtepu8_epi32(V), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(V, 8));    \
        A0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, m0f)), XK, A0);               \
        A1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, m0f)), XK, A1);               \
        A2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), XK, A2);                \
        A3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), XK, A3);                \
    }

/* Planes narrower than 4 bits (fxquant/formats/intx.py): the nibble-pair byte stream of the plane
 * is stored as shards of w = 2 or 1 bits (a 3-bit plane: a 2-bit shard, then a 1-bit one holding
 * bit 2).  Shard byte j holds, for chunk i < 4/w, the w low bits of both nibbles of nibble-pair byte
 * i*ch + j at bit w*i (ch = the shard's bytes).  16 nibble-pair bytes at m: shift the shard bytes
 * at m - i*ch right by w*i, mask the w bits of each nibble, put the second shard at bit w0. */
static inline __m128i shard16(const uint8_t *s, int64_t w, int64_t ch, int64_t m) {
    const int64_t i = m / ch;
    const __m128i mask = _mm_set1_epi8(w == 1 ? 0x11 : w == 2 ? 0x33 : (char)0xFF);
    return _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(s + m - i * ch)),
                                       _mm_cvtsi32_si128((int)(w * i))), mask);
}

/* s0 (and s1, or NULL): the plane's shards of widths w0 (w1), ch0 (ch1) bytes each; a 4-bit plane
 * is one shard of width 4, the stored bytes themselves (read in place: the fast path). */
int fxq_int4t_gemv(const float *x, int64_t M, int64_t K, const uint8_t *s0, int64_t w0, int64_t ch0,
                   const uint8_t *s1, int64_t w1, int64_t ch1, int64_t N, int64_t BN,
                   int64_t gs, const uint16_t *scale, const uint16_t *zero, int64_t sz_row,
                   int64_t sz_grp, float mid, float *y, int64_t ldy, int round_x, int nthreads) {
    const uint8_t *w = s0;
    const int fast4 = (w0 == 4 && s1 == NULL);
    const int64_t G = K / gs, T = (N + BN - 1) / BN, CH = BN / 32, half = BN / 2;
    float *xr, *xs = (float *)fxq_malloc(sizeof(float) * (size_t)(M * G));
    if (!xs || !(x = fxq_x_rounded(x, M * K, round_x, &xr))) {
        free(xs);
        return FXQ_ENOMEM;
    }
    fxq_group_sums(x, M, G, gs, xs);
    const __m256i m0f = _mm256_set1_epi32(0x0F);
#pragma omp parallel for collapse(2) schedule(guided) num_threads(nthreads)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t c = 0; c < CH; c++) {
            const uint8_t *base = w + t * K * half + c * 16;
            const int64_t rlo = t * BN + c * 16, rhi = t * BN + half + c * 16;
            for (int64_t m = 0; m < M; m++) {
                const float *xm = x + m * K;
                __m256 y0 = _mm256_setzero_ps(), y1 = y0, y2 = y0, y3 = y0;
                for (int64_t j = 0; j < G; j++) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
                    const uint8_t *p = base + j * gs * half;
                    const float *xj = xm + j * gs;
                    int64_t k = 0;
                    if (fast4) {
                        for (; k + 2 <= gs; k += 2) {
                            __m256 xk = _mm256_broadcast_ss(xj + k), xk2 = _mm256_broadcast_ss(xj + k + 1);
                            INT4T_STEP(p + k * half, xk, a0, a1, a2, a3);
                            INT4T_STEP(p + (k + 1) * half, xk2, b0, b1, b2, b3);
                        }
                        if (k < gs) {
                            __m256 xk = _mm256_broadcast_ss(xj + k);
                            INT4T_STEP(p + k * half, xk, a0, a1, a2, a3);
                        }
                    } else {
                        const int64_t mb = p - w, me = mb + (gs - 1) * half; /* nibble-pair bytes of k = 0, gs-1 */
                        const int64_t i0 = mb / ch0, i1 = s1 ? mb / ch1 : 0;
                        const __m128i sh1 = _mm_cvtsi32_si128((int)w0);
                        if (me / ch0 == i0 && (!s1 || me / ch1 == i1)) { /* one chunk per shard: no division per k */
                            const uint8_t *q0 = s0 + mb - i0 * ch0, *q1 = s1 ? s1 + mb - i1 * ch1 : NULL;
                            const __m128i c0 = _mm_cvtsi32_si128((int)(w0 * i0)), c1 = _mm_cvtsi32_si128((int)(w1 * i1));
                            const __m128i mk0 = _mm_set1_epi8(w0 == 1 ? 0x11 : 0x33), mk1 = _mm_set1_epi8(w1 == 1 ? 0x11 : 0x33);
#define NP16(K)                                                                                    \
    (q1 ? _mm_or_si128(_mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(q0 + (K) * half)), c0), mk0),  \
                       _mm_sll_epi16(_mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(q1 + (K) * half)), c1), mk1), sh1)) \
        : _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(q0 + (K) * half)), c0), mk0))
                            for (; k + 2 <= gs; k += 2) {
                                __m256 xk = _mm256_broadcast_ss(xj + k), xk2 = _mm256_broadcast_ss(xj + k + 1);
                                __m128i v = NP16(k), v2 = NP16(k + 1);
                                INT4R_STEP(v, xk, a0, a1, a2, a3);
                                INT4R_STEP(v2, xk2, b0, b1, b2, b3);
                            }
                            if (k < gs) {
                                __m256 xk = _mm256_broadcast_ss(xj + k);
                                __m128i v = NP16(k);
                                INT4R_STEP(v, xk, a0, a1, a2, a3);
                            }
#undef NP16
                        } else { /* the group crosses a chunk boundary (at most a few per weight) */
                            for (; k < gs; k++) {
                                const int64_t mk = mb + k * half;
                                __m128i v = shard16(s0, w0, ch0, mk);
                                if (s1) v = _mm_or_si128(v, _mm_sll_epi16(shard16(s1, w1, ch1, mk), sh1));
                                __m256 xk = _mm256_broadcast_ss(xj + k);
                                INT4R_STEP(v, xk, a0, a1, a2, a3);
                            }
                        }
                    }
                    __m256 s0, s1, s2, s3, z0, z1, z2, z3;
                    load_sz8(scale, zero, sz_row, sz_grp, j, rlo, N, mid, &s0, &z0);
                    load_sz8(scale, zero, sz_row, sz_grp, j, rlo + 8, N, mid, &s1, &z1);
                    load_sz8(scale, zero, sz_row, sz_grp, j, rhi, N, mid, &s2, &z2);
                    load_sz8(scale, zero, sz_row, sz_grp, j, rhi + 8, N, mid, &s3, &z3);
                    __m256 xsum = _mm256_set1_ps(xs[m * G + j]);
                    a0 = _mm256_add_ps(a0, b0);
                    a1 = _mm256_add_ps(a1, b1);
                    a2 = _mm256_add_ps(a2, b2);
                    a3 = _mm256_add_ps(a3, b3);
                    y0 = _mm256_fmadd_ps(z0, xsum, _mm256_fmadd_ps(a0, s0, y0));
                    y1 = _mm256_fmadd_ps(z1, xsum, _mm256_fmadd_ps(a1, s1, y1));
                    y2 = _mm256_fmadd_ps(z2, xsum, _mm256_fmadd_ps(a2, s2, y2));
                    y3 = _mm256_fmadd_ps(z3, xsum, _mm256_fmadd_ps(a3, s3, y3));
                }
                float out[32];
                _mm256_storeu_ps(out, y0);
                _mm256_storeu_ps(out + 8, y1);
                _mm256_storeu_ps(out + 16, y2);
                _mm256_storeu_ps(out + 24, y3);
                for (int i = 0; i < 16; i++) {
                    if (rlo + i < N) y[m * ldy + rlo + i] = out[i];
                    if (rhi + i < N) y[m * ldy + rhi + i] = out[16 + i];
                }
            }
        }
    }
    free(xs);
    free(xr);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * 4-bit codes through a 16-entry fp32 table, two codes per byte (NF4/FP4 of bitsandbytes, fpX with
 * X = 4): row n's C bytes start at codes + n*row_stride; byte i's high nibble meets xh[m, i] and
 * its low nibble xl[m, i] (the caller lays x out so: bnb4 even / odd elements, fpx the two halves).
 * W = table[code] * scale of the block of bb bytes (blocks numbered n*(C/bb) + i/bb):
 *   mode 0: fp32 sc[b];  mode 1: bf16 sc[b];
 *   mode 2: double quant, dq_code[u8 sc[b]] * dq_scale[b / dq_block] + dq_offset (bitsandbytes).
 * The lookup is exact and uses byte shuffles only: the table is cut into its four byte planes,
 * vpshufb looks up 32 codes in each plane, and two rounds of byte/word unpacking put the bytes
 * back together as 4 x 8 floats, in an order (per 16 code bytes: low nibbles 0-3, high nibbles 0-3,
 * low 4-7, high 4-7, ...) that x is rearranged to once per call.  When every table value is exact
 * in bf16 (the fpX tables), the two low byte planes are zero and only the two high ones are
 * looked up (9 shuffles per 32 codes instead of 13).  (Measured here: 2.7x faster than
 * vpermps + blendv lookups, which cost several uops each on this AMD CPU.)  Tails of a block that
 * are not a multiple of 16 bytes are done one byte at a time.
 */
/* the block's full 16-byte chunks: idx = 32 nibbles (low nibbles, then high), looked up in the
 * high byte planes (and, through W01L/W01H, the low ones), bytes rebuilt into 4 x 8 floats */
#define LUT4_CHUNKS(W01L, W01H)                                                                    \
    for (int64_t i = i0; i < i0 + full; i += 16) {                                                 \
        __m128i q = _mm_loadu_si128((const __m128i *)(row + i));                                   \
        __m128i lo = _mm_and_si128(q, m0f), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m0f);         \
        __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);                  \
        __m256i b2v = _mm256_shuffle_epi8(p2, idx), b3v = _mm256_shuffle_epi8(p3, idx);            \
        __m256i w23l = _mm256_unpacklo_epi8(b2v, b3v), w23h = _mm256_unpackhi_epi8(b2v, b3v);      \
        __m256i w01l = W01L, w01h = W01H;                                                          \
        const float *xi = xam + 2 * i;                                                             \
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(w01l, w23l)), _mm256_loadu_ps(xi), a0);      \
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(w01l, w23l)), _mm256_loadu_ps(xi + 8), a1);  \
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(w01h, w23h)), _mm256_loadu_ps(xi + 16), a2); \
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(w01h, w23h)), _mm256_loadu_ps(xi + 24), a3); \
    }

int fxq_lut4_gemv(const float *xh, const float *xl, int64_t M, int64_t C, const uint8_t *codes,
                  int64_t row_stride, int64_t N, const float *table, int64_t bb, int mode,
                  const void *sc, const float *dq_code, const float *dq_scale, float dq_offset,
                  int64_t dq_block, float *y, int64_t ldy, int round_x, int nthreads) {
    const int64_t nblk = C / bb, full = bb / 16 * 16;
    /* x rearranged: for each block, each full 16-byte chunk at byte i -> 32 floats at xa + 2 i;
     * then the threads' block-scale buffers (nblk floats each), then xh and xl rounded (round_x) */
    float *xa = (float *)fxq_malloc(sizeof(float) * (size_t)(2 * C * M + nthreads * nblk + (round_x ? 2 * C * M : 0)));
    if (!xa) return FXQ_ENOMEM;
    if (round_x) {
        float *r = xa + 2 * C * M + nthreads * nblk;
        fxq_round_bf16_into(xh, M * C, r);
        fxq_round_bf16_into(xl, M * C, r + M * C);
        xh = r, xl = r + M * C;
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t blk = 0; blk < nblk; blk++)
            for (int64_t i = blk * bb; i < blk * bb + full; i += 16) {
                float *d = xa + m * 2 * C + 2 * i;
                for (int q = 0; q < 4; q++)
                    for (int e = 0; e < 4; e++) {
                        d[8 * q + e] = xl[m * C + i + 4 * q + e];
                        d[8 * q + 4 + e] = xh[m * C + i + 4 * q + e];
                    }
            }
    uint8_t planes[4][16];
    for (int c = 0; c < 16; c++) {
        uint32_t u;
        memcpy(&u, table + c, 4);
        for (int p = 0; p < 4; p++) planes[p][c] = (uint8_t)(u >> (8 * p));
    }
    const __m256i p0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[0]));
    const __m256i p1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[1]));
    const __m256i p2 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[2]));
    const __m256i p3 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[3]));
    const __m128i m0f = _mm_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    int bf16_table = 1; /* every entry exact in bf16 (fpX tables): bytes 0 and 1 of each fp32 are 0 */
    for (int c = 0; c < 16; c++) bf16_table &= planes[0][c] == 0 && planes[1][c] == 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *sbuf = xa + 2 * C * M + omp_get_thread_num() * nblk;
#pragma omp for schedule(guided)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = codes + n * row_stride;
            /* this row's block scales, once for all m (no division in the block loop) */
            fxq_row_scales(n, nblk, mode, sc, dq_code, dq_scale, dq_offset, dq_block, sbuf);
            for (int64_t m = 0; m < M; m++) {
                const float *xam = xa + m * 2 * C, *xhm = xh + m * C, *xlm = xl + m * C;
                __m256 yv = _mm256_setzero_ps();
                float ytail = 0.f;
                for (int64_t blk = 0; blk < nblk; blk++) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    const int64_t i0 = blk * bb;
                    if (bf16_table) /* the two low byte planes are zero: half the lookups */
                        LUT4_CHUNKS(zero, zero)
                    else
                        LUT4_CHUNKS(_mm256_unpacklo_epi8(_mm256_shuffle_epi8(p0, idx), _mm256_shuffle_epi8(p1, idx)),
                                    _mm256_unpackhi_epi8(_mm256_shuffle_epi8(p0, idx), _mm256_shuffle_epi8(p1, idx)))
                    float tail = 0.f;
                    for (int64_t i = i0 + full; i < i0 + bb; i++)
                        tail += table[row[i] >> 4] * xhm[i] + table[row[i] & 15] * xlm[i];
                    yv = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                         _mm256_broadcast_ss(sbuf + blk), yv);
                    ytail += tail * sbuf[blk];
                }
                y[m * ldy + n] = hsum8(yv) + ytail;
            }
        }
    }
    free(xa);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * fpX with X = 3 or 4 (fxquant/formats/fpx.py): row n's bytes at codes + n*row_bytes hold the
 * code's bit planes, widest (highest bits) first: X = 4 one 4-bit plane (Kp/2 bytes), X = 3 a 2-bit
 * plane (Kp/4 bytes) then a 1-bit plane (Kp/8 bytes).  In a plane of width p with cols bytes, byte
 * j holds at bit i*p the plane's bits of code i*cols + j.  Every value of these formats is a small
 * integer times a power of two, so the caller passes the table as int8 (value * 2^f, exact) and
 * factor = 2^-f: one vpshufb decodes 32 codes, which are widened and converted like int8 codes.
 * Codes are walked in runs of the narrowest plane's segment (all planes' shifts fixed in a run),
 * 32 codes at a time against 32 contiguous x; a run's remainder one code at a time.
 * W[n, k] = table[code] * factor * scale[n] (scale bf16).
 */
int fxq_fpx_gemv(const float *x, int64_t M, int64_t Kp, const uint8_t *codes, int64_t row_bytes,
                 int64_t N, int bits, const int8_t *table, const uint16_t *scale, float factor,
                 float *y, int64_t ldy, int round_x, int nthreads) {
    if (bits != 3 && bits != 4) return FXQ_EARG;
    float *xr;
    if (!(x = fxq_x_rounded(x, M * Kp, round_x, &xr))) return FXQ_ENOMEM;
    int np, pw[2], psh[2];
    int64_t pcols[2], poff[2];
    if (bits == 4) {
        np = 1; pw[0] = 4; psh[0] = 0; pcols[0] = Kp / 2; poff[0] = 0;
    } else {
        np = 2; pw[0] = 2; psh[0] = 1; pcols[0] = Kp / 4; poff[0] = 0;
        pw[1] = 1; psh[1] = 0; pcols[1] = Kp / 8; poff[1] = Kp / 4;
    }
    const int64_t seg = pcols[np - 1], nseg = Kp / seg; /* nseg <= 8 */
    int64_t soff[8][2];
    int ssh[8][2];
    for (int64_t sg = 0; sg < nseg; sg++)
        for (int p = 0; p < np; p++) {
            const int64_t c0 = sg * seg, ip = c0 / pcols[p];
            soff[sg][p] = poff[p] + (c0 - ip * pcols[p]);
            ssh[sg][p] = (int)(ip * pw[p]);
        }
    const __m256i tv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    const __m256i mk0 = _mm256_set1_epi8((char)((1 << pw[0]) - 1)), mk1 = _mm256_set1_epi8(1);
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * row_bytes;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * Kp;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            float tail = 0.f;
            for (int64_t sg = 0; sg < nseg; sg++) {
                const int64_t c0 = sg * seg;
                const uint8_t *pb[2] = {row + soff[sg][0], row + soff[sg][np - 1]};
                const int sh[2] = {ssh[sg][0], ssh[sg][np - 1]};
                const __m128i sh0 = _mm_cvtsi32_si128(sh[0]), sh1 = _mm_cvtsi32_si128(sh[1]);
                int64_t j = 0;
                for (; j + 32 <= seg; j += 32) {
                    __m256i idx = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(pb[0] + j)), sh0), mk0);
                    if (np == 2) {
                        __m256i lo = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(pb[1] + j)), sh1), mk1);
                        idx = _mm256_or_si256(_mm256_add_epi8(idx, idx), lo);
                    }
                    __m256i v = _mm256_shuffle_epi8(tv, idx);
                    __m128i vl = _mm256_castsi256_si128(v), vh = _mm256_extracti128_si256(v, 1);
                    const float *xj = xm + c0 + j;
                    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(vl)), _mm256_loadu_ps(xj), a0);
                    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(vl, 8))), _mm256_loadu_ps(xj + 8), a1);
                    a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(vh)), _mm256_loadu_ps(xj + 16), a2);
                    a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(vh, 8))), _mm256_loadu_ps(xj + 24), a3);
                }
                for (; j < seg; j++) {
                    int code = 0;
                    for (int p = 0; p < np; p++) code |= ((pb[p][j] >> sh[p]) & ((1 << pw[p]) - 1)) << psh[p];
                    tail += (float)table[code] * xm[c0 + j];
                }
            }
            const float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
            y[m * ldy + n] = acc * factor * bf16_to_f32(scale[n]);
        }
    }
    free(xr);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * OneBit: bits uint8 [N, CB], bit j of byte c is the sign of element 8c + j (1 = +1, 0 = -1);
 * x fp32 [M, K], b bf16 [K]: xb fp32 [M, 8*CB] = x * b, zero-padded, made here (fxq_onebit_xb).
 * sum_k S x'_k = 2 * (sum over set bits of x'_k) - sum x'.
 * Four bytes (32 elements) per step: the word broadcast to 8 lanes, lane j of byte c tests bit 8c+j.
 */
int fxq_onebit_gemv(const float *x, int64_t M, int64_t K, const uint16_t *b, int64_t CB, const uint8_t *bits,
                    int64_t N, const uint16_t *a, float *y, int64_t ldy, int round_x, int nthreads) {
    float *xb = (float *)fxq_malloc(sizeof(float) * (size_t)(M * 8 * CB + M));
    if (!xb) return FXQ_ENOMEM;
    float *tot = xb + M * 8 * CB;
    fxq_onebit_xb(x, M, K, b, 8 * CB, round_x, xb);
    fxq_row_totals(xb, M, 8 * CB, tot);
    __m256i masks[4];
    for (int c = 0; c < 4; c++)
        masks[c] = _mm256_setr_epi32(1 << (8 * c), 2 << (8 * c), 4 << (8 * c), 8 << (8 * c),
                                     16 << (8 * c), 32 << (8 * c), 64 << (8 * c), (int)(128u << (8 * c)));
#pragma omp parallel for schedule(guided) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = bits + n * CB;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = xb + m * 8 * CB;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t c = 0;
            for (; c + 4 <= CB; c += 4) {
                uint32_t word;
                memcpy(&word, row + c, 4);
                __m256i bc = _mm256_set1_epi32((int)word);
#define ONEBIT_LANE(I, A)                                                                          \
    A = _mm256_add_ps(A, _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(                     \
                                           _mm256_and_si256(bc, masks[I]), masks[I])),              \
                                       _mm256_loadu_ps(xm + 8 * (c + I))));
                ONEBIT_LANE(0, a0) ONEBIT_LANE(1, a1) ONEBIT_LANE(2, a2) ONEBIT_LANE(3, a3)
            }
            float pos = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; c < CB; c++)
                for (int j = 0; j < 8; j++)
                    if (row[c] >> j & 1) pos += xm[8 * c + j];
            y[m * ldy + n] = bf16_to_f32(a[n]) * (2.f * pos - tot[m]);
        }
    }
    free(xb);
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * int8wo's large-M decoder: n int8 codes -> bf16, exactly (|q| <= 128 has 8 significant bits, so
 * its bf16 is the top half of its fp32), 8 per step.
 */
int fxq_int8_to_bf16(const int8_t *src, int64_t n, uint16_t *dst, int nthreads) {
    const int64_t steps = n / 8;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < steps; t++) {
        int64_t v8;
        memcpy(&v8, src + 8 * t, 8);
        const __m256i f = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v8))));
        const __m256i h = _mm256_srli_epi32(f, 16);
        const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
        _mm_storeu_si128((__m128i *)(dst + 8 * t), _mm256_castsi256_si128(p));
    }
    for (int64_t i = 8 * steps; i < n; i++) {
        const float f = (float)src[i];
        uint32_t u;
        memcpy(&u, &f, 4);
        dst[i] = (uint16_t)(u >> 16);
    }
    return FXQ_OK;
}

#endif /* FXQ_SIMD */
