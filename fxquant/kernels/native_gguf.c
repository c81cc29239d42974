/* GGUF block types (fxquant/formats/gguf.py): a small-M GEMV and a row decoder that read the file's
 * block bytes in place.  Compiled into the one library of native_cpu.py with the other kernels.
 *
 * Every value is decoded exactly as the reference (and the gguf package) computes it: each product of
 * the fp16 scales, the small integer sub-block scales and the codes is exact in fp32, and the one
 * rounding (the "+ m" / "- dmin * m_j") is the same whether or not the compiler fuses it into an FMA.
 * So the GEMV multiplies x by the reference's weight values and sums in fp32: only the order of the
 * fp32 sums differs from the reference.
 *
 * Types are numbered as ggml numbers them (gguf.GGMLQuantizationType): 2 q4_0, 3 q4_1, 6 q5_0,
 * 7 q5_1, 8 q8_0, 10 q2_k, 11 q3_k, 12 q4_k, 13 q5_k, 14 q6_k.  Byte maps: the docstrings of
 * fxquant/formats/gguf_legacy.py and gguf_kquants.py.
 *
 * Two builds of each exported kernel, as for the other formats: fxq_gguf_* (plain C loops the compiler
 * vectorises for the target) and, when compiled for AVX-512, fxq512_gguf_* (the same decoders into a
 * cache-resident piece, then AVX-512 dot products over up to 4 rows of x per decoded piece).
 */
#include "native_avx512.h"

#ifdef __F16C__
#include <immintrin.h>
#endif

/* ---- the blocks -------------------------------------------------------------------------------- */
#define GG_QK_K 256

/* little-endian fp16 at p -> fp32 (subnormals, inf and NaN as IEEE says) */
static inline float gg_f16(const uint8_t *p) {
    const uint32_t h = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
#ifdef __F16C__
    return _cvtsh_ss((unsigned short)h);
#else
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t u;
    if (exp == 0x1F) u = sign | 0x7F800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) u = sign;
    else { /* subnormal: normalise */
        int e = 113;
        uint32_t m = man;
        while (!(m & 0x400)) { m <<= 1; e--; }
        u = sign | ((uint32_t)e << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline void gd_q4_0(const uint8_t *b, float *y) {
    const float d = gg_f16(b);
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l] = d * (float)((b[2 + l] & 15) - 8);
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l + 16] = d * (float)((b[2 + l] >> 4) - 8);
}

static inline void gd_q4_1(const uint8_t *b, float *y) {
    const float d = gg_f16(b), m = gg_f16(b + 2);
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l] = d * (float)(b[4 + l] & 15) + m;
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l + 16] = d * (float)(b[4 + l] >> 4) + m;
}

static inline uint32_t gg_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void gd_q5_0(const uint8_t *b, float *y) {
    const float d = gg_f16(b);
    const uint32_t qh = gg_u32(b + 2);
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l] = d * (float)(((b[6 + l] & 15) | (int)(((qh >> l) & 1) << 4)) - 16);
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l + 16] = d * (float)(((b[6 + l] >> 4) | (int)(((qh >> (l + 16)) & 1) << 4)) - 16);
}

static inline void gd_q5_1(const uint8_t *b, float *y) {
    const float d = gg_f16(b), m = gg_f16(b + 2);
    const uint32_t qh = gg_u32(b + 4);
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l] = d * (float)((b[8 + l] & 15) | (((qh >> l) & 1) << 4)) + m;
    #pragma omp simd
    for (int l = 0; l < 16; l++) y[l + 16] = d * (float)((b[8 + l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) + m;
}

static inline void gd_q8_0(const uint8_t *b, float *y) {
    const float d = gg_f16(b);
    const int8_t *q = (const int8_t *)(b + 2);
    #pragma omp simd
    for (int l = 0; l < 32; l++) y[l] = d * (float)q[l];
}

static inline void gd_q2_k(const uint8_t *b, float *y) {
    const float d = gg_f16(b + 80), dmin = gg_f16(b + 82);
    const uint8_t *sc = b, *qs = b + 16;
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int half = 0; half < 2; half++) {
                const int j = 8 * h + 2 * s + half;
                const float dl = d * (float)(sc[j] & 15), ml = dmin * (float)(sc[j] >> 4);
                const uint8_t *q = qs + 32 * h + 16 * half;
                float *o = y + 128 * h + 32 * s + 16 * half;
                #pragma omp simd
                for (int l = 0; l < 16; l++) o[l] = dl * (float)((q[l] >> (2 * s)) & 3) - ml;
            }
}

static inline void gd_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *qs = b + 32, *sb = b + 96;
    const float d = gg_f16(b + 108);
    float dl[16];
    for (int j = 0; j < 16; j++) {
        const int low = j < 8 ? sb[j] & 15 : sb[j - 8] >> 4, high = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
        dl[j] = d * (float)((low | (high << 4)) - 32);
    }
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int c = 0; c < 2; c++) {
                const int t = 4 * h + s;
                const float f = dl[2 * t + c];
                const uint8_t *q2 = qs + 32 * h + 16 * c, *hb = hm + 16 * c;
                float *o = y + 32 * t + 16 * c;
#pragma omp simd
                for (int l = 0; l < 16; l++)
                    o[l] = f * (float)(((q2[l] >> (2 * s)) & 3) - 4 + (((hb[l] >> t) & 1) << 2));
            }
}

/* q4_k / q5_k: the 6-bit scale and minimum of sub-block j (llama.cpp get_scale_min_k4) */
static inline void gg_scale_min(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static inline void gd_q4_k(const uint8_t *b, float *y) {
    const float d = gg_f16(b), dmin = gg_f16(b + 2);
    const uint8_t *qs = b + 16;
    for (int j = 0; j < 4; j++) {
        int s0, m0, s1, m1;
        gg_scale_min(2 * j, b + 4, &s0, &m0);
        gg_scale_min(2 * j + 1, b + 4, &s1, &m1);
        const float d0 = d * (float)s0, n0 = dmin * (float)m0, d1 = d * (float)s1, n1 = dmin * (float)m1;
        #pragma omp simd
        for (int l = 0; l < 32; l++) {
            y[64 * j + l] = d0 * (float)(qs[32 * j + l] & 15) - n0;
            y[64 * j + 32 + l] = d1 * (float)(qs[32 * j + l] >> 4) - n1;
        }
    }
}

static inline void gd_q5_k(const uint8_t *b, float *y) {
    const float d = gg_f16(b), dmin = gg_f16(b + 2);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int j = 0; j < 4; j++) {
        int s0, m0, s1, m1;
        gg_scale_min(2 * j, b + 4, &s0, &m0);
        gg_scale_min(2 * j + 1, b + 4, &s1, &m1);
        const float d0 = d * (float)s0, n0 = dmin * (float)m0, d1 = d * (float)s1, n1 = dmin * (float)m1;
        #pragma omp simd
        for (int l = 0; l < 32; l++) {
            const int q0 = (qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
            const int q1 = (qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
            y[64 * j + l] = d0 * (float)q0 - n0;
            y[64 * j + 32 + l] = d1 * (float)q1 - n1;
        }
    }
}

static inline void gd_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = gg_f16(b + 208);
    for (int h = 0; h < 2; h++) {
        float dl[8];
        for (int j = 0; j < 8; j++) dl[j] = d * (float)sc[8 * h + j];
        const uint8_t *l0 = ql + 64 * h, *hh = qh + 32 * h;
        float *o = y + 128 * h;
        for (int s = 0; s < 4; s++)
            for (int c = 0; c < 2; c++) {
                const uint8_t *lb = l0 + 32 * (s & 1) + 16 * c, *hb = hh + 16 * c;
                const int shift = 4 * (s >> 1);
                const float f = dl[2 * s + c];
                float *os = o + 32 * s + 16 * c;
#pragma omp simd
                for (int l = 0; l < 16; l++)
                    os[l] = f * (float)((((lb[l] >> shift) & 15) | (((hb[l] >> (2 * s)) & 3) << 4)) - 32);
            }
    }
}

/* values per block and bytes per block of ggml type t (0 when fxquant does not read it) */
static int gg_block(int t, int *qk, int *ts) {
    switch (t) {
    case 2: *qk = 32, *ts = 18; return 1;
    case 3: *qk = 32, *ts = 20; return 1;
    case 6: *qk = 32, *ts = 22; return 1;
    case 7: *qk = 32, *ts = 24; return 1;
    case 8: *qk = 32, *ts = 34; return 1;
    case 10: *qk = GG_QK_K, *ts = 84; return 1;
    case 11: *qk = GG_QK_K, *ts = 110; return 1;
    case 12: *qk = GG_QK_K, *ts = 144; return 1;
    case 13: *qk = GG_QK_K, *ts = 176; return 1;
    case 14: *qk = GG_QK_K, *ts = 210; return 1;
    default: return 0;
    }
}

/* nb blocks of type t at src -> nb * qk floats at y (the type checked by the caller) */
static void gg_decode(int t, const uint8_t *src, int64_t nb, float *y) {
#define GG_LOOP(fn, qk, ts) \
    for (int64_t i = 0; i < nb; i++) fn(src + i * (ts), y + i * (qk)); \
    break;
    switch (t) {
    case 2: GG_LOOP(gd_q4_0, 32, 18)
    case 3: GG_LOOP(gd_q4_1, 32, 20)
    case 6: GG_LOOP(gd_q5_0, 32, 22)
    case 7: GG_LOOP(gd_q5_1, 32, 24)
    case 8: GG_LOOP(gd_q8_0, 32, 34)
    case 10: GG_LOOP(gd_q2_k, GG_QK_K, 84)
    case 11: GG_LOOP(gd_q3_k, GG_QK_K, 110)
    case 12: GG_LOOP(gd_q4_k, GG_QK_K, 144)
    case 13: GG_LOOP(gd_q5_k, GG_QK_K, 176)
    case 14: GG_LOOP(gd_q6_k, GG_QK_K, 210)
    default: break;
    }
#undef GG_LOOP
}

/* fp32 -> bf16 bits, round to nearest even, NaN kept quiet (torch's conversion) */
static inline uint16_t gg_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u | 0x00400000u) >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Values decoded per piece of a row: a piece of fp32 values stays in L1 between its decode and the
 * dot products that read it (4 KB). */
#define GG_PIECE 1024

/* ---- the row decoder (large-M path: decode a block of rows, then a dense GEMM) ------------------ */
/* rows [rows, row_bytes] of type t -> dst [rows, K] (row stride ld elements) as out_dtype 0 fp32,
 * 1 bf16, 2 fp16 (rounded once to nearest even from the fp32 values).  FXQ_EARG for an unknown type,
 * a row length that is not whole blocks, or fp16 output without F16C. */
typedef void (*gg_decode_fn)(int t, const uint8_t *src, int64_t nb, float *y);

static int gg_dequant(int t, const uint8_t *src, int64_t rows, int64_t row_bytes, void *dst, int64_t ld,
                      int out_dtype, int nthreads, gg_decode_fn decode) {
    int qk, ts;
    if (!gg_block(t, &qk, &ts) || row_bytes % ts || out_dtype < 0 || out_dtype > 2) return FXQ_EARG;
#ifndef __F16C__
    if (out_dtype == 2) return FXQ_EARG;
#endif
    const int64_t nb = row_bytes / ts, K = nb * qk;
    const int64_t piece_blocks = GG_PIECE / qk > 0 ? GG_PIECE / qk : 1;
    float *tmp = NULL;
    if (out_dtype && !(tmp = (float *)fxq_aligned64(sizeof(float) * (size_t)(nthreads * piece_blocks * qk))))
        return FXQ_ENOMEM;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = src + r * row_bytes;
        if (out_dtype == 0) {
            decode(t, row, nb, (float *)dst + r * ld);
            continue;
        }
        float *buf = tmp + (int64_t)omp_get_thread_num() * piece_blocks * qk;
        for (int64_t b0 = 0; b0 < nb; b0 += piece_blocks) {
            const int64_t nbk = nb - b0 < piece_blocks ? nb - b0 : piece_blocks, n = nbk * qk, k0 = b0 * qk;
            decode(t, row + b0 * ts, nbk, buf);
            if (out_dtype == 1) {
                uint16_t *o = (uint16_t *)dst + r * ld + k0;
                for (int64_t i = 0; i < n; i++) o[i] = gg_to_bf16(buf[i]);
            } else {
#ifdef __F16C__
                uint16_t *o = (uint16_t *)dst + r * ld + k0;
                for (int64_t i = 0; i < n; i++) o[i] = _cvtss_sh(buf[i], _MM_FROUND_TO_NEAREST_INT);
#endif
            }
        }
    }
    (void)K;
    free(tmp);
    return FXQ_OK;
}

int fxq_gguf_dequant(int t, const uint8_t *src, int64_t rows, int64_t row_bytes, void *dst, int64_t ld,
                     int out_dtype, int nthreads) {
    return gg_dequant(t, src, rows, row_bytes, dst, ld, out_dtype, nthreads, gg_decode);
}

/* ---- the GEMV: y[m, n] = sum_k x[m, k] W[n, k] ----------------------------------------------------
 * Each thread takes rows of W; a row is decoded a piece (GG_PIECE values) at a time into the thread's
 * buffer and every row of x is dotted with that piece while it is in L1 (the decode is shared by the
 * M rows of x).  With round_x, x is rounded to bf16 once first (the compute_dtype policy). */
typedef void (*gg_dot_fn)(const float *w, const float *x, int64_t K, int64_t n, int64_t M, float *acc);

/* acc[m] += sum_{i < n} w[i] x[m * K + i], plain loops */
static void gg_dot_c(const float *w, const float *x, int64_t K, int64_t n, int64_t M, float *acc) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) s += w[i] * xm[i];
        acc[m] += s;
    }
}

static int gg_gemv(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t row_bytes, int64_t N,
                   float *y, int64_t ldy, int round_x, int nthreads, gg_decode_fn decode, gg_dot_fn dot) {
    int qk, ts;
    if (!gg_block(t, &qk, &ts) || row_bytes % ts || row_bytes / ts * qk != K) return FXQ_EARG;
    const int64_t nb = row_bytes / ts, piece_blocks = GG_PIECE / qk > 0 ? GG_PIECE / qk : 1;
    float *xr;
    if (!(x = fxq_x_rounded(x, M * K, round_x, &xr))) return FXQ_ENOMEM;
    /* per thread: a decoded piece and M partial sums */
    const int64_t per = (piece_blocks * qk + M + 15) / 16 * 16;
    float *ws = (float *)fxq_aligned64(sizeof(float) * (size_t)(nthreads * per));
    if (!ws) {
        free(xr);
        return FXQ_ENOMEM;
    }
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = ws + (int64_t)omp_get_thread_num() * per, *acc = buf + piece_blocks * qk;
#pragma omp for schedule(guided, 8)
        for (int64_t r = 0; r < N; r++) {
            const uint8_t *row = w + r * row_bytes;
            for (int64_t m = 0; m < M; m++) acc[m] = 0.f;
            for (int64_t b0 = 0; b0 < nb; b0 += piece_blocks) {
                const int64_t nbk = nb - b0 < piece_blocks ? nb - b0 : piece_blocks;
                decode(t, row + b0 * ts, nbk, buf);
                dot(buf, x + b0 * qk, K, nbk * qk, M, acc);
            }
            for (int64_t m = 0; m < M; m++) y[m * ldy + r] = acc[m];
        }
    }
    free(ws);
    free(xr);
    return FXQ_OK;
}

int fxq_gguf_gemv(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t row_bytes, int64_t N,
                  float *y, int64_t ldy, int round_x, int nthreads) {
    return gg_gemv(t, x, M, K, w, row_bytes, N, y, ldy, round_x, nthreads, gg_decode, gg_dot_c);
}

#if FXQ_AVX512
/* ---- AVX-512: the same values as the gd_* decoders, 16 per instruction ------------------------------
 * Codes are widened to 32-bit lanes and converted exactly; each value is the same product (and the
 * same single rounding: fmadd(d, q, -m) of an exact d * q) as the reference's.  Each decoder hands
 * its 16-value vectors to gg_emit: stored (mb == 0: the row decoder) or multiplied right away with
 * mb <= MT rows of x (the GEMV: nothing is stored, four accumulator chains per row of x).  The
 * decoders are always_inline and called with constant mb, so each (type, mb) compiles to its own
 * straight-line code. */
#define GG_LO4(v) _mm_and_si128((v), _mm_set1_epi8(15))
#define GG_HI4(v) _mm_and_si128(_mm_srli_epi16((v), 4), _mm_set1_epi8(15))
INLINE __m128i gg_ld16(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
INLINE __m512i gg_w32(__m128i v) { return _mm512_cvtepu8_epi32(v); }
INLINE __m512 gg_f(__m512i v) { return _mm512_cvtepi32_ps(v); }
INLINE __m512i gg_and(__m512i v, int m) { return _mm512_and_si512(v, _mm512_set1_epi32(m)); }

/* the values v of block elements off .. off + 15: y[off ..] = v, or acc += v * x[m, off ..] */
INLINE void gg_emit(__m512 v, int off, float *y, const float *x, int64_t K, const int mb, __m512 *acc) {
    if (mb == 0) {
        _mm512_storeu_ps(y + off, v);
        return;
    }
    const int c = (off >> 4) & 3;
    for (int m = 0; m < mb; m++) acc[4 * m + c] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * K + off), acc[4 * m + c]);
}
#define GG_EMIT_ARGS float *y, const float *x, int64_t K, const int mb, __m512 *acc
#define GG_EMIT(v, off) gg_emit((v), (off), y, x, K, mb, acc)

INLINE void gd512_q4_0(const uint8_t *b, GG_EMIT_ARGS) {
    const __m512 d = _mm512_set1_ps(gg_f16(b));
    const __m128i q = gg_ld16(b + 2);
    const __m512i e = _mm512_set1_epi32(8);
    GG_EMIT(_mm512_mul_ps(d, gg_f(_mm512_sub_epi32(gg_w32(GG_LO4(q)), e))), 0);
    GG_EMIT(_mm512_mul_ps(d, gg_f(_mm512_sub_epi32(gg_w32(GG_HI4(q)), e))), 16);
}

INLINE void gd512_q4_1(const uint8_t *b, GG_EMIT_ARGS) {
    const __m512 d = _mm512_set1_ps(gg_f16(b)), m = _mm512_set1_ps(gg_f16(b + 2));
    const __m128i q = gg_ld16(b + 4);
    GG_EMIT(_mm512_fmadd_ps(d, gg_f(gg_w32(GG_LO4(q))), m), 0);
    GG_EMIT(_mm512_fmadd_ps(d, gg_f(gg_w32(GG_HI4(q))), m), 16);
}

/* q5_x codes: the nibbles plus 16 where bit l (lo) / l + 16 (hi) of qh is set */
INLINE void gg_q5(const uint8_t *qs, uint32_t qh, __m512i *lo, __m512i *hi) {
    const __m128i q = gg_ld16(qs);
    const __m512i sixteen = _mm512_set1_epi32(16);
    *lo = gg_w32(GG_LO4(q));
    *hi = gg_w32(GG_HI4(q));
    *lo = _mm512_mask_add_epi32(*lo, (__mmask16)(qh & 0xFFFF), *lo, sixteen);
    *hi = _mm512_mask_add_epi32(*hi, (__mmask16)(qh >> 16), *hi, sixteen);
}

INLINE void gd512_q5_0(const uint8_t *b, GG_EMIT_ARGS) {
    const __m512 d = _mm512_set1_ps(gg_f16(b));
    __m512i lo, hi;
    gg_q5(b + 6, gg_u32(b + 2), &lo, &hi);
    const __m512i e = _mm512_set1_epi32(16);
    GG_EMIT(_mm512_mul_ps(d, gg_f(_mm512_sub_epi32(lo, e))), 0);
    GG_EMIT(_mm512_mul_ps(d, gg_f(_mm512_sub_epi32(hi, e))), 16);
}

INLINE void gd512_q5_1(const uint8_t *b, GG_EMIT_ARGS) {
    const __m512 d = _mm512_set1_ps(gg_f16(b)), m = _mm512_set1_ps(gg_f16(b + 2));
    __m512i lo, hi;
    gg_q5(b + 8, gg_u32(b + 4), &lo, &hi);
    GG_EMIT(_mm512_fmadd_ps(d, gg_f(lo), m), 0);
    GG_EMIT(_mm512_fmadd_ps(d, gg_f(hi), m), 16);
}

INLINE void gd512_q8_0(const uint8_t *b, GG_EMIT_ARGS) {
    const __m512 d = _mm512_set1_ps(gg_f16(b));
    GG_EMIT(_mm512_mul_ps(d, gg_f(_mm512_cvtepi8_epi32(gg_ld16(b + 2)))), 0);
    GG_EMIT(_mm512_mul_ps(d, gg_f(_mm512_cvtepi8_epi32(gg_ld16(b + 18)))), 16);
}

INLINE void gd512_q2_k(const uint8_t *b, GG_EMIT_ARGS) {
    const float d = gg_f16(b + 80), dmin = gg_f16(b + 82);
    const uint8_t *sc = b, *qs = b + 16;
    for (int h = 0; h < 2; h++)
        for (int half = 0; half < 2; half++) {
            const __m512i w = gg_w32(gg_ld16(qs + 32 * h + 16 * half));
            for (int s = 0; s < 4; s++) {
                const int j = 8 * h + 2 * s + half;
                const __m512 dl = _mm512_set1_ps(d * (float)(sc[j] & 15)), ml = _mm512_set1_ps(-(dmin * (float)(sc[j] >> 4)));
                const __m512 q = gg_f(gg_and(_mm512_srli_epi32(w, 2 * s), 3));
                GG_EMIT(_mm512_fmadd_ps(dl, q, ml), 128 * h + 32 * s + 16 * half);
            }
        }
}

INLINE void gd512_q3_k(const uint8_t *b, GG_EMIT_ARGS) {
    const uint8_t *hm = b, *qs = b + 32, *sb = b + 96;
    const float d = gg_f16(b + 108);
    float dl[16];
    for (int j = 0; j < 16; j++) {
        const int low = j < 8 ? sb[j] & 15 : sb[j - 8] >> 4, high = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
        dl[j] = d * (float)((low | (high << 4)) - 32);
    }
    const __m512i hw[2] = {gg_w32(gg_ld16(hm)), gg_w32(gg_ld16(hm + 16))}, four = _mm512_set1_epi32(4);
    for (int h = 0; h < 2; h++)
        for (int c = 0; c < 2; c++) {
            const __m512i w = gg_w32(gg_ld16(qs + 32 * h + 16 * c));
            for (int s = 0; s < 4; s++) {
                const int t = 4 * h + s;
                const __m512i ql = gg_and(_mm512_srli_epi32(w, 2 * s), 3);
                const __m512i hb = _mm512_slli_epi32(gg_and(_mm512_srli_epi32(hw[c], t), 1), 2);
                const __m512 q = gg_f(_mm512_sub_epi32(_mm512_add_epi32(ql, hb), four));
                GG_EMIT(_mm512_mul_ps(_mm512_set1_ps(dl[2 * t + c]), q), 32 * t + 16 * c);
            }
        }
}

INLINE void gd512_q4_k(const uint8_t *b, GG_EMIT_ARGS) {
    const float d = gg_f16(b), dmin = gg_f16(b + 2);
    const uint8_t *qs = b + 16;
    for (int j = 0; j < 4; j++) {
        int s0, m0, s1, m1;
        gg_scale_min(2 * j, b + 4, &s0, &m0);
        gg_scale_min(2 * j + 1, b + 4, &s1, &m1);
        const __m512 d0 = _mm512_set1_ps(d * (float)s0), n0 = _mm512_set1_ps(-(dmin * (float)m0));
        const __m512 d1 = _mm512_set1_ps(d * (float)s1), n1 = _mm512_set1_ps(-(dmin * (float)m1));
        for (int c = 0; c < 2; c++) {
            const __m128i q = gg_ld16(qs + 32 * j + 16 * c);
            GG_EMIT(_mm512_fmadd_ps(d0, gg_f(gg_w32(GG_LO4(q))), n0), 64 * j + 16 * c);
            GG_EMIT(_mm512_fmadd_ps(d1, gg_f(gg_w32(GG_HI4(q))), n1), 64 * j + 32 + 16 * c);
        }
    }
}

INLINE void gd512_q5_k(const uint8_t *b, GG_EMIT_ARGS) {
    const float d = gg_f16(b), dmin = gg_f16(b + 2);
    const uint8_t *qh = b + 16, *qs = b + 48;
    const __m512i hw[2] = {gg_w32(gg_ld16(qh)), gg_w32(gg_ld16(qh + 16))};
    for (int j = 0; j < 4; j++) {
        int s0, m0, s1, m1;
        gg_scale_min(2 * j, b + 4, &s0, &m0);
        gg_scale_min(2 * j + 1, b + 4, &s1, &m1);
        const __m512 d0 = _mm512_set1_ps(d * (float)s0), n0 = _mm512_set1_ps(-(dmin * (float)m0));
        const __m512 d1 = _mm512_set1_ps(d * (float)s1), n1 = _mm512_set1_ps(-(dmin * (float)m1));
        for (int c = 0; c < 2; c++) {
            const __m128i q = gg_ld16(qs + 32 * j + 16 * c);
            const __m512i h0 = _mm512_slli_epi32(gg_and(_mm512_srli_epi32(hw[c], 2 * j), 1), 4);
            const __m512i h1 = _mm512_slli_epi32(gg_and(_mm512_srli_epi32(hw[c], 2 * j + 1), 1), 4);
            GG_EMIT(_mm512_fmadd_ps(d0, gg_f(_mm512_or_si512(gg_w32(GG_LO4(q)), h0)), n0), 64 * j + 16 * c);
            GG_EMIT(_mm512_fmadd_ps(d1, gg_f(_mm512_or_si512(gg_w32(GG_HI4(q)), h1)), n1), 64 * j + 32 + 16 * c);
        }
    }
}

INLINE void gd512_q6_k(const uint8_t *b, GG_EMIT_ARGS) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = gg_f16(b + 208);
    const __m512i bias = _mm512_set1_epi32(32);
    for (int h = 0; h < 2; h++)
        for (int c = 0; c < 2; c++) {
            const __m128i l0 = gg_ld16(ql + 64 * h + 16 * c), l1 = gg_ld16(ql + 64 * h + 32 + 16 * c);
            const __m512i hv = gg_w32(gg_ld16(qh + 32 * h + 16 * c));
            const __m512i q[4] = {
                _mm512_or_si512(gg_w32(GG_LO4(l0)), _mm512_slli_epi32(gg_and(hv, 3), 4)),
                _mm512_or_si512(gg_w32(GG_LO4(l1)), _mm512_slli_epi32(gg_and(_mm512_srli_epi32(hv, 2), 3), 4)),
                _mm512_or_si512(gg_w32(GG_HI4(l0)), _mm512_slli_epi32(gg_and(_mm512_srli_epi32(hv, 4), 3), 4)),
                _mm512_or_si512(gg_w32(GG_HI4(l1)), _mm512_slli_epi32(_mm512_srli_epi32(hv, 6), 4)),
            };
            for (int s = 0; s < 4; s++) {
                const __m512 dl = _mm512_set1_ps(d * (float)sc[8 * h + 2 * s + c]);
                GG_EMIT(_mm512_mul_ps(dl, gg_f(_mm512_sub_epi32(q[s], bias))), 128 * h + 32 * s + 16 * c);
            }
        }
}

/* one call per (type, mb): nb blocks from src; mb == 0 stores QK values per block at y, else adds the
 * products with x (row stride K, advancing QK per block) into acc */
#define GG_BLOCKS(fn, qk, ts, mb_)                                                                \
    for (int64_t i = 0; i < nb; i++) {                                                           \
        _mm_prefetch((const char *)(src + i * (ts)) + GG_PF, _MM_HINT_T0);                       \
        fn(src + i * (ts), y ? y + i * (qk) : NULL, x ? x + i * (qk) : NULL, K, mb_, acc);         \
    }
/* bytes ahead of the block being decoded that the GEMV prefetches (the next rows' blocks, past the
 * hardware prefetcher's reach at a row change); not tuned on a quiet machine */
#define GG_PF 1024

#define GG_TYPES(CASE, mb_)                  \
    switch (t) {                             \
    case 2: CASE(gd512_q4_0, 32, 18, mb_)    \
    case 3: CASE(gd512_q4_1, 32, 20, mb_)    \
    case 6: CASE(gd512_q5_0, 32, 22, mb_)    \
    case 7: CASE(gd512_q5_1, 32, 24, mb_)    \
    case 8: CASE(gd512_q8_0, 32, 34, mb_)    \
    case 10: CASE(gd512_q2_k, 256, 84, mb_)  \
    case 11: CASE(gd512_q3_k, 256, 110, mb_) \
    case 12: CASE(gd512_q4_k, 256, 144, mb_) \
    case 13: CASE(gd512_q5_k, 256, 176, mb_) \
    case 14: CASE(gd512_q6_k, 256, 210, mb_) \
    default: break;                          \
    }
#define GG_CASE(fn, qk, ts, mb_) GG_BLOCKS(fn, qk, ts, mb_) break;

/* the row decoder's decode: nb blocks -> y */
static void gg_decode512(int t, const uint8_t *src, int64_t nb, float *y) {
    const float *x = NULL;
    const int64_t K = 0;
    __m512 *acc = NULL;
    GG_TYPES(GG_CASE, 0)
}

/* out[m] = sum_k x[m, k] W[row, k] for the mb rows of x at x (stride K), the row's nb blocks at src */
INLINE void gg_row_dot(int t, const uint8_t *src, int64_t nb, const float *x, int64_t K, const int mb, float *out) {
    __m512 acc[4 * MT];
    float *y = NULL;
    for (int i = 0; i < 4 * mb; i++) acc[i] = _mm512_setzero_ps();
    GG_TYPES(GG_CASE, mb)
    for (int m = 0; m < mb; m++)
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[4 * m], acc[4 * m + 1]),
                                                    _mm512_add_ps(acc[4 * m + 2], acc[4 * m + 3])));
}

/* acc[m] += sum_{i < n} w[i] x[m * K + i] (w 64-byte aligned): up to MT rows of x share each load of w */
INLINE void gg_dot512_tile(const float *w, const float *x, int64_t K, int64_t n, const int mb, float *acc) {
    __m512 a[MT][2];
    for (int m = 0; m < mb; m++) a[m][0] = a[m][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 w0 = _mm512_load_ps(w + i), w1 = _mm512_load_ps(w + i + 16);
        for (int m = 0; m < mb; m++) {
            a[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + i), a[m][0]);
            a[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + i + 16), a[m][1]);
        }
    }
    for (; i < n; i += 16) {
        const __mmask16 mk = tail16(n - i);
        const __m512 w0 = _mm512_maskz_loadu_ps(mk, w + i);
        for (int m = 0; m < mb; m++) a[m][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mk, x + m * K + i), a[m][0]);
    }
    for (int m = 0; m < mb; m++) acc[m] += _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}

static void gg_dot512(const float *w, const float *x, int64_t K, int64_t n, int64_t M, float *acc) {
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int mb = M - m0 < MT ? (int)(M - m0) : MT;
#define GG_CALL(c) gg_dot512_tile(w, x + m0 * K, K, n, c, acc + m0)
        DISPATCH_MB(mb, GG_CALL)
#undef GG_CALL
    }
}

/* M <= MT: each row decoded in registers and multiplied at once (nothing stored); larger M: each row
 * decoded a piece at a time into L1 and every row of x dotted with it (gg_gemv), so the decode is
 * shared by all M rows instead of repeated per tile of MT. */
int fxq512_gguf_gemv(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t row_bytes, int64_t N,
                     float *y, int64_t ldy, int round_x, int nthreads) {
    int qk, ts;
    if (!gg_block(t, &qk, &ts) || row_bytes % ts || row_bytes / ts * qk != K) return FXQ_EARG;
    if (M > MT) return gg_gemv(t, x, M, K, w, row_bytes, N, y, ldy, round_x, nthreads, gg_decode512, gg_dot512);
    const int64_t nb = row_bytes / ts;
    float *xr;
    if (!(x = fxq_x_rounded(x, M * K, round_x, &xr))) return FXQ_ENOMEM;
#pragma omp parallel for schedule(guided, 8) num_threads(nthreads)
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *row = w + r * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mb = M - m0 < MT ? (int)(M - m0) : MT;
            float out[MT];
#define GG_CALL(c) gg_row_dot(t, row, nb, x + m0 * K, K, c, out)
            DISPATCH_MB(mb, GG_CALL)
#undef GG_CALL
            for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + r] = out[i];
        }
    }
    free(xr);
    return FXQ_OK;
}

int fxq512_gguf_dequant(int t, const uint8_t *src, int64_t rows, int64_t row_bytes, void *dst, int64_t ld,
                        int out_dtype, int nthreads) {
    return gg_dequant(t, src, rows, row_bytes, dst, ld, out_dtype, nthreads, gg_decode512);
}
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
        if (t == 2) { blk = row + 18 * b; d = gg_f16(blk); idx = gb_legacy_words(blk + 2, 0, 0); }
        else if (t == 3) { blk = row + 20 * b; d = gg_f16(blk); mn = gg_f16(blk + 2); idx = gb_legacy_words(blk + 4, 0, 0); }
        else if (t == 6) { blk = row + 22 * b; d = gg_f16(blk); idx = gb_legacy_words(blk + 6, 1, gg_u32(blk + 2)); }
        else { blk = row + 24 * b; d = gg_f16(blk); mn = gg_f16(blk + 2); idx = gb_legacy_words(blk + 8, 1, gg_u32(blk + 4)); }
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
        const __m512i qh = t == 13 ? _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blk + 16))) : _mm512_setzero_si512();
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
                const __m512i idx = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qh, 2 * s), three), 4));
                const __m512i w = _mm512_permutex2var_epi16(t0, idx, t1);
                const int j = 8 * h + 2 * s; /* sub-blocks j (values 0..15 of the 32) and j + 1 */
                const __m512 a = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(d * (float)sc[j]),
                                                      _mm512_set1_ps(d * (float)sc[j + 1]));
                for (int m = 0; m < mb; m++)
                    acc[m][s & 1] = _mm512_fmadd_ps(a, gb_dot(w, x + m * X->K + 256 * b + 128 * h + 32 * s), acc[m][s & 1]);
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
#endif /* FXQ_AVX512 */
