/* The large-M GEMMs' shared machinery (native_avx512_gemm.c: weight rows decoded to bf16 (int8, bf16,
 * 4-bit tables); native_avx512_gemm4.c: int4 tiles): the microkernel macros, per-thread scratch, register
 * transposes, the panel scheduler, the io flags and x's bf16 pairs.  Only static code: each .c includes
 * it inside its FXQ_AVX512 && FXQ_BF16DOT region. */
#ifndef FXQ_NATIVE_AVX512_GEMM_H
#define FXQ_NATIVE_AVX512_GEMM_H

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

#endif /* FXQ_NATIVE_AVX512_GEMM_H */
