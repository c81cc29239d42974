/* VPTQ (fxquant/formats/vptq.py): the small-M GEMV and the row decoder of the large-M path, reading the packed
 * index streams in place.  Compiled into the one library of native_cpu.py with the other kernels.
 *
 * Layout: indices int32 [G, R, W]: row (g, r) is one little-endian bit stream of gs merged indices of tb bits,
 * (res << ib) | idx; codebooks (passed as fp32 copies) cent [G, C, v], res [G, CR, v]; outlier indices uint16
 * (int16 bits) [Ro, o], outlier codebook ocent [Co, vo].  Wp (the stored column order) is
 * Wp[r*v + j, o + g*gs + c] = cent[g, idx, j] + res[g, ridx, j] and Wp[ro*vo + j, c < o] = ocent[oidx[ro, c], j].
 * The wrappers (native_vptq.py) move the permutation and the norm to x: x arrives as fp32 [M, K] in the stored
 * column order, times the per-column scale (the GEMV), or the scale comes as s_p [K] (the decoder).
 *
 * GEMV: output rows are computed VQ_MT rows of x at a time per index row r (threads split the index rows): the
 * index stream is read once per VQ_MT rows of x, each index adds x * codebook vector (v lanes) into v fp32 sums.
 * fp32 products and sums: the reference's values up to fp32 summation order (for v = 4 and 8 the two codebook
 * vectors are added first, as the reference does; other lengths add each to the sums).
 * Decoder: rows n0 .. n1 of Wp * s_p (fp32 sums and products), written as fp32 or rounded once to bf16.
 *
 * Two names per kernel, as for the other formats: fxq_vptq_* and, when compiled for AVX-512, fxq512_vptq_*
 * (the same plain C loops, which the compiler vectorises for the target).
 */
#include "native_avx512.h"

#define VQ_MT 4       /* rows of x per pass over the indices */
#define VQ_MAX_V 64   /* longest vector the kernels take (FXQ_EARG above; the wrappers fall back) */

typedef struct {
    const uint32_t *p;
    uint64_t buf;
    int have;
} vq_bits;

/* The next tb-bit index of a row's stream (tb <= 32: at most one more word is needed per index). */
static inline uint32_t vq_next(vq_bits *b, int tb, uint64_t mask) {
    if (b->have < tb) {
        b->buf |= (uint64_t)(*b->p++) << b->have;
        b->have += 32;
    }
    const uint32_t v = (uint32_t)(b->buf & mask);
    b->buf >>= tb;
    b->have -= tb;
    return v;
}

/* acc[m][0..v) += x[m] * vec[0..v) for mb rows of x; v a compile-time constant where the caller inlines it */
static inline __attribute__((always_inline)) void vq_axpy(float acc[VQ_MT][VQ_MAX_V], const float *xs, int64_t xstride,
                                                          int mb, const float *vec, int64_t v) {
    for (int m = 0; m < mb; m++) {
        const float xv = xs[m * xstride];
        for (int64_t j = 0; j < v; j++) acc[m][j] += xv * vec[j];
    }
}

static inline __attribute__((always_inline)) void vq_row(const float *x, int64_t K, int mb, const int32_t *indices,
                                                         int64_t G, int64_t R, int64_t W, int64_t gs, int64_t o,
                                                         int ib, int tb, const float *cent, int64_t C,
                                                         const float *res, int64_t CR, int64_t v, int64_t r,
                                                         float acc[VQ_MT][VQ_MAX_V]) {
    const uint64_t mask = tb == 32 ? 0xFFFFFFFFull : ((1ull << tb) - 1);
    const uint32_t imask = (1u << ib) - 1;
    for (int64_t g = 0; g < G; g++) {
        vq_bits b = {(const uint32_t *)(indices + (g * R + r) * W), 0, 0};
        const float *cg = cent + g * C * v, *rg = res ? res + g * CR * v : NULL;
        const float *xg = x + o + g * gs;
        for (int64_t c = 0; c < gs; c++) {
            const uint32_t t = vq_next(&b, tb, mask);
            vq_axpy(acc, xg + c, K, mb, cg + (int64_t)(t & imask) * v, v);
            if (rg) vq_axpy(acc, xg + c, K, mb, rg + (int64_t)(t >> ib) * v, v);
        }
    }
}

/* The same for v = 4 / 8 with the mb rows' sums in vector registers (GCC vector extensions: one fused multiply-add
 * of v lanes per index and row of x) and the two codebook vectors added first, as the reference does. */
typedef float vq_f4 __attribute__((vector_size(16)));
typedef float vq_f8 __attribute__((vector_size(32)));
#define VQ_VROW(NAME_, VT_, VL_)                                                                                      \
    static inline __attribute__((always_inline)) void NAME_(                                                         \
        const float *x, int64_t K, const int mb, const int32_t *indices, int64_t G, int64_t R, int64_t W, int64_t gs, \
        int64_t o, int ib, int tb, const float *cent, int64_t C, const float *res, int64_t CR, int64_t r,            \
        float acc_out[VQ_MT][VQ_MAX_V]) {                                                                             \
        const uint64_t mask = tb == 32 ? 0xFFFFFFFFull : ((1ull << tb) - 1);                                          \
        const uint32_t imask = (1u << ib) - 1;                                                                        \
        VT_ acc[VQ_MT];                                                                                               \
        for (int m = 0; m < mb; m++) acc[m] = (VT_){0};                                                               \
        for (int64_t g = 0; g < G; g++) {                                                                             \
            vq_bits b = {(const uint32_t *)(indices + (g * R + r) * W), 0, 0};                                        \
            const float *cg = cent + g * C * VL_, *rg = res ? res + g * CR * VL_ : NULL;                              \
            const float *xg = x + o + g * gs;                                                                         \
            for (int64_t c = 0; c < gs; c++) {                                                                        \
                const uint32_t t = vq_next(&b, tb, mask);                                                             \
                VT_ w;                                                                                                \
                memcpy(&w, cg + (int64_t)(t & imask) * VL_, sizeof w);                                                \
                if (rg) {                                                                                             \
                    VT_ rv;                                                                                           \
                    memcpy(&rv, rg + (int64_t)(t >> ib) * VL_, sizeof rv);                                            \
                    w += rv;                                                                                          \
                }                                                                                                     \
                for (int m = 0; m < mb; m++) acc[m] += xg[m * K + c] * w;                                             \
            }                                                                                                         \
        }                                                                                                             \
        for (int m = 0; m < mb; m++) memcpy(acc_out[m], &acc[m], sizeof acc[m]);                                      \
    }
VQ_VROW(vq_row4, vq_f4, 4)
VQ_VROW(vq_row8, vq_f8, 8)

#define VQ_ROWS_MB(FN_, MB_) FN_(xm, K, MB_, indices, G, R, W, gs, o, ib, tb, cent, C, res, CR, r, acc)
#define VQ_DISPATCH_MB(FN_)                                                                                           \
    switch (mb) {                                                                                                     \
        case 1: VQ_ROWS_MB(FN_, 1); break;                                                                            \
        case 2: VQ_ROWS_MB(FN_, 2); break;                                                                            \
        case 3: VQ_ROWS_MB(FN_, 3); break;                                                                            \
        default: VQ_ROWS_MB(FN_, 4); break;                                                                           \
    }

static int vq_gemv(const float *x, int64_t M, int64_t K, const int32_t *indices, int64_t G, int64_t R, int64_t W,
                   int64_t gs, int64_t o, int ib, int tb, const float *cent, int64_t C, const float *res, int64_t CR,
                   int64_t v, const int16_t *oidx, const float *ocent, int64_t vo, int64_t N, float *y, int64_t ldy,
                   int nthreads) {
    if (v < 1 || v > VQ_MAX_V || (o && (vo < 1 || vo > VQ_MAX_V)) || tb < 1 || tb > 32 || ib < 1 || ib > tb ||
        o + G * gs != K)
        return FXQ_EARG;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) {
        float acc[VQ_MT][VQ_MAX_V];
        for (int64_t m0 = 0; m0 < M; m0 += VQ_MT) {
            const int mb = (int)(M - m0 < VQ_MT ? M - m0 : VQ_MT);
            const float *xm = x + m0 * K;
            if (v == 4) {
                VQ_DISPATCH_MB(vq_row4)
            } else if (v == 8) {
                VQ_DISPATCH_MB(vq_row8)
            } else {
                for (int m = 0; m < mb; m++)
                    for (int64_t j = 0; j < v; j++) acc[m][j] = 0.0f;
                vq_row(xm, K, mb, indices, G, R, W, gs, o, ib, tb, cent, C, res, CR, v, r, acc);
            }
            for (int m = 0; m < mb; m++)
                for (int64_t j = 0; j < v && r * v + j < N; j++) y[(m0 + m) * ldy + r * v + j] = acc[m][j];
        }
    }
    if (!o) return FXQ_OK;
    const int64_t RO = (N + vo - 1) / vo;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t ro = 0; ro < RO; ro++) {
        float acc[VQ_MT][VQ_MAX_V];
        const int16_t *oi = oidx + ro * o;
        for (int64_t m0 = 0; m0 < M; m0 += VQ_MT) {
            const int mb = (int)(M - m0 < VQ_MT ? M - m0 : VQ_MT);
            for (int m = 0; m < mb; m++)
                for (int64_t j = 0; j < vo; j++) acc[m][j] = 0.0f;
            for (int64_t c = 0; c < o; c++)
                vq_axpy(acc, x + m0 * K + c, K, mb, ocent + (int64_t)(uint16_t)oi[c] * vo, vo);
            for (int m = 0; m < mb; m++)
                for (int64_t j = 0; j < vo && ro * vo + j < N; j++) y[(m0 + m) * ldy + ro * vo + j] += acc[m][j];
        }
    }
    return FXQ_OK;
}

static inline uint16_t vq_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u | 0x00400000u) >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline void vq_put(void *out, int bf16, int64_t i, float value) {
    if (bf16)
        ((uint16_t *)out)[i] = vq_bf16(value);
    else
        ((float *)out)[i] = value;
}

static int vq_decode(const int32_t *indices, int64_t G, int64_t R, int64_t W, int64_t gs, int64_t o, int ib, int tb,
                     const float *cent, int64_t C, const float *res, int64_t CR, int64_t v, const int16_t *oidx,
                     const float *ocent, int64_t vo, int64_t N, const float *scale, int64_t n0, int64_t n1, void *out,
                     int64_t ld, int out_dtype, int nthreads) {
    if (v < 1 || (o && vo < 1) || tb < 1 || tb > 32 || ib < 1 || ib > tb || n0 < 0 || n1 > N || n0 > n1 ||
        (out_dtype != 0 && out_dtype != 1))
        return FXQ_EARG;
    const int bf16 = out_dtype == 1;
    const uint64_t mask = tb == 32 ? 0xFFFFFFFFull : ((1ull << tb) - 1);
    const uint32_t imask = (1u << ib) - 1;
    const int64_t r0 = n0 / v, r1 = (n1 + v - 1) / v;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = r0; r < r1; r++) {
        const int64_t j0 = r * v < n0 ? n0 - r * v : 0, j1 = r * v + v > n1 ? n1 - r * v : v;
        for (int64_t g = 0; g < G; g++) {
            vq_bits b = {(const uint32_t *)(indices + (g * R + r) * W), 0, 0};
            const float *cg = cent + g * C * v, *rg = res ? res + g * CR * v : NULL;
            for (int64_t c = 0; c < gs; c++) {
                const uint32_t t = vq_next(&b, tb, mask);
                const int64_t col = o + g * gs + c;
                const float s = scale ? scale[col] : 1.0f;
                const float *cv = cg + (int64_t)(t & imask) * v, *rv = rg ? rg + (int64_t)(t >> ib) * v : NULL;
                for (int64_t j = j0; j < j1; j++)
                    vq_put(out, bf16, (r * v + j - n0) * ld + col, (rv ? cv[j] + rv[j] : cv[j]) * s);
            }
        }
    }
    if (!o) return FXQ_OK;
    const int64_t q0 = n0 / vo, q1 = (n1 + vo - 1) / vo;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t ro = q0; ro < q1; ro++) {
        const int64_t j0 = ro * vo < n0 ? n0 - ro * vo : 0, j1 = ro * vo + vo > n1 ? n1 - ro * vo : vo;
        for (int64_t c = 0; c < o; c++) {
            const float s = scale ? scale[c] : 1.0f;
            const float *ov = ocent + (int64_t)(uint16_t)oidx[ro * o + c] * vo;
            for (int64_t j = j0; j < j1; j++) vq_put(out, bf16, (ro * vo + j - n0) * ld + c, ov[j] * s);
        }
    }
    return FXQ_OK;
}

int fxq_vptq_gemv(const float *x, int64_t M, int64_t K, const int32_t *indices, int64_t G, int64_t R, int64_t W,
                  int64_t gs, int64_t o, int ib, int tb, const float *cent, int64_t C, const float *res, int64_t CR,
                  int64_t v, const int16_t *oidx, const float *ocent, int64_t vo, int64_t N, float *y, int64_t ldy,
                  int nthreads) {
    return vq_gemv(x, M, K, indices, G, R, W, gs, o, ib, tb, cent, C, res, CR, v, oidx, ocent, vo, N, y, ldy, nthreads);
}

int fxq_vptq_decode(const int32_t *indices, int64_t G, int64_t R, int64_t W, int64_t gs, int64_t o, int ib, int tb,
                    const float *cent, int64_t C, const float *res, int64_t CR, int64_t v, const int16_t *oidx,
                    const float *ocent, int64_t vo, int64_t N, const float *scale, int64_t n0, int64_t n1, void *out,
                    int64_t ld, int out_dtype, int nthreads) {
    return vq_decode(indices, G, R, W, gs, o, ib, tb, cent, C, res, CR, v, oidx, ocent, vo, N, scale, n0, n1, out, ld,
                     out_dtype, nthreads);
}

#if FXQ_AVX512
int fxq512_vptq_gemv(const float *x, int64_t M, int64_t K, const int32_t *indices, int64_t G, int64_t R, int64_t W,
                     int64_t gs, int64_t o, int ib, int tb, const float *cent, int64_t C, const float *res, int64_t CR,
                     int64_t v, const int16_t *oidx, const float *ocent, int64_t vo, int64_t N, float *y, int64_t ldy,
                     int nthreads) {
    return vq_gemv(x, M, K, indices, G, R, W, gs, o, ib, tb, cent, C, res, CR, v, oidx, ocent, vo, N, y, ldy, nthreads);
}

int fxq512_vptq_decode(const int32_t *indices, int64_t G, int64_t R, int64_t W, int64_t gs, int64_t o, int ib, int tb,
                       const float *cent, int64_t C, const float *res, int64_t CR, int64_t v, const int16_t *oidx,
                       const float *ocent, int64_t vo, int64_t N, const float *scale, int64_t n0, int64_t n1,
                       void *out, int64_t ld, int out_dtype, int nthreads) {
    return vq_decode(indices, G, R, W, gs, o, ib, tb, cent, C, res, CR, v, oidx, ocent, vo, N, scale, n0, n1, out, ld,
                     out_dtype, nthreads);
}
#endif /* FXQ_AVX512 */
