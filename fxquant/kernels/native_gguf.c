/* GGUF block types (fxquant/formats/gguf.py): a small-M GEMV and a row decoder that read the file's
 * block bytes in place.  Compiled into the one library of native_cpu.py with the other kernels.
 *
 * Every value is decoded exactly as the reference (and the gguf package) computes it: each product of
 * the fp16 scales, the small integer sub-block scales and the codes is exact in fp32, and the one
 * rounding (the "+ m" / "- dmin * m_j") is the same whether or not the compiler fuses it into an FMA.
 * So the fp32 GEMVs multiply x by the reference's weight values and sum in fp32: only the order of
 * the fp32 sums differs from the reference.
 *
 * Three files, as for the other formats: this one (fxq_gguf_*: plain C loops the compiler vectorises
 * for the target, the "avx2" set), native_gguf_avx512.c (fxq512_gguf_gemv / _dequant: AVX-512
 * decoders, in registers for up to 4 rows of x) and native_gguf_bf16.c (fxq512_gguf_bf16_gemv: for
 * bf16 values of x, integer codes looked up as bf16 and summed by vdpbf16ps); native_gguf.h holds
 * what they share.  Byte maps: the docstrings of fxquant/formats/gguf_legacy.py and gguf_kquants.py.
 */
#include "native_gguf.h"

/* ---- the decoders: one block -> its QK values ------------------------------------------------- */
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

int fxq_gguf_dequant(int t, const uint8_t *src, int64_t rows, int64_t row_bytes, void *dst, int64_t ld,
                     int out_dtype, int nthreads) {
    return gg_dequant(t, src, rows, row_bytes, dst, ld, out_dtype, nthreads, gg_decode);
}

/* ---- the GEMV (gg_gemv, native_gguf.h) with plain-loop dot products ------------------------------- */
/* acc[m] += sum_{i < n} w[i] x[m * K + i] */
static void gg_dot_c(const float *w, const float *x, int64_t K, int64_t n, int64_t M, float *acc) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; i++) s += w[i] * xm[i];
        acc[m] += s;
    }
}

int fxq_gguf_gemv(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t row_bytes, int64_t N,
                  float *y, int64_t ldy, int round_x, int nthreads) {
    return gg_gemv(t, x, M, K, w, row_bytes, N, y, ldy, round_x, nthreads, gg_decode, gg_dot_c);
}

