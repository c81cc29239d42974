"""Integer affine weights with integer zero points (``affine<b>-g<g>``): ``W = (q - z) * s``, the
layout compressed-tensors' ``pack-quantized`` checkpoints (and GPTQ / AWQ ones) store.

Math, per group of ``g`` consecutive input columns of one output row (group ``j`` of row ``n`` holds
columns ``j*g .. min((j+1)*g, K) - 1``; per channel ``g = K``; a partial last group is allowed):

- unsigned codes ``q`` in ``0 .. 2**b - 1``, an integer zero point ``z`` in ``0 .. 2**b - 1`` and a scale
  ``s`` stored in ``scale_dtype`` (bf16, fp16 or fp32, the model dtype of a checkpoint);
  ``W = (q - z) * s``.  Symmetric: ``z = 2**(b-1)`` for every group and no zero is stored
  (compressed-tensors' signed codes ``c = q - 2**(b-1)`` with zero point 0).
- Round to nearest (compressed-tensors' min-max observer and GPTQ's ``find_params``: the range always
  holds 0, so 0 is exact): ``lo = min(min W, 0)``, ``hi = max(max W, 0)``; asymmetric
  ``s = (hi - lo) / (2**b - 1)``, ``z = clamp(round(-lo / s))``; symmetric
  ``s = max(-lo, hi) / ((2**b - 1) / 2)``; ``s`` is rounded *up* to ``scale_dtype`` (so the range fits
  the codes, as the other fxquant formats do; an all-zero group gets ``eps``), then
  ``q = clamp(round(W / s) + z)`` against the stored scale.
- Dequantization (:func:`dequantize`) computes ``(q - z) * s`` in fp32: exact for bf16 / fp16 scales
  (``q - z`` has at most 9 significant bits, ``s`` at most 11), one fp32 rounding for fp32 scales.
  compressed-tensors computes ``(q - z) * s`` in the scale dtype, i.e. the same value rounded once to
  it: ``dequantize(...).to(scale_dtype)`` is its weight bit for bit.

Storage (``N`` rows, ``K`` columns, ``G = ceil(K / g)`` groups):

- ``qweight`` int32 ``[N, ceil(K * b / 32)]``: each row's codes as one little-endian bit stream, code
  ``k`` at bits ``k*b .. k*b + b - 1`` (least significant first) of 32-bit words: exactly
  compressed-tensors' ``weight_packed`` (its ``pack_to_int32`` along dim 1; the unsigned values it
  packs are ``c + 2**(b-1) = q``).  For ``b`` in 1, 2, 4, 8 every compressed-tensors version wrote
  this layout; for the other widths versions before its dense packing left bits unused.
- ``scale`` ``[N, G]`` in ``scale_dtype``; ``zero_point`` uint8 ``[N, G]`` (empty ``(0,)`` when symmetric).

GPTQ and AWQ checkpoints (:mod:`fxquant.checkpoints.gptq`, :mod:`fxquant.checkpoints.awq`) load into this
layout: GPTQ's ``qweight`` ``[K*b/32, N]`` is these rows transposed (its 3-bit packing included), AWQ's
``[K, N/8]`` (packed along N in the order 0, 2, 4, 6, 1, 3, 5, 7) is repacked once at load, their packed
zero points become ``zero_point`` uint8 (GPTQ v1's ``zeros - 1`` included).  GPTQ's act-order ``g_idx``
is a permutation of the columns applied once at load (the exllama approach): the op
``linear_affine_perm`` (:mod:`fxquant.ops.affine_perm`) holds this layout plus ``perm`` and gathers x.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ._common import pad_last_group, round_up_to
from .grid import Grid

#: widths the op and the packing take (the scheme: 2..8)
BITS = tuple(range(1, 9))
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: codes decoded per block by :func:`dequantize` and the packing (bounds the temporaries)
BLOCK_CODES = 1 << 22


# ---- the int32 bit stream --------------------------------------------------------------------------------
def packed_words(cols: int, bits: int) -> int:
    """int32 words of one packed row of ``cols`` codes."""
    return -(-cols * bits // 32)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides (``contiguous()`` keeps any stride on a size-1 dim, which a dtype
    view refuses)."""
    return t if t.is_contiguous() and t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _to_words(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, 4W]`` (little-endian words) -> int32 ``[R, W]``."""
    if sys.byteorder == "big":
        b = b.reshape(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    return _dense(b).view(torch.int32)


def _to_bytes(w: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, W]`` -> uint8 ``[R, 4W]``, the bytes of little-endian words."""
    b = _dense(w).view(torch.uint8)
    if sys.byteorder == "big":
        b = b.reshape(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    return b


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[R, C]`` (integers in ``0 .. 2**bits - 1``) -> int32 ``[R, ceil(C*bits/32)]``:
    each row a little-endian bit stream (module docstring; compressed-tensors' ``pack_to_int32``)."""
    _check_bits(bits)
    r, c = codes.shape
    words = packed_words(c, bits)
    cp = -(-c // 32) * 32  # whole 32-code chunks: ``bits`` words each
    rows = max(1, BLOCK_CODES // max(cp, 1))
    out = torch.empty(r, words, dtype=torch.int32, device=codes.device)
    for r0 in range(0, r, rows):
        q = codes[r0:r0 + rows].to(torch.uint8)
        if cp > c:
            q = torch.cat([q, q.new_zeros(q.shape[0], cp - c)], 1)
        if 8 % bits == 0:  # whole codes per byte: shift them into place
            per = 8 // bits
            q = q.reshape(q.shape[0], -1, per)
            byte = q[..., 0].clone()
            for i in range(1, per):
                byte |= q[..., i] << (bits * i)
        else:  # bit by bit: bit t of code k is bit k*bits + t of the stream
            bit = (q[..., None] >> torch.arange(bits, dtype=torch.uint8, device=q.device)) & 1
            bit = bit.reshape(q.shape[0], -1, 8) << torch.arange(8, dtype=torch.uint8, device=q.device)
            byte = bit.sum(-1, dtype=torch.uint8)
        out[r0:r0 + rows] = _to_words(byte.reshape(q.shape[0], -1)[:, :words * 4])
    return out


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[R, W]`` -> uint8 ``[R, cols]``."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != packed_words(cols, bits):
        raise ValueError(f"{cols} codes of {bits} bits pack into int32 [rows, {packed_words(cols, bits)}], "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    b = _to_bytes(packed)
    r = b.shape[0]
    if 8 % bits == 0:
        mask = (1 << bits) - 1
        if bits == 8:
            return b[:, :cols].clone()
        parts = [(b >> (bits * i)) & mask for i in range(8 // bits)]
        return torch.stack(parts, -1).reshape(r, -1)[:, :cols]
    bit = (b[..., None] >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1
    bit = bit.reshape(r, -1)[:, :cols * bits].reshape(r, cols, bits)
    return (bit << torch.arange(bits, dtype=torch.uint8, device=b.device)).sum(-1, dtype=torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; valid: 1..8")


# ---- quantize ----------------------------------------------------------------------------------------
def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def fit(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
        scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters of groups with ranges ``lo .. hi`` -> float32 ``(scale, zero)``
    holding the stored values (scale in ``scale_dtype``, integer zero; module docstring)."""
    qmax = (1 << bits) - 1
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    raw = torch.maximum(-lo, hi) / (qmax / 2) if symmetric else (hi - lo) / qmax
    scale = round_up_to(raw, scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale.float())
    if symmetric:
        return scale, torch.full_like(scale, 1 << (bits - 1))
    return scale, torch.round(-lo / scale).clamp_(0, qmax)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float32, ``0 .. 2**bits - 1``) of ``w`` for the parameters (broadcastable against ``w``)."""
    return (torch.round(w / scale) + zero).clamp_(0, (1 << bits) - 1)


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float ``[N, K]`` -> (codes uint8 ``[N, K]``, scale ``[N, G]`` in ``scale_dtype``, zero uint8
    ``[N, G]`` or ``None`` when symmetric); ``group_size`` >= 1 (per channel: K)."""
    _check_bits(bits)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype} is not supported; valid: bfloat16, float16, float32")
    n, k = weight.shape
    g = group_size
    w = pad_last_group(weight.detach().float(), num_groups(k, g) * g).reshape(n, -1, g)
    scale, zero = fit(w.amin(-1), w.amax(-1), bits, symmetric, scale_dtype)
    q = encode(w, scale[..., None], zero[..., None], bits).to(torch.uint8).reshape(n, -1)[:, :k]
    return q, scale.to(scale_dtype), None if symmetric else zero.to(torch.uint8)


def store(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> dict[str, torch.Tensor]:
    """Codes ``[N, K]``, scale ``[N, G]``, zero ``[N, G]`` or ``None`` -> the stored buffers."""
    empty = torch.empty(0, dtype=torch.uint8, device=codes.device)
    return {"qweight": pack_rows(codes, bits), "scale": scale.contiguous(),
            "zero_point": empty if zero is None else zero.to(torch.uint8).contiguous()}


def to_storage(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Quantize float ``[N, K]`` into ``qweight``, ``scale``, ``zero_point``."""
    q, scale, zero = quantize(weight, bits, group_size, symmetric, scale_dtype)
    return store(q, scale, zero, bits)


# ---- dequantize ------------------------------------------------------------------------------------------
def decode_rows(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int,
                in_features: int, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``r0 .. r1`` of ``W`` into ``out`` ``[r1 - r0, K]`` (any float dtype): ``(q - z) * s``
    computed in fp32, then rounded once to ``out``'s dtype."""
    k, g = in_features, group_size
    q = unpack_rows(qweight[r0:r1], bits, k)
    acc = out if out.dtype == torch.float32 else torch.empty(out.shape, device=out.device)
    acc.copy_(q)
    s = scale[r0:r1].float()
    z = zero_point[r0:r1].float() if zero_point.numel() else None
    full = k // g * g
    for c0, c1, sl in ((0, full, slice(0, k // g)), (full, k, slice(k // g, k // g + 1))):
        if c1 > c0:  # whole groups as a [R, G, g] view, then the partial last group
            view = acc[:, c0:c1].view(acc.shape[0], -1, min(g, c1 - c0))
            view.sub_(z[:, sl, None] if z is not None else float(1 << (bits - 1))).mul_(s[:, sl, None])
    if acc is not out:
        out.copy_(acc)
    return out


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, group_size: int,
               in_features: int) -> torch.Tensor:
    """The stored buffers -> float32 ``[N, K]`` (the op's reference dequantization)."""
    n = qweight.shape[0]
    out = torch.empty(n, in_features, device=qweight.device)
    rows = max(1, BLOCK_CODES // max(in_features, 1))
    for r0 in range(0, n, rows):
        decode_rows(qweight, scale, zero_point, bits, group_size, in_features, r0, min(n, r0 + rows),
                    out[r0:r0 + rows])
    return out


def nbytes(n: int, k: int, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> int:
    """Exact stored bytes of an ``[n, k]`` weight."""
    groups = n * num_groups(k, group_size)
    return n * packed_words(k, bits) * 4 + groups * scale_dtype.itemsize + (0 if symmetric else groups)


# ---- the code grid the algorithms (GPTQ, AWQ, HQQ) work on ------------------------------------------------
@dataclass(frozen=True)
class AffineGrid(Grid):
    """:class:`~fxquant.formats.grid.Grid` of this format: codes ``0 .. 2**b - 1``, ``mid = 2**(b-1)``,
    axis 1.  The grid's ``offset`` (the value of code ``mid``) is ``(mid - z) * scale`` with an integer
    ``z``: :meth:`fit` and :meth:`store` make it so, and :meth:`encode` / :meth:`decode` recover ``z`` as
    ``mid - round(offset / scale)``, so codes and values are this format's (``(q - z) * s``)."""

    bits: int = 4

    def zero(self, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The integer zero points a grid ``offset`` stands for."""
        if self.symmetric:
            return torch.full_like(scale.float(), self.mid)
        return (self.mid - torch.round(offset.float() / scale.float())).clamp_(self.qlo, self.qhi)

    def fit(self, wg, lo=None, hi=None):
        lo = wg.amin(dim=-1) if lo is None else lo
        hi = wg.amax(dim=-1) if hi is None else hi
        scale, zero = fit(lo, hi, self.bits, self.symmetric, self.param_dtype)
        return scale, (self.mid - zero) * scale

    def store(self, scale, offset):
        s = scale.float().abs().to(self.param_dtype).float()
        s = torch.where(s == 0, torch.finfo(self.param_dtype).eps, s)
        if self.symmetric or offset is None:
            return s, torch.zeros_like(s)
        z = (self.mid - torch.round(offset.float() / s)).clamp_(self.qlo, self.qhi)
        return s, (self.mid - z) * s

    def encode(self, wg, scale, offset):
        s = _col(scale, wg)
        return encode(wg, s, self.zero(s, _col(offset, wg)), self.bits)

    def decode(self, q, scale, offset):
        s = _col(scale, q)
        return (q.float() - self.zero(s, _col(offset, q))) * s


def _col(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    p = p.float()
    return p[:, None] if p.dim() == 1 and like.dim() == 2 else p
