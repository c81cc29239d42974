/* AQLM (fxquant/formats/aqlm.py): the small-M table GEMV and the row decoder of the large-M path, reading
 * the stored codes in place.  Compiled into the one library of native_cpu.py with the other kernels.
 *
 * Layout: codes [O, G, NC] int8 / int16 (a code is the low nbits bits of the stored integer), codebooks
 * [NC, E = 2**nbits, og, ig], scales [O]; W[o*og + r, j*ig + i] = scales[o] * sum_c cb[c, codes[o, j, c], r, i].
 * The wrappers (native_aqlm.py) pass the codebooks as fp32, transposed for the table ([ig, NC*E*og]) or as
 * stored ([NC*E*og, ig]) for the decoder, and the scales as fp32.
 *
 * Table GEMV: for a chunk of in groups j (sized so its table stays in L1: AQ_TABLE_FLOATS), T[j][m][(c*E + e)*og + r] =
 * sum_i x[m, j*ig + i] * cb[c, e, r, i] (fp32 products of x's values and the fp16 / bf16 codewords, fp32
 * sums), then every output row n = o*og + r adds T[j][m][(c*E + codes[o, j, c])*og + r] over the chunk's
 * (j, c): one load and one add per stored code and row of x.  The scale is applied once at the end.
 * Decoder: the reference's fp32 values (codewords summed in codebook order, times the scale), rounded once
 * to bf16 when the output is bf16.
 *
 * Two names per kernel, as for the other formats: fxq_aqlm_* and, when compiled for AVX-512, fxq512_aqlm_*
 * (the same plain C loops, which the compiler vectorises for the target).
 */
#include "native_avx512.h"

/* floats of one table chunk (all rows of x): 48 KB, about L1.  Every lookup of a chunk is a random line of the
 * chunk, so a chunk in L1 keeps them at two loads per cycle.  Measured (1536 rows x 72 groups x 2x8 codes, one
 * thread, Zen 4, us, chunk of j in groups): 4 KB 75, 16 KB 67, 48 KB 59, 147 KB (all of it) 100. */
#ifndef AQ_TABLE_FLOATS
#define AQ_TABLE_FLOATS 12288
#endif

static inline int64_t aq_code(const void *codes, int code_bytes, int64_t i, int64_t mask) {
    return code_bytes == 1 ? (int64_t)((const uint8_t *)codes)[i] & mask : (int64_t)((const uint16_t *)codes)[i] & mask;
}

/* One output row's lookups in one table chunk: sum over j < nj, c < NC of tm[j*js + (c*E + code(j, c))*og], the
 * codes of the row's in groups contiguous at cp ([nj, NC]).  Scalar loads, four independent sums: on the 2-core
 * Zen 4 this measured 1.7x faster than AVX-512 gathers (1536 rows x 72 groups x 2 codebooks, one thread, us:
 * 59 against 100; gathers run at about one element per cycle there, scalar loads at two). */
#define AQ_LOOKUPS(NAME_, CT_)                                                                                    \
    static inline float NAME_(const float *tm, int64_t js, const CT_ *cp, int64_t nj, int64_t NC, int64_t eog,   \
                              int32_t mask, int64_t og) {                                                         \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                                         \
        int64_t j = 0;                                                                                            \
        if (NC == 2 && og == 1)                                                                                   \
            for (; j + 2 <= nj; j += 2, cp += 4) {                                                                \
                const float *t0 = tm + j * js, *t1 = t0 + js;                                                     \
                s0 += t0[cp[0] & mask], s1 += t0[eog + (cp[1] & mask)];                                           \
                s2 += t1[cp[2] & mask], s3 += t1[eog + (cp[3] & mask)];                                           \
            }                                                                                                     \
        else if (NC == 1 && og == 1)                                                                              \
            for (; j + 4 <= nj; j += 4, cp += 4) {                                                                \
                s0 += tm[j * js + (cp[0] & mask)], s1 += tm[(j + 1) * js + (cp[1] & mask)];                       \
                s2 += tm[(j + 2) * js + (cp[2] & mask)], s3 += tm[(j + 3) * js + (cp[3] & mask)];                 \
            }                                                                                                     \
        for (; j < nj; j++)                                                                                       \
            for (int64_t c = 0; c < NC; c++, cp++) s0 += tm[j * js + c * eog + (int64_t)(*cp & mask) * og];       \
        return (s0 + s1) + (s2 + s3);                                                                             \
    }
AQ_LOOKUPS(aq_lookups8, uint8_t)
AQ_LOOKUPS(aq_lookups16, uint16_t)

/* rows of x per table pass: the chunk of in groups per pass is AQ_TABLE_FLOATS / (width * rows), and with more
 * rows it shrinks to a group or two, whose lookups no longer pay for a pass (2x8-g8 1536x576, one thread, us:
 * M = 16 in one pass 9500, in passes of 4 rows 2000) */
#define AQ_PASS_ROWS 4

static int aq_lut_gemv(const float *x, int64_t M, int64_t KP, const void *codes, int code_bytes, int nbits, int64_t O,
                       int64_t G, int64_t NC, const float *cbt, int64_t og, int64_t ig, const float *scales, int64_t N,
                       float *y, int64_t ldy, int round_x, int nthreads) {
    if (M < 0 || KP != G * ig || nbits < 1 || nbits > 16 || (code_bytes != 1 && code_bytes != 2) || N > O * og)
        return FXQ_EARG;
    const int64_t E = (int64_t)1 << nbits, width = NC * E * og; /* table floats per (j, row of x) */
    const int32_t mask = (int32_t)(E - 1);  /* codes read unsigned: the low nbits bits */
    const int64_t MP = M < AQ_PASS_ROWS ? M : AQ_PASS_ROWS;
    int64_t jc = AQ_TABLE_FLOATS / (width * (MP ? MP : 1));
    jc = jc < 1 ? 1 : jc > G ? G : jc;
    float *xbuf;
    const float *xr = fxq_x_rounded(x, M * KP, round_x, &xbuf);
    float *t = (float *)fxq_aligned64(sizeof(float) * (size_t)(jc * MP * width));
    float *acc = (float *)fxq_malloc(sizeof(float) * (size_t)(N * MP));
    if (!xr || !t || !acc) {
        free(xbuf), free(t), free(acc);
        return FXQ_ENOMEM;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MP) {
        const int64_t mp = M - m0 < MP ? M - m0 : MP;
        const float *xp = xr + m0 * KP;
        memset(acc, 0, sizeof(float) * (size_t)(N * mp));
        /* one parallel region; its work-shared loops' barriers order each chunk's build, lookups and the next build */
#pragma omp parallel num_threads(nthreads)
        for (int64_t j0 = 0; j0 < G; j0 += jc) {
            const int64_t j1 = j0 + jc < G ? j0 + jc : G;
#pragma omp for collapse(2) schedule(static)
            for (int64_t j = j0; j < j1; j++)
                for (int64_t m = 0; m < mp; m++) {
                    float *row = t + ((j - j0) * mp + m) * width;
                    const float *xv = xp + m * KP + j * ig;
                    for (int64_t q = 0; q < width; q++) row[q] = 0.0f;
                    for (int64_t i = 0; i < ig; i++) {
                        const float xi = xv[i], *cb = cbt + i * width;
                        for (int64_t q = 0; q < width; q++) row[q] += xi * cb[q];
                    }
                }
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const int64_t o = n / og, r = n % og, first = (o * G + j0) * NC;
                for (int64_t m = 0; m < mp; m++) {
                    const float *tm = t + m * width + r;
                    acc[n * mp + m] += code_bytes == 1
                        ? aq_lookups8(tm, mp * width, (const uint8_t *)codes + first, j1 - j0, NC, E * og, mask, og)
                        : aq_lookups16(tm, mp * width, (const uint16_t *)codes + first, j1 - j0, NC, E * og, mask, og);
                }
            }
        }
        for (int64_t m = 0; m < mp; m++)
            for (int64_t n = 0; n < N; n++) y[(m0 + m) * ldy + n] = acc[n * mp + m] * scales[n / og];
    }
    free(xbuf), free(t), free(acc);
    return FXQ_OK;
}

/* fp32 -> bf16 bits, round to nearest even, NaN stays NaN (torch's conversion); branchless, so it vectorises */
static inline uint16_t aq_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (uint16_t)((nan ? (u | 0x00400000u) : u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Out group o of the scaled weight into its og rows of out (row stride ld): block (o, j) is the sum over c of
 * cb[c, code(o, j, c)] (BLK = og*ig floats, codewords summed in codebook order), times scales[o]; fp32 out
 * (OUT_ = float) or bf16 bits (uint16_t, one rounding).  Instantiated for the common block sizes, so v stays
 * in registers; aq_row_any covers the rest. */
#define AQ_ROW(NAME_, BLK_, OUT_, CONV_)                                                                          \
    static void NAME_(const void *codes, int code_bytes, int64_t o, int64_t G, int64_t NC, int64_t E, int64_t mask, \
                      const float *cb, int64_t og, int64_t ig, float s, OUT_ *out, int64_t ld) {                  \
        for (int64_t j = 0; j < G; j++) {                                                                         \
            const int64_t base = (o * G + j) * NC;                                                                \
            float v[BLK_];                                                                                        \
            const float *w = cb + aq_code(codes, code_bytes, base, mask) * (BLK_);                                \
            for (int q = 0; q < (BLK_); q++) v[q] = w[q];                                                        \
            for (int64_t c = 1; c < NC; c++) {                                                                    \
                w = cb + (c * E + aq_code(codes, code_bytes, base + c, mask)) * (BLK_);                           \
                for (int q = 0; q < (BLK_); q++) v[q] += w[q];                                                   \
            }                                                                                                     \
            for (int64_t r = 0; r < og; r++)                                                                      \
                for (int64_t i = 0; i < ig; i++) out[r * ld + j * ig + i] = CONV_(v[r * ig + i] * s);            \
        }                                                                                                         \
    }
#define AQ_F32(v_) (v_)
AQ_ROW(aq_row4_f32, 4, float, AQ_F32)
AQ_ROW(aq_row8_f32, 8, float, AQ_F32)
AQ_ROW(aq_row16_f32, 16, float, AQ_F32)
AQ_ROW(aq_row4_bf16, 4, uint16_t, aq_bf16)
AQ_ROW(aq_row8_bf16, 8, uint16_t, aq_bf16)
AQ_ROW(aq_row16_bf16, 16, uint16_t, aq_bf16)

static void aq_row_any(const void *codes, int code_bytes, int64_t o, int64_t G, int64_t NC, int64_t E, int64_t mask,
                       const float *cb, int64_t og, int64_t ig, float s, void *out, int64_t ld, int bf16, float *v) {
    const int64_t blk = og * ig;
    for (int64_t j = 0; j < G; j++) {
        const int64_t base = (o * G + j) * NC;
        const float *w = cb + aq_code(codes, code_bytes, base, mask) * blk;
        for (int64_t q = 0; q < blk; q++) v[q] = w[q];
        for (int64_t c = 1; c < NC; c++) {
            w = cb + (c * E + aq_code(codes, code_bytes, base + c, mask)) * blk;
            for (int64_t q = 0; q < blk; q++) v[q] += w[q];
        }
        for (int64_t r = 0; r < og; r++)
            for (int64_t i = 0; i < ig; i++) {
                const float f = v[r * ig + i] * s;
                if (bf16) ((uint16_t *)out)[r * ld + j * ig + i] = aq_bf16(f);
                else ((float *)out)[r * ld + j * ig + i] = f;
            }
    }
}

static int aq_decode(const void *codes, int code_bytes, int nbits, int64_t O, int64_t G, int64_t NC, const float *cb,
                     int64_t og, int64_t ig, const float *scales, int64_t o0, int64_t o1, void *out, int64_t ld,
                     int out_dtype, int nthreads) {
    if (o0 < 0 || o1 > O || o0 > o1 || nbits < 1 || nbits > 16 || (code_bytes != 1 && code_bytes != 2) ||
        (out_dtype != 0 && out_dtype != 1) || ld < G * ig)
        return FXQ_EARG;
    const int64_t E = (int64_t)1 << nbits, mask = E - 1, blk = og * ig;
    const int fast = blk == 4 || blk == 8 || blk == 16;
    float *vbuf = fast ? NULL : (float *)fxq_malloc(sizeof(float) * (size_t)(blk * (nthreads > 0 ? nthreads : 1)));
    if (!fast && !vbuf) return FXQ_ENOMEM;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t o = o0; o < o1; o++) {
        const float s = scales[o];
        const int64_t off = (o - o0) * og * ld;
        if (out_dtype == 0) {
            float *dst = (float *)out + off;
            if (blk == 8) aq_row8_f32(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld);
            else if (blk == 4) aq_row4_f32(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld);
            else if (blk == 16) aq_row16_f32(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld);
            else aq_row_any(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld, 0,
                            vbuf + blk * omp_get_thread_num());
        } else {
            uint16_t *dst = (uint16_t *)out + off;
            if (blk == 8) aq_row8_bf16(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld);
            else if (blk == 4) aq_row4_bf16(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld);
            else if (blk == 16) aq_row16_bf16(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld);
            else aq_row_any(codes, code_bytes, o, G, NC, E, mask, cb, og, ig, s, dst, ld, 1,
                            vbuf + blk * omp_get_thread_num());
        }
    }
    free(vbuf);
    return FXQ_OK;
}

int fxq_aqlm_lut_gemv(const float *x, int64_t M, int64_t KP, const void *codes, int code_bytes, int nbits, int64_t O,
                      int64_t G, int64_t NC, const float *cbt, int64_t og, int64_t ig, const float *scales, int64_t N,
                      float *y, int64_t ldy, int round_x, int nthreads) {
    return aq_lut_gemv(x, M, KP, codes, code_bytes, nbits, O, G, NC, cbt, og, ig, scales, N, y, ldy, round_x, nthreads);
}

int fxq_aqlm_decode(const void *codes, int code_bytes, int nbits, int64_t O, int64_t G, int64_t NC, const float *cb,
                    int64_t og, int64_t ig, const float *scales, int64_t o0, int64_t o1, void *out, int64_t ld,
                    int out_dtype, int nthreads) {
    return aq_decode(codes, code_bytes, nbits, O, G, NC, cb, og, ig, scales, o0, o1, out, ld, out_dtype, nthreads);
}

#if FXQ_AVX512
int fxq512_aqlm_lut_gemv(const float *x, int64_t M, int64_t KP, const void *codes, int code_bytes, int nbits, int64_t O,
                         int64_t G, int64_t NC, const float *cbt, int64_t og, int64_t ig, const float *scales,
                         int64_t N, float *y, int64_t ldy, int round_x, int nthreads) {
    return aq_lut_gemv(x, M, KP, codes, code_bytes, nbits, O, G, NC, cbt, og, ig, scales, N, y, ldy, round_x, nthreads);
}

int fxq512_aqlm_decode(const void *codes, int code_bytes, int nbits, int64_t O, int64_t G, int64_t NC, const float *cb,
                       int64_t og, int64_t ig, const float *scales, int64_t o0, int64_t o1, void *out, int64_t ld,
                       int out_dtype, int nthreads) {
    return aq_decode(codes, code_bytes, nbits, O, G, NC, cb, og, ig, scales, o0, o1, out, ld, out_dtype, nthreads);
}
#endif /* FXQ_AVX512 */
