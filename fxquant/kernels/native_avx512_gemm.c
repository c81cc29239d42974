/* fxquant native CPU kernels, AVX512-BF16: the weight-row GEMMs for large M (int8 codes, bf16 rows,
 * 4-bit table codes), each decoding panels of weight rows to bf16 inside the microkernel calls; the int4
 * tile GEMMs are in native_avx512_gemm4.c, the shared machinery in native_avx512_gemm.h. */
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
#include "native_avx512_gemm.h"

/* int8: decoded weight rows broadcast (row stride GM_WS bf16), x.T pairs xt[p][32] in the lanes;
 * a last block of <= 16 rows of x is packed xt[p][16] and takes one vector */
GM_FAMILY(gm_ukr, GM_WS / 2, 1, 32, 2)
GM_FAMILY(gm_ukrh, GM_WS / 2, 1, 16, 1)

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
/* 4-bit table codes (fxq512_lut4_bf16_gemm): what a cursor over them also reads, from memory (held in
 * registers across the microkernel loop, constants take the accumulators' registers: see gm4_pair) */
struct gm_l4 {
    float tbl[16];  /* the code table, fp32 (first: 64-byte aligned in an aligned struct) */
    int16_t ilv[32]; /* vpermw order interleaving the high- and low-nibble halves */
    const float *scale; /* fp32 per piece of 2^shift elements, row-major, sc_ld per row */
    int64_t sc_ld;
    int shift;
};

/* ld: src's row stride, elements (bytes for 4-bit codes); k0, sc, l4: 4-bit codes only (the chunk's first
 * column, the scales of the current row, the constants) */
struct gm_cur { const void *src; uint16_t *dst; int64_t ld, kc, col, left, k0; const float *sc; const struct gm_l4 *l4; };

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

/* The cursor over 4-bit table codes (two per byte, the first in the high nibble; 16 bytes per unit): W =
 * tbl[code] * scale[piece] in fp32, rounded once to bf16 (what the chunked decode + bf16 GEMM multiplies).
 * A unit never straddles pieces (pieces of 2^shift >= 32 elements, chunks start at multiples of 32). */
INLINE void gm_l4_unit(struct gm_cur *c) {
    const uint8_t *row = (const uint8_t *)c->src, *s = row + c->col / 2;
    const int64_t rest = c->kc - c->col, ahead = c->col + 256; /* 128 bytes ahead, into the next row at its end */
    _mm_prefetch((const char *)(ahead < c->kc ? s + 128 : row + c->ld + (ahead - c->kc) / 2), _MM_HINT_T0);
    const __m128i b = rest >= 32 ? _mm_loadu_si128((const __m128i *)s) : _mm_maskz_loadu_epi8(tail16((rest + 1) / 2), s);
    _mm512_store_si512(c->dst + c->col, l4_bf16x32(b, _mm512_load_ps(c->l4->tbl),
                                                   _mm512_set1_ps(c->sc[(c->k0 + c->col) >> c->l4->shift]),
                                                   _mm512_loadu_si512(c->l4->ilv)));
    if ((c->col += 32) >= c->kc) c->col = 0, c->src = row + c->ld, c->dst += GM_WS, c->sc += c->l4->sc_ld;
    c->left--;
}

INLINE void gm_l4_units(struct gm_cur *c, int64_t n) {
    for (int64_t u = 0; u < n && c->left; u++) gm_l4_unit(c);
}

/* weight sources of gm8_gemm */
enum { GM_W_INT8, GM_W_BF16, GM_W_LUT4 };

/* runs n units of a cursor over weight source wk (a constant where gm8_gemm is inlined) */
INLINE void gm_units(struct gm_cur *c, int64_t n, const int wk) {
    if (wk == GM_W_BF16) gm_b16_units(c, n);
    else if (wk == GM_W_LUT4) gm_l4_units(c, n);
    else gm_i8_units(c, n);
}

/* A cursor over rows n0 .. n0 + nr of the weight (source wk, row stride ld elements), columns k0 .. k0 + kc,
 * into dst */
INLINE struct gm_cur gm_cursor(const void *q, const int wk, const struct gm_l4 *l4, int64_t ld, int64_t n0,
                               int64_t k0, int64_t kc, int nr, uint16_t *dst) {
    struct gm_cur c = {0};
    c.dst = dst, c.ld = ld, c.kc = kc, c.left = nr * ((kc + 31) / 32), c.k0 = k0, c.l4 = l4;
    if (wk == GM_W_LUT4) {
        c.src = (const uint8_t *)q + n0 * ld + k0 / 2;
        c.sc = l4->scale + n0 * l4->sc_ld;
    } else {
        c.src = (const char *)q + (n0 * ld + k0) * (wk == GM_W_BF16 ? 2 : 1);
    }
    return c;
}

GM_UKR_SIDE(gm_ukr_side, struct gm_cur, GM_I8_LEFT, gm_i8_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side, struct gm_cur, GM_I8_LEFT, gm_i8_unit, GM_WS / 2, 1, 16, 1)
GM_UKR_SIDE(gm_ukr_side_b, struct gm_cur, GM_I8_LEFT, gm_b16_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side_b, struct gm_cur, GM_I8_LEFT, gm_b16_unit, GM_WS / 2, 1, 16, 1)
GM_UKR_SIDE(gm_ukr_side_l, struct gm_cur, GM_I8_LEFT, gm_l4_unit, GM_WS / 2, 1, 32, 2)
GM_UKR_SIDE(gm_ukrh_side_l, struct gm_cur, GM_I8_LEFT, gm_l4_unit, GM_WS / 2, 1, 16, 1)

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
 * gm8_gemm is the body for every weight source (wk, a constant: int8 codes q [N, K]; bf16 rows at stride ldw,
 * fxq512_bf16_gemm; 4-bit table codes, ldw bytes per row, fxq512_lut4_bf16_gemm), each compiled on its own. */
INLINE int gm8_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const void *q, int64_t ldw, const int wk,
                    const struct gm_l4 *l4, int64_t N, const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    const int out_bf16 = io & GM_OUT_BF16;
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
                            struct gm_cur now = gm_cursor(q, wk, l4, ldw, n0, k0, kc, nr, cur_wb);
                            gm_units(&now, now.left, wk);
                        }
                        /* the next (panel, chunk) of this block: the next panel, or the first one's next chunk */
                        const int lastp = pn + 1 >= b0 + nb, more = !lastp || k0 + GM_KC < K;
                        const int64_t pn0 = (lastp ? b0 : pn + 1) * GM_NR, pk0 = lastp ? k0 + GM_KC : k0;
                        const int pnr = !more ? 0 : N - pn0 < GM_NR ? (int)(N - pn0) : GM_NR;
                        const int64_t pkc = !more ? 0 : K - pk0 < GM_KC ? K - pk0 : GM_KC;
                        struct gm_cur side = gm_cursor(q, wk, l4, ldw, pn0, pk0, pkc, pnr, wb + (buf ^ 1) * GM_NR * GM_WS);
                        const int64_t units = side.left;
                        for (int64_t mb = 0; mb < MB; mb++) {
                            const int wid = M - 32 * mb <= 16 ? 16 : 32;
                            const uint32_t *xv = xt + mb * NPAIR * 32 + (k0 / 2) * wid;
                            float *cm = ct + (pn - b0) * GM_NR * ldct + mb * 32;
                            const int64_t quota = units * (mb + 1) / MB - units * mb / MB;
                            if (nr == GM_NR && quota && wk == GM_W_BF16)
                                (wid == 16 ? gm_ukrh_side_b : gm_ukr_side_b)((const uint32_t *)cur_wb, xv, kc / 2, cm,
                                                                            ldct, k0 == 0, &side, quota);
                            else if (nr == GM_NR && quota && wk == GM_W_LUT4)
                                (wid == 16 ? gm_ukrh_side_l : gm_ukr_side_l)((const uint32_t *)cur_wb, xv, kc / 2, cm,
                                                                            ldct, k0 == 0, &side, quota);
                            else if (nr == GM_NR && quota)
                                (wid == 16 ? gm_ukrh_side : gm_ukr_side)((const uint32_t *)cur_wb, xv, kc / 2, cm, ldct,
                                                                        k0 == 0, &side, quota);
                            else
                                (wid == 16 ? gm_ukrhS : gm_ukrS)[nr]((const uint32_t *)cur_wb, xv, kc / 2, cm, ldct, k0 == 0);
                        }
                        gm_units(&side, side.left, wk);
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
    return gm8_gemm(x, M, K, lda, q, K, GM_W_INT8, NULL, N, rs, y, ldc, io, nthreads);
}

/* The same GEMM on a weight already decoded to bf16, w [N, K] at row stride ldw (K even): y = (x @ w.T) * rs
 * (rs NULL: 1).  With bf16 x the products are exact and the sums fp32, so a weight whose values are bf16
 * numbers (float8, fpX codes) times bf16 x gives the fp32 reference's result, fp32 out (io without
 * GM_OUT_BF16): the blocked dequantize paths' fp32-exact GEMM (fxquant/ops/_dequant_gemm.py). */
int fxq512_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const uint16_t *w, int64_t ldw, int64_t N,
                     const float *rs, void *y, int64_t ldc, int io, int nthreads) {
    return gm8_gemm(x, M, K, lda, w, ldw, GM_W_BF16, NULL, N, rs, y, ldc, io, nthreads);
}

/* 4-bit table codes at large M (bitsandbytes NF4 / FP4, fxquant.ops.bnb4): y [M, N] = x @ W.T with W[n][k] =
 * table[code] * scale[(n * K + k) >> shift], codes two per byte (first in the high nibble), K / 2 bytes per row;
 * scale fp32 per piece of 2^shift elements (5 <= shift, K a multiple of 2^shift); W rounded to bf16 once.
 * x, y, lda, ldc, io as fxq512_int8_bf16_gemm; returns 0, -1 (out of memory: nothing written) or -2 (shift). */
int fxq512_lut4_bf16_gemm(const void *x, int64_t M, int64_t K, int64_t lda, const uint8_t *codes, int64_t N,
                          const float *table, const float *scale, int shift, void *y, int64_t ldc, int io,
                          int nthreads) {
    if (shift < 5 || shift > 30 || K % ((int64_t)1 << shift)) return FXQ_EARG;
    _Alignas(64) struct gm_l4 l4;
    memcpy(l4.tbl, table, sizeof l4.tbl);
    for (int i = 0; i < 16; i++) l4.ilv[2 * i] = (int16_t)i, l4.ilv[2 * i + 1] = (int16_t)(16 + i);
    l4.scale = scale, l4.sc_ld = K >> shift, l4.shift = shift;
    return gm8_gemm(x, M, K, lda, codes, K / 2, GM_W_LUT4, &l4, N, NULL, y, ldc, io, nthreads);
}

#endif /* FXQ_BF16DOT */

#endif /* FXQ_AVX512 */
