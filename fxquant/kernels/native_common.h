/* Scalar helpers shared by the native GEMV kernels of every instruction set (native_cpu.c: AVX2,
 * native_avx512.c: AVX-512): bf16 decoding, per-group sums of x, per-row block scales. */
#ifndef FXQ_NATIVE_COMMON_H
#define FXQ_NATIVE_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Status of the kernels that allocate (every exported kernel returns one): 0 done; FXQ_ENOMEM an
 * allocation failed and nothing was written (native_cpu.py raises MemoryError); FXQ_EARG the
 * arguments name a layout the kernel does not compute (ValueError). */
#define FXQ_OK 0
#define FXQ_ENOMEM (-1)
#define FXQ_EARG (-2)

#ifdef FXQ_FAULT_INJECT
/* Test builds only (-DFXQ_FAULT_INJECT, tests/ops/test_native_alloc.py): fxq_fail_alloc(n) makes the
 * n-th allocation request from now fail (1: the next one), then requests succeed again.  Defined in
 * native_cpu.c; production builds have neither the counter nor its check. */
extern int fxq_fault_countdown;
static inline int fxq_fault_now(void) {
    /* compare-and-swap: threads allocating at once never take the count below 0 */
    int n = __atomic_load_n(&fxq_fault_countdown, __ATOMIC_RELAXED);
    while (n > 0)
        if (__atomic_compare_exchange_n(&fxq_fault_countdown, &n, n - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return n == 1;
    return 0;
}
#define FXQ_FAULT() fxq_fault_now()
#else
#define FXQ_FAULT() 0
#endif

/* Every allocation of the kernels goes through these (NULL on failure, which the caller checks);
 * at least one byte, so that an empty request is not mistaken for a failure. */
static inline void *fxq_malloc(size_t bytes) {
    return FXQ_FAULT() ? NULL : malloc(bytes ? bytes : 1);
}
static inline void *fxq_aligned64(size_t bytes) {
    return FXQ_FAULT() ? NULL : aligned_alloc(64, bytes ? (bytes + 63) / 64 * 64 : 64);
}

static inline float fxq_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* out[i] = x[i] rounded to the nearest bf16 (ties to even; NaN stays NaN), as fp32: torch's fp32 -> bf16
 * conversion, for the fp32 kernels' round_x (the compute_dtype policy rounds fp32 activations once) */
static inline void fxq_round_bf16_into(const float *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        const uint32_t r = (u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x00400000u) & 0xFFFF0000u
                                                            : (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
        memcpy(out + i, &r, 4);
    }
}

/* x rounded as fxq_round_bf16_into into a new buffer (*buf, freed by the caller) when round_x, else x
 * itself (*buf NULL); NULL when that allocation fails */
static inline const float *fxq_x_rounded(const float *x, int64_t n, int round_x, float **buf) {
    *buf = NULL;
    if (!round_x) return x;
    if (!(*buf = (float *)fxq_malloc(sizeof(float) * (size_t)n))) return NULL;
    fxq_round_bf16_into(x, n, *buf);
    return *buf;
}

/* xb[m, k] = x'[m, k] * b[k] for k < K (x' = x, or x rounded to bf16 with round_x; b bf16), 0 up to KP:
 * OneBit's x ⊙ b (one fp32 rounding, exact when x' is bf16), zero-padded to whole bytes of signs */
static inline void fxq_onebit_xb(const float *x, int64_t M, int64_t K, const uint16_t *b, int64_t KP, int round_x,
                                 float *xb) {
    for (int64_t m = 0; m < M; m++) {
        float *d = xb + m * KP;
        if (round_x) fxq_round_bf16_into(x + m * K, K, d);
        else memcpy(d, x + m * K, sizeof(float) * (size_t)K);
        for (int64_t k = 0; k < K; k++) d[k] *= fxq_bf16(b[k]);
        for (int64_t k = K; k < KP; k++) d[k] = 0.f;
    }
}

/* xs[m*G + j] = sum of x[m, j*gs : (j+1)*gs] (x fp32 [M, G*gs]) */
static inline void fxq_group_sums(const float *x, int64_t M, int64_t G, int64_t gs, float *xs) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < G; j++) {
            float s = 0.f;
            for (int64_t k = 0; k < gs; k++) s += x[(m * G + j) * gs + k];
            xs[m * G + j] = s;
        }
}

/* The nblk block scales of table-code row n (fxq_lut4_gemv): mode 0 fp32 sc[b], mode 1 bf16 sc[b],
 * mode 2 bitsandbytes double quant dq_code[u8 sc[b]] * dq_scale[b / dq_block] + dq_offset. */
static inline void fxq_row_scales(int64_t n, int64_t nblk, int mode, const void *sc, const float *dq_code,
                                  const float *dq_scale, float dq_offset, int64_t dq_block, float *out) {
    const int64_t b0 = n * nblk;
    if (mode == 0) {
        memcpy(out, (const float *)sc + b0, sizeof(float) * (size_t)nblk);
    } else if (mode == 1) {
        for (int64_t blk = 0; blk < nblk; blk++) out[blk] = fxq_bf16(((const uint16_t *)sc)[b0 + blk]);
    } else {
        const uint8_t *q = (const uint8_t *)sc + b0;
        int64_t nested = b0 / dq_block, left = dq_block - b0 % dq_block;
        for (int64_t blk = 0; blk < nblk; blk++) {
            out[blk] = dq_code[q[blk]] * dq_scale[nested] + dq_offset;
            if (--left == 0) { nested++; left = dq_block; }
        }
    }
}

/* the OneBit row total sum_k xb[m, k], per m */
static inline void fxq_row_totals(const float *xb, int64_t M, int64_t K, float *tot) {
    for (int64_t m = 0; m < M; m++) {
        float s = 0.f;
        for (int64_t k = 0; k < K; k++) s += xb[m * K + k];
        tot[m] = s;
    }
}

#endif
