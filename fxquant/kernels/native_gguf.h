/* Shared by the GGUF kernels (native_gguf.c: plain C; native_gguf_avx512.c: AVX-512 fp32;
 * native_gguf_bf16.c: AVX512-BF16 dot products): block sizes, fp16 scales, the q4_k / q5_k scale
 * unpacking, and the two drivers each build plugs its decoder into (the row decoder of the large-M path
 * and the piecewise GEMV).  Only static inline code: each .c includes it.  Types are numbered as ggml
 * numbers them (gguf.GGMLQuantizationType): 2 q4_0, 3 q4_1, 6 q5_0, 7 q5_1, 8 q8_0, 10 q2_k, 11 q3_k,
 * 12 q4_k, 13 q5_k, 14 q6_k; byte maps: fxquant/formats/gguf_legacy.py and gguf_kquants.py. */
#ifndef FXQ_NATIVE_GGUF_H
#define FXQ_NATIVE_GGUF_H

#include "native_avx512.h"

#ifdef __F16C__
#include <immintrin.h>
#endif

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

static inline uint32_t gg_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
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

/* values per block and bytes per block of ggml type t (0 when fxquant does not read it) */
static inline int gg_block(int t, int *qk, int *ts) {
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

/* fp32 -> bf16 bits, round to nearest even, NaN kept quiet (torch's conversion) */
static inline uint16_t gg_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u | 0x00400000u) >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* bytes ahead of the block being decoded that the GEMV prefetches (the next rows' blocks, past the
 * hardware prefetcher's reach at a row change); not tuned on a quiet machine */
#define GG_PF 1024

/* Values decoded per piece of a row: a piece of fp32 values stays in L1 between its decode and the
 * dot products that read it (4 KB). */
#define GG_PIECE 1024

/* ---- the row decoder (large-M path: decode a block of rows, then a dense GEMM) ------------------ */
/* rows [rows, row_bytes] of type t -> dst [rows, K] (row stride ld elements) as out_dtype 0 fp32,
 * 1 bf16, 2 fp16 (rounded once to nearest even from the fp32 values).  FXQ_EARG for an unknown type,
 * a row length that is not whole blocks, or fp16 output without F16C. */
typedef void (*gg_decode_fn)(int t, const uint8_t *src, int64_t nb, float *y);

static inline int gg_dequant(int t, const uint8_t *src, int64_t rows, int64_t row_bytes, void *dst, int64_t ld,
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

/* ---- the GEMV: y[m, n] = sum_k x[m, k] W[n, k] ----------------------------------------------------
 * Each thread takes rows of W; a row is decoded a piece (GG_PIECE values) at a time into the thread's
 * buffer and every row of x is dotted with that piece while it is in L1 (the decode is shared by the
 * M rows of x).  With round_x, x is rounded to bf16 once first (the compute_dtype policy). */
typedef void (*gg_dot_fn)(const float *w, const float *x, int64_t K, int64_t n, int64_t M, float *acc);

static inline int gg_gemv(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t row_bytes, int64_t N,
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

#endif
