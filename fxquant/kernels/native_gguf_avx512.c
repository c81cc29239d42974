/* GGUF kernels, AVX-512 (F/BW/VL/DQ): fxq512_gguf_gemv (fp32) and fxq512_gguf_dequant, the same
 * arguments and values as native_gguf.c's fxq_gguf_*; empty unless the compiler targets AVX-512. */
#include "native_gguf.h"

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
                const __m512 dl = _mm512_set1_ps(d * (float)(sc[j] & 15));
                const __m512 ml = _mm512_set1_ps(-(dmin * (float)(sc[j] >> 4)));
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
#endif /* FXQ_AVX512 */
