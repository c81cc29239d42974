/* fxquant native CPU kernels, AVX512-BF16: the int4 tile GEMMs for large M (layout: fxq512_int4t_gemv),
 * on the machinery of native_avx512_gemm.h. */
#include <stdlib.h>
#include <string.h>

#include "native_avx512.h"

#if FXQ_AVX512
#if FXQ_BF16DOT

#include "native_avx512_gemm.h"

/* int4 tiles: x pairs broadcast from a block of nr rows packed [p][nr], weight pairs bp[p][64] */
GM_FAMILY(gm4_ukr, 1, nr_, 64, 2)

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
