/* fxquant native CPU kernels, AVX512-BF16: the weight-only GEMMs for large M (split from
 * native_avx512_bf16.c, which holds the bf16 dot-product GEMVs). */
#include <stdlib.h>
#include <string.h>

#include "native_avx512.h"

#if FXQ_AVX512
#if FXQ_BF16DOT

/* ---------------------------------------------------------------------------------------------
 * Weight-only GEMM for large M: y [M, N] = (x [M, K] bf16 @ W.T) * rs[N], W decoded to bf16 a
 * panel of GM_NR weight rows x GM_KC columns at a time, straight into the buffer the microkernel
 * reads (the decoded weight never leaves L1/L2; dense bf16 GEMMs instead read a bf16 weight
 * twice the size of int8 codes).  Microkernel: GM_NR weight rows x 32 rows of x, 28 fp32
 * accumulators; per pair of k, two vectors of x pairs (x.T packed once per call: xt[mb][p][32])
 * and one broadcast dword (two bf16 of a weight row) per weight row, vdpbf16ps.  The broadcast
 * side reads decoded rows at a stride that is not a multiple of 4 KB (rows at 4 KB strides share
 * an L1 set).  The accumulators of all M rows of a thread's block of panels stay in a per-thread
 * buffer ct [panel][GM_NR][Mp]; stored transposed into y when the block ends.  Measured (11008x4096, M=256, 2 threads,
 * interleaved medians): 57.5 ms vs bf16 F.linear 57.4 ms (the blocked decode + dense GEMM it
 * replaces: 72-77 ms); x.T rows at the weight stride and gathers for the transposed weight were
 * slower (95 ms, 70 ms).  Then (same-process medians, M=256, ms, before / after): each panel's decode
 * moved into the microkernel calls of the panel before it (perf: the separate decode was 5-7% of the
 * microkernel time, mostly stalled on its loads), 11008x4096 61.9 / 58.0; the x.T packing and the
 * output by 16 x 16 register transposes instead of gathers, 4096x4096 24.2 / 24.6 (min 21.4 / 20.7).
 */
#define GM_NR 14
#ifndef GM_BLK
#define GM_BLK 8 /* most panels (tiles) a thread takes at once */
#endif
#ifndef GM_KC
#define GM_KC 1024
#endif
#define GM_WS (GM_KC + 32) /* bf16 row stride of the decoded panel */

/* The microkernel: NR broadcast rows x NV (1 or 2) vectors of 16 lanes, NV*NR fp32 accumulators over np
 * pairs of k; ct += (row i) x (lanes), stored at ct[i * ldct + lane].  Broadcast row i at pair p is
 * the dword bc[i * BI + p * BP], the lane vectors at vec + VP * p (+ 16 v).  Two families: int8 (the
 * decoded weight rows broadcast, x.T pairs in the lanes) and int4 tiles (x broadcast, the weight's
 * columns in the lanes). */
#define GM_UKR_BODY(NR, BI, BP, VP, NV, STEP) /* STEP: side work before pair p's products */            \
    __m512 acc[NR][NV];                                                                                         \
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++)   \
        acc[i][v] = first ? _mm512_setzero_ps() : _mm512_load_ps(ct + i * ldct + 16 * v);                       \
    for (int64_t p = 0; p < np; p++) {                                                                          \
        STEP;                                                                                                   \
        __m512bh a[NV];                                                                                         \
        _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) a[v] = (__m512bh)_mm512_load_si512(vec + (VP) * p + 16 * v); \
        _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) {                                                 \
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)bc[i * (BI) + p * (BP)]);                       \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b, a[v]); \
        }                                                                                                       \
    }                                                                                                           \
    _Pragma("GCC unroll 16") for (int i = 0; i < NR; i++) _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++)   \
        _mm512_store_ps(ct + i * ldct + 16 * v, acc[i][v]);
#define GM_UKR(NAME, NR, BI, BP, VP, NV)                                                                        \
    static void NAME##NR(const uint32_t *bc, const uint32_t *vec, int64_t np, float *ct, int64_t ldct, int first) { \
        enum { nr_ = NR }; /* what BP may name */                                                              \
        GM_UKR_BODY(NR, BI, BP, VP, NV, (void)0)                                                                \
    }
#define GM_FAMILY(NAME, BI, BP, VP, NV)                                                                         \
    GM_UKR(NAME, 1, BI, BP, VP, NV) GM_UKR(NAME, 2, BI, BP, VP, NV) GM_UKR(NAME, 3, BI, BP, VP, NV)            \
    GM_UKR(NAME, 4, BI, BP, VP, NV) GM_UKR(NAME, 5, BI, BP, VP, NV) GM_UKR(NAME, 6, BI, BP, VP, NV)            \
    GM_UKR(NAME, 7, BI, BP, VP, NV) GM_UKR(NAME, 8, BI, BP, VP, NV) GM_UKR(NAME, 9, BI, BP, VP, NV)            \
    GM_UKR(NAME, 10, BI, BP, VP, NV) GM_UKR(NAME, 11, BI, BP, VP, NV) GM_UKR(NAME, 12, BI, BP, VP, NV)         \
    GM_UKR(NAME, 13, BI, BP, VP, NV) GM_UKR(NAME, 14, BI, BP, VP, NV)                                          \
    static const gm_ukr_t NAME##S[GM_NR + 1] = {0, NAME##1, NAME##2, NAME##3, NAME##4, NAME##5, NAME##6,       \
                                                NAME##7, NAME##8, NAME##9, NAME##10, NAME##11, NAME##12,       \
                                                NAME##13, NAME##14};
typedef void (*gm_ukr_t)(const uint32_t *, const uint32_t *, int64_t, float *, int64_t, int);
/* int8: decoded weight rows broadcast (row stride GM_WS bf16), x.T pairs xt[p][32] in the lanes;
 * a last block of <= 16 rows of x is packed xt[p][16] and takes one vector */
GM_FAMILY(gm_ukr, GM_WS / 2, 1, 32, 2)
GM_FAMILY(gm_ukrh, GM_WS / 2, 1, 16, 1)
/* int4 tiles: x pairs broadcast from a block of nr rows packed [p][nr], weight pairs bp[p][64] */
GM_FAMILY(gm4_ukr, 1, nr_, 64, 2)

/* A grow-only scratch buffer of the calling thread, kept between calls (slot: one of GM_SLOTS uses), so
 * that the few-MB packed x is not a fresh malloc (often a fresh mmap) per call.  Kept: the largest size
 * asked per slot and thread (the OpenMP pool's threads persist); at most GEMM_ROWS * K * 2 bytes for x
 * (the Python wrappers call with <= 256 rows).  No time change measured on its own: the page faults
 * left per call (60-115 at 4096x4096 M=256, fp32 x) are those of the fp32 output torch allocates. */
#define GM_SLOTS 4 /* 0: packed x, 1 and 2: a worker's scratch, 3: the grouped int4 GEMM's group sums */
static void *gm_tls(int slot, size_t bytes) {
    static __thread void *buf[GM_SLOTS];
    static __thread size_t cap[GM_SLOTS];
    if (FXQ_FAULT()) return NULL; /* test builds: every request counts, cached or not */
    bytes = (bytes + 63) / 64 * 64;
    if (cap[slot] < bytes) {
        free(buf[slot]);
        buf[slot] = aligned_alloc(64, bytes);
        cap[slot] = buf[slot] ? bytes : 0;
    }
    return buf[slot];
}

/* the two per-thread scratch buffers of a GEMM's worker (slots 1, 2; slot 0 is the caller's packed x);
 * sets the shared *failed when one is missing */
INLINE void gm_scratch(size_t a_bytes, size_t b_bytes, void **a, void **b, int *failed) {
    *a = gm_tls(1, a_bytes);
    *b = gm_tls(2, b_bytes);
    if (!*a || !*b) {
#pragma omp atomic write
        *failed = 1;
    }
}

/* Transposes 16 vectors of 16 floats in place: r[j] lane i <- r[i] lane j. */
INLINE void tr16_ps(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + j], 128-bit lane L: rows 4i .. 4i + 3 at column 4L + j */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        t[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    for (int j = 0; j < 16; j++) r[j] = t[j];
}

/* The outputs of panels [n0 / GM_NR, + np) (columns n0 .. N): y[m][n0 + 14 p + i] = ct[(14 p + i) * ldct + m]
 * * rs[n0 + 14 p + i] (rs NULL: 1), y fp32 or bf16 at row stride ldc; ct holds at least M rounded up to
 * 16 columns per row.  By 16 x 16 register transposes, rows of y outer: each row gets the block's columns
 * in one run (one panel at a time, 56-byte pieces 256 rows apart, was ~3% of the GEMM at M=256). */
static void gm_store_t(const float *ct, int64_t ldct, int64_t np, int64_t n0, int64_t N, int64_t M, const float *rs,
                       void *y, int64_t ldc, int out_bf16) {
    for (int64_t m0 = 0; m0 < M; m0 += 16)
        for (int64_t pi = 0; pi < np; pi++) {
            const int64_t c0 = n0 + pi * GM_NR;
            const int nr = N - c0 < GM_NR ? (int)(N - c0) : GM_NR;
            const __mmask16 mk = tail16(nr);
            const __m512 sv = rs ? _mm512_maskz_loadu_ps(mk, rs + c0) : _mm512_set1_ps(1.f);
            const float *cp = ct + pi * GM_NR * ldct + m0;
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = i < nr ? _mm512_load_ps(cp + i * ldct) : _mm512_setzero_ps();
            tr16_ps(r);
            for (int j = 0; j < 16 && m0 + j < M; j++) {
                const __m512 v = _mm512_mul_ps(sv, r[j]);
                if (out_bf16)
                    _mm256_mask_storeu_epi16((uint16_t *)y + (m0 + j) * ldc + c0, mk, (__m256i)_mm512_cvtneps_pbh(v));
                else
                    _mm512_mask_storeu_ps((float *)y + (m0 + j) * ldc + c0, mk, v);
            }
        }
}

/* The decode of int8 codes (exact in bf16) in units of 32 codes along a panel's rows: a cursor over rows
 * of kc codes at stride K (src) written as bf16 rows at stride GM_WS (dst).  The GEMM runs it beside the
 * microkernel's dot products (the conversions issue on other pipes than vdpbf16ps: measured free when
 * interleaved), decoding the next panel while the current one is multiplied. */
struct gm_cur { const void *src; uint16_t *dst; int64_t ld, kc, col, left; }; /* ld: src's row stride, elements */

INLINE void gm_i8_unit(struct gm_cur *c) {
    const int8_t *row = (const int8_t *)c->src, *s = row + c->col;
    const int64_t rest = c->kc - c->col, ahead = c->col + 128; /* four units ahead, into the next row at its end */
    _mm_prefetch((const char *)(ahead < c->kc ? s + 128 : row + c->ld + (ahead - c->kc)), _MM_HINT_T0);
    __m128i c0, c1;
    if (rest >= 32) {
        c0 = _mm_loadu_si128((const __m128i *)s);
        c1 = _mm_loadu_si128((const __m128i *)(s + 16));
    } else {
        c0 = _mm_maskz_loadu_epi8(tail16(rest), s);
        c1 = _mm_maskz_loadu_epi8(tail16(rest > 16 ? rest - 16 : 0), s + 16);
    }
    const __m512 f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c0)), f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c1));
    _mm512_store_si512(c->dst + c->col, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
    if ((c->col += 32) >= c->kc) c->col = 0, c->src = row + c->ld, c->dst += GM_WS;
    c->left--;
}
#define GM_I8_LEFT(c) ((c)->left)

/* runs n units of the cursor (at most what is left) */
INLINE void gm_i8_units(struct gm_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && c->left; u++) gm_i8_unit(c);
}

/* The same cursor over rows of bf16 values already decoded (fxq512_bf16_gemm): 32 copied per unit. */
INLINE void gm_b16_unit(struct gm_cur *c) {
    const uint16_t *row = (const uint16_t *)c->src, *s = row + c->col;
    const int64_t rest = c->kc - c->col, ahead = c->col + 128;
    _mm_prefetch((const char *)(ahead < c->kc ? s + 128 : row + c->ld + (ahead - c->kc)), _MM_HINT_T0);
    const __mmask32 mk = rest >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << rest) - 1);
    _mm512_store_si512(c->dst + c->col, _mm512_maskz_loadu_epi16(mk, s));
    if ((c->col += 32) >= c->kc) c->col = 0, c->src = row + c->ld, c->dst += GM_WS;
    c->left--;
}

INLINE void gm_b16_units(struct gm_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && c->left; u++) gm_b16_unit(c);
}

/* A GM_NR-row microkernel (GM_UKR's) that also runs `quota` units of a decode cursor (type CUR, units
 * left LEFT(cur), one unit UNIT(cur)), one every np / quota pairs of k. */
#define GM_UKR_SIDE(NAME, CUR, LEFT, UNIT, BI, BP, VP, NV)                                                      \
    static void NAME(const uint32_t *bc, const uint32_t *vec, int64_t np, float *ct, int64_t ldct, int first,    \
                     CUR *cur, int64_t quota) {                                                                  \
        if (quota > LEFT(cur)) quota = LEFT(cur);                                                               \
        const int64_t every = quota && np / quota > 0 ? np / quota : 1;                                         \
        int64_t cd = every, done = 0;                                                                           \
        GM_UKR_BODY(GM_NR, BI, BP, VP, NV, if (--cd == 0) {                                                     \
            cd = every;                                                                                         \
            if (done < quota) { UNIT(cur); done++; }                                                            \
        })                                                                                                      \
        for (; done < quota; done++) UNIT(cur);                                                                 \
    }
GM_UKR_SIDE(gm_ukr_side, struct gm_cur, GM_I8_LEFT, gm_i8_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side, struct gm_cur, GM_I8_LEFT, gm_i8_unit, GM_WS / 2, 1, 16, 1)
GM_UKR_SIDE(gm_ukr_side_b, struct gm_cur, GM_I8_LEFT, gm_b16_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side_b, struct gm_cur, GM_I8_LEFT, gm_b16_unit, GM_WS / 2, 1, 16, 1)

/* panels [b, b + n) of GM_NR weight rows; a block taken from *next: guided, shrinking to one panel at the end
 * so that on a shared machine a descheduled thread does not leave the other one waiting long */
INLINE int64_t gm_take(int64_t *next, int64_t NP, int nthreads, int64_t *n) {
    int64_t cur = __atomic_load_n(next, __ATOMIC_RELAXED), sz;
    do {
        if (cur >= NP) return NP;
        sz = (NP - cur) / (4 * nthreads);
        sz = sz < 1 ? 1 : sz > GM_BLK ? GM_BLK : sz;
    } while (!__atomic_compare_exchange_n(next, &cur, cur + sz, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *n = sz;
    return cur;
}

/* The `io` argument of the large-M GEMMs: bf16 output (else fp32), fp32 x rounded to bf16 while it is
 * packed (else bf16 x; lda counts elements of x's type).  Rounding here instead of a torch cast first
 * saves a pass over x and an allocation per call. */
#define GM_OUT_BF16 1
#define GM_X_FP32 2
#define GM_EXACT 4 /* int4 GEMM only: codes exact in bf16, group scales applied in fp32 (int4_gemm_grouped) */

/* dwords p0 .. p0 + 15 (bf16 pairs, zero past NPAIR) of row r of x */
INLINE __m512 gm_xpairs(const void *x, int io, int64_t lda, int64_t r, int64_t p0, int64_t NPAIR) {
    if (io & GM_X_FP32) {
        const float *row = (const float *)x + r * lda + 2 * p0;
        const int64_t n = 2 * (NPAIR - p0); /* floats left in the row, >= 2 */
        const __m512 lo = _mm512_maskz_loadu_ps(tail16(n), row), hi = _mm512_maskz_loadu_ps(tail16(n > 16 ? n - 16 : 0), row + 16);
        return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(tail16(NPAIR - p0), (const uint32_t *)((const uint16_t *)x + r * lda) + p0));
}

/* Block mb of x.T pairs: dst[p][wid] = dword p (bf16 k = 2p, 2p + 1) of row 32 mb + lane, wid 32, or 16 for a
 * last block of <= 16 rows; rows past M zero.  16 x 16 dword blocks transposed in registers (gathers at the
 * row stride were ~8x slower). */
static void gm_pack_xt(const void *x, int io, int64_t M, int64_t NPAIR, int64_t lda, int64_t mb, uint32_t *dst) {
    const int wid = M - 32 * mb <= 16 ? 16 : 32;
    for (int v = 0; v < wid / 16; v++) {
        const int64_t r0 = 32 * mb + 16 * v;
        for (int64_t p0 = 0; p0 < NPAIR; p0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) r[i] = r0 + i < M ? gm_xpairs(x, io, lda, r0 + i, p0, NPAIR) : _mm512_setzero_ps();
            tr16_ps(r);
            for (int j = 0; j < 16 && p0 + j < NPAIR; j++)
                _mm512_store_si512(dst + wid * (p0 + j) + 16 * v, _mm512_castps_si512(r[j]));
        }
    }
}

/* int8wo, M large: y [M, N] = (x [M, K] @ q.T) * rs[N] (x as bf16), K even, x rows at stride lda, y at
 * stride ldc, types per io (GM_OUT_BF16, GM_X_FP32).  Per thread a block of panels; chunks of GM_KC columns
 * outer, the block's panels inner, so that x.T's chunk (256 rows: 512 KB) is read from L2 by every panel of
 * the block instead of all of x.T (2 MB, from L3) per panel (Zen 5, 4096x4096 M=256 same-process medians
 * 9.46 -> 9.25 ms, bit-identical); the next (panel, chunk) is decoded into the other of two buffers by the
 * microkernel calls of the current one.  Returns 0, or -1 (out of memory: nothing written).
 * gm8_gemm is the body for either weight source (wbf16, a constant: int8 codes q [N, K], or bf16 rows at
 * stride ldw, fxq512_bf16_gemm), each compiled on its own. */
INLINE int gm8_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const void *q, int64_t ldw, const int wbf16,
                    int64_t N, const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    const int out_bf16 = io & GM_OUT_BF16;
    const int64_t es = wbf16 ? 2 : 1; /* bytes per weight element */
    const int64_t MB = (M + 31) / 32, NPAIR = K / 2, NP = (N + GM_NR - 1) / GM_NR;
    uint32_t *xt = gm_tls(0, (size_t)(MB * NPAIR * 32 * 4 + 64));
    if (!xt) return FXQ_ENOMEM;
    int failed = 0;
    int64_t next = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t mb = 0; mb < MB; mb++) /* x.T pairs, rows past M zero */
            gm_pack_xt(x, io, M, NPAIR, lda, mb, xt + mb * NPAIR * 32);
        uint16_t *wb;
        float *ct;
        gm_scratch(2 * GM_NR * GM_WS * 2, (size_t)(GM_BLK * GM_NR * MB * 32 * 4), (void **)&wb, (void **)&ct, &failed);
#pragma omp barrier
        if (!failed) {
            const int64_t ldct = MB * 32;
            int64_t nb = 0;
            for (int64_t b0; (b0 = gm_take(&next, NP, nthreads, &nb)) < NP;) {
                int buf = 0, ready = 0; /* ready: the chunk's panel is already in wb[buf] */
                for (int64_t k0 = 0; k0 < K; k0 += GM_KC) { /* chunks outer: x.T's chunk stays in L2 for the block */
                    const int64_t kc = K - k0 < GM_KC ? K - k0 : GM_KC;
                    for (int64_t pn = b0; pn < b0 + nb; pn++) {
                        const int64_t n0 = pn * GM_NR;
                        const int nr = N - n0 < GM_NR ? (int)(N - n0) : GM_NR;
                        uint16_t *cur_wb = wb + buf * GM_NR * GM_WS;
                        if (!ready) {
                            struct gm_cur now = {(const char *)q + (n0 * ldw + k0) * es, cur_wb, ldw, kc, 0,
                                                 nr * ((kc + 31) / 32)};
                            if (wbf16) gm_b16_units(&now, now.left);
                            else gm_i8_units(&now, now.left);
                        }
                        /* the next (panel, chunk) of this block: the next panel, or the first one's next chunk */
                        const int lastp = pn + 1 >= b0 + nb, more = !lastp || k0 + GM_KC < K;
                        const int64_t pn0 = (lastp ? b0 : pn + 1) * GM_NR, pk0 = lastp ? k0 + GM_KC : k0;
                        const int pnr = !more ? 0 : N - pn0 < GM_NR ? (int)(N - pn0) : GM_NR;
                        const int64_t pkc = !more ? 0 : K - pk0 < GM_KC ? K - pk0 : GM_KC;
                        struct gm_cur side = {(const char *)q + (pn0 * ldw + pk0) * es, wb + (buf ^ 1) * GM_NR * GM_WS,
                                              ldw, pkc, 0, pnr * ((pkc + 31) / 32)};
                        const int64_t units = side.left;
                        for (int64_t mb = 0; mb < MB; mb++) {
                            const int wid = M - 32 * mb <= 16 ? 16 : 32;
                            const uint32_t *xv = xt + mb * NPAIR * 32 + (k0 / 2) * wid;
                            float *cm = ct + (pn - b0) * GM_NR * ldct + mb * 32;
                            const int64_t quota = units * (mb + 1) / MB - units * mb / MB;
                            if (nr == GM_NR && quota && wbf16)
                                (wid == 16 ? gm_ukrh_side_b : gm_ukr_side_b)((const uint32_t *)cur_wb, xv, kc / 2, cm,
                                                                            ldct, k0 == 0, &side, quota);
                            else if (nr == GM_NR && quota)
                                (wid == 16 ? gm_ukrh_side : gm_ukr_side)((const uint32_t *)cur_wb, xv, kc / 2, cm, ldct,
                                                                        k0 == 0, &side, quota);
                            else
                                (wid == 16 ? gm_ukrhS : gm_ukrS)[nr]((const uint32_t *)cur_wb, xv, kc / 2, cm, ldct, k0 == 0);
                        }
                        if (wbf16) gm_b16_units(&side, side.left);
                        else gm_i8_units(&side, side.left);
                        ready = more;
                        buf ^= 1;
                    }
                }
                gm_store_t(ct, ldct, nb, b0 * GM_NR, N, M, rs, y, ldc, out_bf16);
            }
        }
    }
    return failed ? FXQ_ENOMEM : FXQ_OK;
}

int fxq512_int8_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const int8_t *q, int64_t N,
                          const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    return gm8_gemm(x, M, K, lda, q, K, 0, N, rs, y, ldc, io, nthreads);
}

/* The same GEMM on a weight already decoded to bf16, w [N, K] at row stride ldw (K even): y = (x @ w.T) * rs
 * (rs NULL: 1).  With bf16 x the products are exact and the sums fp32, so a weight whose values are bf16
 * numbers (float8, fpX codes) times bf16 x gives the fp32 reference's result, fp32 out (io without
 * GM_OUT_BF16): the blocked dequantize paths' fp32-exact GEMM (fxquant/ops/_dequant_gemm.py). */
int fxq512_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const uint16_t *w, int64_t ldw, int64_t N,
                     const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    return gm8_gemm(x, M, K, lda, w, ldw, 1, N, rs, y, ldc, io, nthreads);
}

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
