"""AQLM weights (``aqlm-<M>x<B>-g<in>``): additive quantization of groups of weights (Egiazarian et
al., *Extreme Compression of Large Language Models via Additive Quantization*, ICML 2024).

Math.  The weight ``W`` ``[N, K]`` is cut into blocks of ``out_group_size`` (``og``) rows by
``in_group_size`` (``ig``) columns; block ``(o, j)`` (rows ``o*og ..``, columns ``j*ig ..``) is
``scales[o]`` times the sum of ``M = num_codebooks`` codewords, one from each codebook of
``2**B`` entries (``B = nbits_per_codebook``)::

    W[o*og + r, j*ig + i] = scales[o] * sum_c codebooks[c, codes[o, j, c], r, i]

Storage (the aqlm library's ``QuantizedLinear`` tensors, as its and transformers' checkpoints hold
them; ``O = ceil(N / og)``, ``G = ceil(K / ig)``):

- ``codes`` ``[O, G, M]``: int8 for ``B <= 8``, int16 for ``B`` in 9..16.  A code is the low ``B``
  bits of the stored integer (two's complement): the aqlm library stores code ``v >= 2**(B-1)``
  as ``v - 2**B`` (``aqlm.utils.pack_int_data``) and reads it back as ``stored % 2**B``, so 1x16
  codes above 32767 are negative int16 and 8-bit codes above 127 negative int8.  Codes written
  without that shift (small non-negative values) read the same.
- ``codebooks`` ``[M, 2**B, og, ig]`` and ``scales`` ``[O, 1, 1, 1]``, both in the parameter dtype
  (fp16 in the published checkpoints; bf16 and fp32 are taken as well).

A weight whose ``N`` or ``K`` is not a multiple of ``og`` / ``ig`` (no aqlm checkpoint has one) is
stored padded with zero rows / columns; the ops take the true ``out_features`` / ``in_features``
and the padded columns meet zero activations.

Dequantization (:func:`dequantize`, the op's reference): the codewords are summed in fp32 in
codebook order, then multiplied by the scale in fp32.  The aqlm library computes the same sum and
product in the parameter dtype; with one codebook its fp16 result is this one rounded once to
fp16 (the product of two fp16 numbers is exact in fp32), with more codebooks it can differ by one
more fp16 rounding of the sum.

Bits per weight (every stored byte, :func:`nbytes`): ``M * 8 / (og*ig)`` for the codes when
``B <= 8`` (int8 containers: ``B < 8`` wastes bits) or ``M * 16 / (og*ig)`` above, plus
``16 * M * 2**B * og * ig / (N*K)`` for fp16 codebooks, plus ``16 / (og*K)`` for the scales:
``aqlm-1x16-g8`` on 4096 x 4096 is 2.0 + 0.5 + 0.004 = 2.504, ``aqlm-2x8-g8`` on SmolLM2's
1536 x 576 2.0 + 0.074 + 0.028 = 2.10.
"""
from __future__ import annotations

import torch

#: codebook entries are addressed by 1..16-bit codes (int8 storage up to 8 bits, int16 above)
NBITS = tuple(range(1, 17))
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: rows of ``W`` decoded at a time by :func:`dequantize` (bounds its fp32 temporaries)
BLOCK_ELEMENTS = 1 << 22


def code_dtype(nbits: int) -> torch.dtype:
    """Storage dtype of ``nbits``-bit codes: int8 up to 8 bits, int16 up to 16 (the aqlm library's)."""
    if nbits not in NBITS:
        raise ValueError(f"nbits_per_codebook={nbits!r} is not supported; valid: 1..16")
    return torch.int8 if nbits <= 8 else torch.int16


def padded(n: int, k: int, out_group_size: int, in_group_size: int) -> tuple[int, int]:
    """``(O, G)``: the number of out groups and in groups of an ``[n, k]`` weight."""
    return -(-n // out_group_size), -(-k // in_group_size)


def to_stored(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unsigned codes (any integer dtype, values ``0 .. 2**nbits - 1``) -> the stored signed form."""
    c = codes.to(torch.int32)
    c = torch.where(c >= (1 << (nbits - 1)), c - (1 << nbits), c)
    return c.to(code_dtype(nbits))


def unsigned(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Stored codes -> int64 codes ``0 .. 2**nbits - 1`` (the low ``nbits`` bits)."""
    return codes.to(torch.int64) & ((1 << nbits) - 1)


# ---- dequantize ------------------------------------------------------------------------------------------
def decode_groups(codes: torch.Tensor, codebooks: torch.Tensor, nbits: int) -> torch.Tensor:
    """Unscaled block values: stored codes ``[O', G, M]`` -> float32 ``[O', G, og, ig]``, the codewords
    summed in fp32 in codebook order."""
    m = codebooks.shape[0]
    flat = codebooks.reshape(m, codebooks.shape[1], -1)
    idx = unsigned(codes, nbits)
    out = flat[0].float().index_select(0, idx[..., 0].reshape(-1))
    for c in range(1, m):
        out += flat[c].float().index_select(0, idx[..., c].reshape(-1))
    return out.view(*codes.shape[:2], *codebooks.shape[2:])


def decode_rows(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int,
                o0: int, o1: int, out: torch.Tensor) -> torch.Tensor:
    """Out groups ``o0 .. o1`` of the padded weight (rows ``o0*og .. o1*og``, all ``G*ig`` columns) into
    ``out`` ``[(o1 - o0)*og, G*ig]`` (any float dtype): fp32 values, rounded once to ``out``'s dtype."""
    og, ig = codebooks.shape[2], codebooks.shape[3]
    v = decode_groups(codes[o0:o1], codebooks, nbits)
    v.mul_(scales[o0:o1].float().view(-1, 1, 1, 1))
    out.view(o1 - o0, og, -1, ig).copy_(v.permute(0, 2, 1, 3))
    return out


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int,
               out_features: int, in_features: int) -> torch.Tensor:
    """The stored tensors -> float32 ``[out_features, in_features]`` (module docstring)."""
    o, g = codes.shape[:2]
    og, ig = codebooks.shape[2], codebooks.shape[3]
    full = torch.empty(o * og, g * ig, device=codes.device)
    step = max(1, BLOCK_ELEMENTS // max(1, og * g * ig))
    for o0 in range(0, o, step):
        o1 = min(o, o0 + step)
        decode_rows(codes, codebooks, scales, nbits, o0, o1, full[o0 * og:o1 * og])
    if full.shape != (out_features, in_features):
        full = full[:out_features, :in_features].contiguous()
    return full


# ---- store -----------------------------------------------------------------------------------------------
def store(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int,
          param_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unsigned codes ``[O, G, M]``, float codebooks ``[M, 2**B, og, ig]`` and scales ``[O]`` -> the
    stored tensors (codes in their signed dtype; codebooks and scales in ``param_dtype``)."""
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype={param_dtype} is not supported; valid: float16, bfloat16, float32")
    return {"codes": to_stored(codes, nbits).contiguous(),
            "codebooks": codebooks.to(param_dtype).contiguous(),
            "scales": scales.reshape(-1, 1, 1, 1).to(param_dtype).contiguous()}


def nbytes(n: int, k: int, num_codebooks: int, nbits: int, in_group_size: int, out_group_size: int,
           param_dtype: torch.dtype = torch.float16) -> int:
    """Exact stored bytes of an ``[n, k]`` weight (codes, codebooks, scales)."""
    o, g = padded(n, k, out_group_size, in_group_size)
    p = param_dtype.itemsize
    return (o * g * num_codebooks * code_dtype(nbits).itemsize
            + num_codebooks * (1 << nbits) * out_group_size * in_group_size * p + o * p)


def bits_per_weight(n: int, k: int, num_codebooks: int, nbits: int, in_group_size: int, out_group_size: int,
                    param_dtype: torch.dtype = torch.float16) -> float:
    """Stored bits per weight as stored (int8 / int16 code storage: 8-bit containers for B < 8)."""
    return 8 * nbytes(n, k, num_codebooks, nbits, in_group_size, out_group_size, param_dtype) / max(1, n * k)
