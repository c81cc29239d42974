/* fxquant native CPU kernels, AVX512-BF16: weight decoders to bf16 for the dequantize + dense GEMM path at
 * large M (``fxquant.ops._dequant_gemm``).  It is what CPUs with AMX run (oneDNN's AMX bf16 GEMM outruns
 * any decode inside an AVX-512 GEMM there), and what formats without a decode-inside-the-GEMM kernel run
 * everywhere (the integer affine layout of GPTQ / AWQ / compressed-tensors checkpoints), so the decode is
 * all that separates a weight-only format from bf16 at prefill: these write the same values as the
 * PyTorch decoders they replace, bit for bit, at memory speed (5632x2048: int4wo ~19 ms of PyTorch ops,
 * docs/performance.md has the figures). */
#include <string.h>

#include "native_avx512.h"

#if FXQ_AVX512
#if FXQ_BF16DOT

/* ---------------------------------------------------------------------------------------------
 * int4 tiles (the layout of native_cpu.c's int4 comment: tile t of 64 rows, column k, byte d < 32 at
 * (t*K + k)*32 + d holds row 64t + d in its low nibble and row 64t + 32 + d in its high one) -> W.T:
 * out[k * ldo + (n - n0)] = bf16(fma(q - mid, s[j, n], z[j, n])) for rows n0 <= n < n1 (n0 a multiple of
 * 64), k < K, j = k / gs: PyTorch's addcmul(z, q - mid, s) in fp32 rounded once to bf16 (the product is
 * exact).  s, z bf16 at [j * sz_grp + n * sz_row] (z NULL: 0); rows >= n_sz have none and are not
 * written.  Transposed: one column of a tile is 64 consecutive outputs, no transpose in registers; the
 * GEMM reads W.T as it reads W. */
static void i4t_sz64(const uint16_t *scale, const uint16_t *zero, int64_t sz_row, int64_t sz_grp, int64_t j,
                     int64_t r, int64_t n_sz, float *s, float *z) {
    for (int i = 0; i < 64; i++) {
        const int64_t n = r + i;
        uint32_t su = 0, zu = 0;
        if (n < n_sz) {
            su = (uint32_t)scale[j * sz_grp + n * sz_row] << 16;
            zu = zero ? (uint32_t)zero[j * sz_grp + n * sz_row] << 16 : 0;
        }
        memcpy(s + i, &su, 4);
        memcpy(z + i, &zu, 4);
    }
}

int fxq512_int4t_to_bf16t(const uint8_t *w, int64_t K, int64_t n0, int64_t n1, int64_t gs, const uint16_t *scale,
                          const uint16_t *zero, int64_t sz_row, int64_t sz_grp, int64_t n_sz, float mid, uint16_t *out,
                          int64_t ldo, int nthreads) {
    if (n0 % 64 || n1 < n0 || gs <= 0 || K % gs || ldo < n1 - n0) return FXQ_EARG;
    const int64_t tiles = (n1 - n0 + 63) / 64, groups = K / gs;
    _Alignas(64) float tq[16];
    for (int q = 0; q < 16; q++) tq[q] = (float)q - mid; /* exact: |q - mid| < 2^24 */
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t j = 0; j < groups; j++) {
            const int64_t r = n0 + 64 * t, left = n1 - r;
            const __mmask32 m0 = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1ull << left) - 1);
            const __mmask32 m1 = left >= 64 ? 0xFFFFFFFFu : left <= 32 ? 0 : (__mmask32)((1ull << (left - 32)) - 1);
            _Alignas(64) float s[64], z[64];
            i4t_sz64(scale, zero, sz_row, sz_grp, j, r, n_sz, s, z);
            const __m512 tv = _mm512_load_ps(tq);
            __m512 sv[4], zv[4];
            for (int c = 0; c < 4; c++) sv[c] = _mm512_load_ps(s + 16 * c), zv[c] = _mm512_load_ps(z + 16 * c);
            const uint8_t *col = w + ((r / 64) * K + j * gs) * 32;
            uint16_t *o = out + j * gs * ldo + (r - n0);
            for (int64_t k = 0; k < gs; k++, col += 32, o += ldo) {
                const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)col));
                const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(col + 16)));
                /* vpermps reads an index's low 4 bits: the low nibble as it is, the high one shifted down */
                const __m512 r0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, tv), sv[0], zv[0]);
                const __m512 r1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, tv), sv[1], zv[1]);
                const __m512 r2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), tv), sv[2], zv[2]);
                const __m512 r3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), tv), sv[3], zv[3]);
                _mm512_mask_storeu_epi16(o, m0, (__m512i)_mm512_cvtne2ps_pbh(r1, r0));
                if (m1) _mm512_mask_storeu_epi16(o + 32, m1, (__m512i)_mm512_cvtne2ps_pbh(r3, r2));
            }
        }
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * 4-bit table codes (NF4 / FP4: flat, two per byte, the first in the high nibble, row n at byte n * K / 2)
 * -> W rows n0 <= n < n1: out[(n - n0) * ldo + k] = bf16(tbl[code] * scale[(n * K + k) >> shift]) (fp32
 * product rounded once: the chunked decode's fp32 dequantize then cast), pieces of 2^shift >= 32 elements
 * dividing K (so 32-element units never straddle one). */
int fxq512_lut4_to_bf16(const uint8_t *codes, int64_t K, int64_t n0, int64_t n1, const float *table, const float *scale,
                        int shift, uint16_t *out, int64_t ldo, int nthreads) {
    if (shift < 5 || shift > 30 || K % ((int64_t)1 << shift) || n1 < n0 || ldo < K) return FXQ_EARG;
    _Alignas(64) int16_t ilv[32];
    for (int i = 0; i < 16; i++) ilv[2 * i] = (int16_t)i, ilv[2 * i + 1] = (int16_t)(16 + i);
    const int64_t units = K / 32, per_row = K >> shift;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; n++) {
        const __m512 tv = _mm512_loadu_ps(table);
        const __m512i iv = _mm512_load_si512(ilv);
        const uint8_t *row = codes + n * (K / 2);
        const float *sc = scale + n * per_row;
        uint16_t *o = out + (n - n0) * ldo;
        for (int64_t u = 0; u < units; u++)
            _mm512_storeu_si512(o + 32 * u, l4_bf16x32(_mm_loadu_si128((const __m128i *)(row + 16 * u)), tv,
                                                       _mm512_set1_ps(sc[(32 * u) >> shift]), iv));
    }
    return FXQ_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Integer affine rows (fxquant.formats.affine: row n's codes one little-endian bit stream of `bits`-bit
 * codes, `words` int32 words per row) -> out[(n - n0) * ldo + k] = (q - z[n, j]) * s[n, j] in fp32, j = k / gs,
 * rounded once to bf16 (out_bf16) or stored as fp32: formats.affine.decode_rows' values.  s fp32 [N, G]
 * (row stride G), z uint8 [N, G] or NULL (2^(bits - 1)).  Sixteen codes per step, each lane's 32-bit
 * window gathered at its code's byte and shifted down (a code of <= 8 bits at bit offset o lies in bytes
 * o / 8 and o / 8 + 1); the steps whose windows would pass the row's last word (a row's tail) are read
 * byte by byte into the same lanes. */
INLINE int64_t aff_code(const uint8_t *row, int64_t row_bytes, int64_t k, int bits) {
    const int64_t o = k * bits, b = o >> 3;
    const uint32_t v = row[b] | (b + 1 < row_bytes ? (uint32_t)row[b + 1] << 8 : 0u);
    return (v >> (o & 7)) & ((1u << bits) - 1);
}

int fxq512_affine_to_rows(const int32_t *qw, int64_t words, int64_t K, int64_t n0, int64_t n1, int bits, int64_t gs,
                          const float *scale, const uint8_t *zero, int64_t G, void *out, int64_t ldo, int out_bf16,
                          int nthreads) {
    if (bits < 1 || bits > 8 || gs <= 0 || n1 < n0 || ldo < K || G != (K + gs - 1) / gs || words * 32 < K * bits
        || K * bits >= ((int64_t)1 << 31))
        return FXQ_EARG;
    const float mid = (float)(1 << (bits - 1));
    const int64_t row_bytes = words * 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; n++) {
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i vbits = _mm512_set1_epi32(bits), mask = _mm512_set1_epi32((1 << bits) - 1);
        const __m512i seven = _mm512_set1_epi32(7);
        const uint8_t *row = (const uint8_t *)(qw + n * words);
        const float *sr = scale + n * G;
        const uint8_t *zr = zero ? zero + n * G : NULL;
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            const int64_t left = K - k0;
            const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 q;
            if (left >= 16 && (((k0 + 15) * bits) >> 3) + 4 <= row_bytes) {
                const __m512i off = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)k0), lane), vbits);
                const __m512i v = _mm512_i32gather_epi32(_mm512_srli_epi32(off, 3), (const void *)row, 1);
                q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, _mm512_and_si512(off, seven)), mask));
            } else {
                _Alignas(64) float t[16] = {0};
                for (int i = 0; i < 16 && i < left; i++) t[i] = (float)aff_code(row, row_bytes, k0 + i, bits);
                q = _mm512_load_ps(t);
            }
            __m512 s, z;
            if (gs % 16 == 0) { /* the 16 columns lie in one group */
                const int64_t j = k0 / gs;
                s = _mm512_set1_ps(sr[j]);
                z = _mm512_set1_ps(zr ? (float)zr[j] : mid);
            } else {
                _Alignas(64) float ts[16], tz[16];
                for (int i = 0; i < 16; i++) {
                    const int64_t j = (k0 + i < K ? k0 + i : K - 1) / gs;
                    ts[i] = sr[j];
                    tz[i] = zr ? (float)zr[j] : mid;
                }
                s = _mm512_load_ps(ts);
                z = _mm512_load_ps(tz);
            }
            const __m512 w = _mm512_mul_ps(_mm512_sub_ps(q, z), s); /* q - z exact: one rounding, as the reference */
            if (out_bf16)
                _mm256_mask_storeu_epi16((uint16_t *)out + (n - n0) * ldo + k0, m, (__m256i)_mm512_cvtneps_pbh(w));
            else
                _mm512_mask_storeu_ps((float *)out + (n - n0) * ldo + k0, m, w);
        }
    }
    return FXQ_OK;
}

#endif /* FXQ_BF16DOT */
#endif /* FXQ_AVX512 */
