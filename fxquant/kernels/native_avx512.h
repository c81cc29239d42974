/* Shared by every AVX-512 kernel file (native_avx512*.c, native_affine.c, ...): ISA detection, the tiling
 * constants and the small decode helpers.  Only static inline code: each .c includes it. */
#ifndef FXQ_NATIVE_AVX512_H
#define FXQ_NATIVE_AVX512_H

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#include <immintrin.h>
#define FXQ_AVX512 1
#else
#define FXQ_AVX512 0
#endif

#if FXQ_AVX512 && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define FXQ_BF16DOT 1
#else
#define FXQ_BF16DOT 0
#endif

#if FXQ_AVX512


#define INLINE static inline __attribute__((always_inline))
#define MT 4 /* rows of x per tile */
/* Bytes ahead of a weight stream that the GEMVs prefetch into L2 (i8_tile, M > 1).  The hardware prefetchers alone
 * keep too few DRAM requests in flight per core: measured int8wo 11008x4096, M=1, 2 threads,
 * interleaved medians (ms): none 2.53, 12 KB 1.90, 16 KB 1.38, 32 KB 1.33, 64 KB 1.28; 4096x11008:
 * none 2.16, 16 KB 1.48, 64 KB 1.09 (T0 hints and shorter distances were slower).  Zen 5 (same-process
 * medians, 11008x4096 M=1, fp32 x, us): weight from DRAM 64 KB 1304, 128 KB 1251, 256 KB 1254; the
 * weight partly in L3 (repeated calls) 753 / 581 / 594; 4096x4096 from DRAM 415 / 411 / 467. */
#ifndef PF_AHEAD
#define PF_AHEAD 131072
#endif

INLINE __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* call F(..., mb) with a compile-time constant mb in 1..MT */
#define DISPATCH_MB(mb, CALL) \
    switch (mb) {             \
    case 1: CALL(1); break;   \
    case 2: CALL(2); break;   \
    case 3: CALL(3); break;   \
    default: CALL(4); break;  \
    }

/* prefetches the scales (and separate zeros) of 64 rows from row r of group j: they lie a stride of N
 * rows from the previous group's, beyond the hardware prefetchers (a miss at every group otherwise) */
INLINE void sz64_prefetch(const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, int64_t j,
                          int64_t r) {
    const char *sp = (const char *)(scale + j * sz_grp + r * sz_row);
    const char *zp = zero && zero != scale + 1 ? (const char *)(zero + j * sz_grp + r * sz_row) : NULL;
    for (int64_t b = 0; b < 128 * sz_row; b += 64) {
        _mm_prefetch(sp + b, _MM_HINT_T0);
        if (zp) _mm_prefetch(zp + b, _MM_HINT_T0);
    }
}

/* 16 rows' scale and (zero - mid*scale) of group j from row r; rows >= N get 0 */
INLINE void sz16(const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, int64_t j,
                 int64_t r, int64_t N, __m512 vmid, __m512 *s, __m512 *zc) {
    __m512 z = _mm512_setzero_ps();
    if (r + 16 <= N && sz_row == 2 && zero == scale + 1) {
        const __m512i v = _mm512_loadu_si512((const void *)(scale + j * sz_grp + r * 2));
        *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else if (r + 16 <= N && sz_row == 1) {
#define BF16X16(P) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(P))), 16))
        *s = BF16X16(scale + j * sz_grp + r);
        if (zero) z = BF16X16(zero + j * sz_grp + r);
#undef BF16X16
    } else {
        float sv[16], zv[16];
        for (int i = 0; i < 16; i++) {
            sv[i] = r + i < N ? fxq_bf16(scale[j * sz_grp + (r + i) * sz_row]) : 0.f;
            zv[i] = r + i < N && zero ? fxq_bf16(zero[j * sz_grp + (r + i) * sz_row]) : 0.f;
        }
        *s = _mm512_loadu_ps(sv);
        z = _mm512_loadu_ps(zv);
    }
    *zc = _mm512_fnmadd_ps(vmid, *s, z);
}

/* the 4-bit table GEMVs' block scales, shared by the fp32 (native_avx512.c) and bf16 forms */
/* table[q] for 16 indices q in 0..255 from a 256-entry fp32 table held in 16 registers: eight
 * 32-entry two-register permutes, then a select tree on index bits 5..7.  Replaces a 16-lane
 * gather per 16 double-quant blocks: measured nf4-64+dq 11008x4096 M=1 raw kernel, interleaved
 * medians, 1324 -> 1095 us (bit-identical results). */
INLINE __m512 code256(__m512i q, const __m512 tab[16]) {
    __m512 r[8];
    for (int j = 0; j < 8; j++) r[j] = _mm512_permutex2var_ps(tab[2 * j], q, tab[2 * j + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(128));
    const __m512 a0 = _mm512_mask_blend_ps(b5, r[0], r[1]), a1 = _mm512_mask_blend_ps(b5, r[2], r[3]);
    const __m512 a2 = _mm512_mask_blend_ps(b5, r[4], r[5]), a3 = _mm512_mask_blend_ps(b5, r[6], r[7]);
    return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, a0, a1), _mm512_mask_blend_ps(b6, a2, a3));
}

INLINE void row_scales512(int64_t n, int64_t nblk, int mode, const void *sc, const float *dq_code,
                          const float *dq_scale, float dq_offset, int64_t dq_block, float *out) {
    if (mode != 2 || dq_block < 16) {
        fxq_row_scales(n, nblk, mode, sc, dq_code, dq_scale, dq_offset, dq_block, out);
        return;
    }
    const int64_t b0 = n * nblk;
    const uint8_t *q = (const uint8_t *)sc + b0;
    const __m512 off = _mm512_set1_ps(dq_offset);
    __m512 tab[16]; /* dq_code has 256 entries (native_cpu pads it) */
    for (int i = 0; i < 16; i++) tab[i] = _mm512_loadu_ps(dq_code + 16 * i);
    int64_t nested = b0 / dq_block, left = dq_block - b0 % dq_block; /* blocks left in `nested` */
    for (int64_t blk = 0; blk < nblk; blk += 16) {
        const __mmask16 mk = tail16(nblk - blk);
        const __m512 c = code256(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, q + blk)), tab);
        __m512 s = _mm512_set1_ps(dq_scale[nested]);
        if (left <= 16) { /* lanes from `left` on are in the next nested block */
            if (left < 16 && left < nblk - blk)
                s = _mm512_mask_blend_ps((__mmask16)((1u << left) - 1), _mm512_set1_ps(dq_scale[nested + 1]), s);
            nested++, left += dq_block;
        }
        left -= 16;
        _mm512_mask_storeu_ps(out + blk, mk, _mm512_fmadd_ps(c, s, off));
    }
}

/* the row loop of the 4-bit table GEMVs: per row of codes its block scales (sbuf: the thread's nblk
 * floats of SB, which holds nthreads * nblk), then tiles of up to MT rows of x through CALL(mb),
 * which writes out[] */
#define LUT4_ROWS(CALL, SB)                                                                             \
    _Pragma("omp parallel num_threads(nthreads)") {                                                    \
        float *sbuf = (SB) + omp_get_thread_num() * nblk;                                              \
        _Pragma("omp for schedule(guided)") for (int64_t n = 0; n < N; n++) {                          \
            row_scales512(n, nblk, mode, sc, dq_code, dq_scale, dq_offset, dq_block, sbuf);             \
            for (int64_t m0 = 0; m0 < M; m0 += MT) {                                                    \
                const int mb = M - m0 < MT ? (int)(M - m0) : MT;                                        \
                float out[MT];                                                                          \
                DISPATCH_MB(mb, CALL)                                                                   \
                for (int i = 0; i < mb; i++) y[(m0 + i) * ldy + n] = out[i];                            \
            }                                                                                           \
        }                                                                                               \
    }

/* 4-bit codes in int4pack's tile order (native_avx512.c's GEMV and native_avx512_axis0.c's): the
 * nibble-pair bytes of one k, rebuilt from sub-4-bit shards where needed */
struct np_src {      /* where the 16 nibble-pair bytes of one k come from */
    const uint8_t *q0, *q1;  /* shard bytes at k = 0 of the group (q1 NULL: one shard) */
    __m128i c0, c1, mk0, mk1, sh1;
    int fast4;       /* the stored 4-bit bytes themselves */
};

/* the shard-independent fields of an np_src: shard widths w0 (and w1 when s1 is set) */
INLINE struct np_src np_src_init(int64_t w0, const uint8_t *s1, int64_t w1) {
    struct np_src s;
    memset(&s, 0, sizeof s);
    s.fast4 = w0 == 4 && s1 == NULL;
    s.sh1 = _mm_cvtsi32_si128((int)w0);
    s.mk0 = _mm_set1_epi8(w0 == 1 ? 0x11 : 0x33);
    s.mk1 = _mm_set1_epi8(w1 == 1 ? 0x11 : 0x33);
    return s;
}

INLINE __m128i np16(const struct np_src *s, int64_t off) {
    const __m128i v0 = _mm_loadu_si128((const __m128i *)(s->q0 + off));
    if (s->fast4) return v0;
    __m128i v = _mm_and_si128(_mm_srl_epi16(v0, s->c0), s->mk0);
    if (s->q1)
        v = _mm_or_si128(v, _mm_sll_epi16(_mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(s->q1 + off)),
                                                                       s->c1), s->mk1), s->sh1));
    return v;
}


/* the codes of one nibble-pair byte vector as fp32 lanes: vpermps reads the low 4 bits of each
 * lane, so the identity table 0..15 turns a widened byte into its low nibble without a mask */
#define I4_LO(v, ident) _mm512_permutexvar_ps((v), (ident))
#define I4_HI(v, ident) _mm512_permutexvar_ps(_mm512_srli_epi32((v), 4), (ident))

#if FXQ_BF16DOT
/* The int4 bf16-dot decode (i4b_tile's comment): a 64-byte load holds the 32 nibble-pair bytes of k
 * and of k+1; the indices put byte i of both halves into bytes 0 and 2 of lane i (P0: bytes 0..15,
 * P1: 16..31), and each nibble becomes the bf16 bits of 16 + q.  w[c] holds rows {0, 32, 16, 48}[c]
 * + lane of the 64 rows, (k, k+1) in each lane's two halves. */
INLINE void i4pair_idx(__m512i *idx0, __m512i *idx1) {
    uint8_t ix0[64], ix1[64];
    for (int i = 0; i < 16; i++) {
        ix0[4 * i] = (uint8_t)i, ix0[4 * i + 2] = (uint8_t)(32 + i);
        ix1[4 * i] = (uint8_t)(16 + i), ix1[4 * i + 2] = (uint8_t)(48 + i);
        ix0[4 * i + 1] = ix0[4 * i + 3] = ix1[4 * i + 1] = ix1[4 * i + 3] = 0;
    }
    *idx0 = _mm512_loadu_si512(ix0), *idx1 = _mm512_loadu_si512(ix1);
}

static const int I4PAIR_ROWS[4] = {0, 32, 16, 48}; /* w[c]'s first row in the 64-row tile */

#define I4PAIR_M78 0x00780078 /* the code's bits once shifted into the mantissa */
#define I4PAIR_C41 0x41804180 /* bf16 16.0 in both halves */
/* i4pair_words with its two constants (I4PAIR_M78, I4PAIR_C41 in every dword) passed in */
INLINE void i4pair_words_k(__m512i v, __m512i idx0, __m512i idx1, __m512i m78, __m512i c41, __m512i w[4]) {
    const __mmask64 even = 0x5555555555555555ull;
    const __m512i p0 = _mm512_maskz_permutexvar_epi8(even, idx0, v);
    const __m512i p1 = _mm512_maskz_permutexvar_epi8(even, idx1, v);
    w[0] = _mm512_ternarylogic_epi32(_mm512_slli_epi32(p0, 3), m78, c41, 0xEA);
    w[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(p0, 1), m78, c41, 0xEA);
    w[2] = _mm512_ternarylogic_epi32(_mm512_slli_epi32(p1, 3), m78, c41, 0xEA);
    w[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(p1, 1), m78, c41, 0xEA);
}

INLINE void i4pair_words(__m512i v, __m512i idx0, __m512i idx1, __m512i w[4]) {
    i4pair_words_k(v, idx0, idx1, _mm512_set1_epi32(I4PAIR_M78), _mm512_set1_epi32(I4PAIR_C41), w);
}

/* 32 4-bit table codes (16 bytes, the first of each pair in the high nibble) -> their 32 bf16 values
 * tbl[code] * sv in fp32 rounded once, in order; ilv: the vpermw order {0, 16, 1, 17, ...} interleaving
 * the high- and low-nibble halves.  vpermps reads an index's low 4 bits: no mask for the low nibble. */
INLINE __m512i l4_bf16x32(__m128i b, __m512 tbl, __m512 sv, __m512i ilv) {
    const __m512i w = _mm512_cvtepu8_epi32(b);
    const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), tbl), sv); /* elements 2j */
    const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(w, tbl), sv); /* 2j + 1 */
    return _mm512_permutexvar_epi16(ilv, (__m512i)_mm512_cvtne2ps_pbh(lo, hi));
}
#endif /* FXQ_BF16DOT */

#endif /* FXQ_AVX512 */
#endif /* FXQ_NATIVE_AVX512_H */
