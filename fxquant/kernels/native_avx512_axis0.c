/* fxquant native CPU kernels, AVX-512: the axis-0 intx GEMV (fxq512_int4t_axis0_gemv; split from
 * native_avx512.c, whose int4 tile GEMV reads the same nibble-pair bytes: native_avx512.h). */
#include "native_avx512.h"

#if FXQ_AVX512

/* ---------------------------------------------------------------------------------------------
 * intx grouped along axis 0 (fxquant/formats/intx.py): codes in int4 tile order (native_cpu.c, fxq_int4t_gemv), but
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


#endif /* FXQ_AVX512 */
