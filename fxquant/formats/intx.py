"""Group-wise b-bit integer weights, b in 1..8 (``int<b>wo-<g>`` / ``uint<b>wo-<g>``), bit-packed.

Math (one formula for both flavours): with ``mid = 2**(b-1)`` and unsigned codes ``q`` in
``0 .. 2**b - 1``, every element of a group dequantizes to ``W ≈ (q - mid) * scale + offset``.

- ``uint<b>`` (asymmetric, the HQQ ``optimize=False`` / min-max convention): per group,
  ``scale = (max - min) / (2**b - 1)`` rounded *up* to bfloat16, ``offset`` = the value code ``mid``
  stands for, ``min + mid * scale`` rounded to bfloat16, then ``q = round((W - offset) / scale + mid)``
  against the stored values.  HQQ writes the same grid as ``(q - zero) * scale`` with a float
  zero point ``zero = mid - offset / scale``; storing the value of the middle code instead keeps the
  bf16 rounding of the zero point at ``|offset| * 2**-9`` (a bf16 zero point in code units would
  be off by up to half a code at b = 8).  For b = 4, axis 1 this is exactly ``int4wo``'s math.
- ``int<b>`` (symmetric, torchao's ``MappingType.SYMMETRIC`` for ``torch.int<b>``): signed codes
  ``c = q - mid`` in ``[-2**(b-1), 2**(b-1) - 1]``, ``scale = absmax / ((2**b - 1) / 2)`` rounded up
  to bfloat16, ``c = clamp(round(W / scale))``; no offset is stored (it is 0).  b = 1 is rejected:
  its only levels are ``{-scale, 0}`` (torchao's int1 maps every weight of a group to 0 or -2·absmax).

Error bound per element: ``scale / 2`` (symmetric: exactly; the clamped top code is ``scale / 2``
below ``absmax``), asymmetric plus the bf16 rounding of the offset, ``|offset| * 2**-8``.

Groups (HQQ's ``axis``, checked against ``hqq.core.quantize.Quantizer``), for ``W`` ``[N, K]``:

- ``axis=1`` (default; HQQ ``W.reshape(-1, g)``): ``g`` consecutive input columns of one output
  row.  Needs ``K % g == 0``.  ``scale``/``offset`` bf16 ``[K/g, N]``, group of ``(n, k)`` is
  ``[k // g, n]``.
- ``axis=0`` (HQQ ``W.reshape(g, -1)``): one input column ``k`` and the ``g`` rows
  ``r, r + N/g, r + 2N/g, ...`` (rows strided by ``N/g``, as HQQ's reshape makes them).  Needs
  ``N % g == 0``.  ``scale``/``offset`` bf16 ``[N/g, K]``, group of ``(n, k)`` is ``[n % (N/g), k]``.

Storage, for both axes:

- Rows are padded to ``Np`` (a multiple of 64, padded codes 0) and the ``Np * K`` codes are put in
  the tile order of ``aten._convert_weight_to_int4pack_for_cpu`` (:func:`tile_order`; ``block_n``
  rows per tile, ``int4.native_cpu_block_n()`` when quantized).
- A code is split in *planes*: its low ``min(b, 4)`` bits and, for b > 4, its high ``b - 4`` bits.
- Each plane of ``p`` bits is one dense little-endian bit stream (:func:`pack_bits`): code ``i``
  of the sequence occupies bits ``[i*p, (i+1)*p)``; 8 codes fill ``p`` bytes, nothing is padded
  but the last byte.  ``codes_lo`` uint8 ``[ceil(Np*K*min(b,4)/8)]``, ``codes_hi`` uint8
  ``[ceil(Np*K*(b-4)/8)]`` (empty for b <= 4).

So a 4-bit plane *is* the int4 CPU kernel's packed weight (``codes_lo.view(Np, K/2)``): b = 4 and
b = 8 (two planes) run ``aten._weight_int4pack_mm_for_cpu`` on the stored bytes as they are, and
b = 1..3 and the high plane of b = 5..7 are widened to that layout per call (:func:`widen_to_nibbles`).
"""
from __future__ import annotations

import torch

from . import int4
from ._common import round_up_to

BITS = tuple(range(1, 9))
AXES = (0, 1)
PARAM_DTYPE = torch.bfloat16
KERNEL_GROUP_SIZES = int4.GROUP_SIZES  # what aten._weight_int4pack_mm_for_cpu accepts
MIN_SCALE = 1e-10  # scale of an all-equal group: any positive value gives exact codes


# ---- bit streams -------------------------------------------------------------------------------
def _byte_spans(bits: int) -> list[tuple[int, int, bool]]:
    """For code ``i`` of an 8-code block: (first byte, bit shift, whether it spills into the next)."""
    return [((bits * i) // 8, (bits * i) % 8, (bits * i) % 8 + bits > 8) for i in range(8)]


def packed_len(length: int, bits: int) -> int:
    """Bytes of a stream of ``length`` codes of ``bits`` bits."""
    return -(-length * bits // 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D ``codes`` (integers in ``0 .. 2**bits - 1``) -> uint8 ``[ceil(len * bits / 8)]``.

    Little-endian bit stream: code ``i`` occupies bits ``i*bits .. i*bits + bits - 1`` counted from
    bit 0 of byte 0; the unused high bits of the last byte are 0."""
    _check_bits(bits)
    length = codes.numel()
    c = codes.reshape(-1).to(torch.int16)
    c = torch.cat([c, c.new_zeros(-length % 8)]).reshape(-1, 8)
    out = torch.zeros(c.shape[0], bits, dtype=torch.int16, device=c.device)
    for i, (byte, shift, spills) in enumerate(_byte_spans(bits)):
        v = c[:, i] << shift
        out[:, byte] |= v & 0xFF
        if spills:
            out[:, byte + 1] |= v >> 8
    return out.to(torch.uint8).reshape(-1)[:packed_len(length, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 stream -> uint8 ``[length]`` codes."""
    _check_bits(bits)
    if packed.numel() != packed_len(length, bits):
        raise ValueError(f"a stream of {length} {bits}-bit codes has {packed_len(length, bits)} bytes, "
                         f"got {packed.numel()}")
    p = packed.reshape(-1)
    p = torch.cat([p, p.new_zeros(-p.numel() % bits)]).reshape(-1, bits)
    mask = (1 << bits) - 1
    out = torch.empty(p.shape[0], 8, dtype=torch.uint8, device=p.device)
    for i, (byte, shift, spills) in enumerate(_byte_spans(bits)):
        if spills:
            v = p[:, byte].to(torch.int16) | (p[:, byte + 1].to(torch.int16) << 8)
            out[:, i] = (v >> shift) & mask
        else:
            out[:, i] = (p[:, byte] >> shift) & mask
    return out.reshape(-1)[:length]


def widen_to_nibbles(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """A ``bits``-bit stream (bits <= 4) -> the 4-bit stream of the same codes, ``[ceil(length/2)]``."""
    if bits == 4:
        return packed
    c = unpack_bits(packed, bits, length)
    c = torch.cat([c, c.new_zeros(length % 2)]).reshape(-1, 2)
    return c[:, 0] | (c[:, 1] << 4)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; valid: 1..8")


# ---- tile order (aten._convert_weight_to_int4pack_for_cpu) -----------------------------------------
def tile_order(q: torch.Tensor, block_n: int) -> torch.Tensor:
    """``q`` ``[Np, K]`` (``Np % block_n == 0``) -> 1-D sequence: tile ``t``, column ``k``, pair ``d``,
    then row ``t*block_n + d`` before row ``t*block_n + block_n/2 + d``."""
    n, k = q.shape
    if block_n <= 0 or block_n % 2 or n % block_n:
        raise ValueError(f"block_n={block_n} must be a positive even divisor of the rows {n}")
    return q.reshape(n // block_n, 2, block_n // 2, k).permute(0, 3, 2, 1).reshape(-1)


def untile(seq: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """Inverse of :func:`tile_order`: 1-D ``[n*k]`` -> ``[n, k]``."""
    return seq.reshape(n // block_n, k, block_n // 2, 2).permute(0, 3, 2, 1).reshape(n, k)


def plane_bits(bits: int) -> tuple[int, int]:
    """Bits of the low and high plane of a ``bits``-bit code."""
    return min(bits, 4), max(bits - 4, 0)


# ---- quantize / dequantize ----------------------------------------------------------------------------
def layout_reason(n: int, k: int, group_size: int, axis: int) -> str | None:
    """Why an ``[n, k]`` weight cannot be grouped this way (``None`` when it can)."""
    dim, name = (k, "in_features") if axis == 1 else (n, "out_features")
    if dim % group_size:
        return f"{name} {dim} is not divisible by group_size {group_size} (axis={axis} groups along {name})"
    return None


def _grouped(w: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """``[N, K]`` -> a view whose dim ``_RED[axis]`` runs over one group."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size) if axis == 1 else w.reshape(group_size, n // group_size, k)


_RED = {1: 2, 0: 0}


def _param_view(p: torch.Tensor, axis: int) -> torch.Tensor:
    """Stored params (``[K/g, N]`` or ``[N/g, K]``) -> broadcastable against :func:`_grouped`."""
    return p.float().t()[..., None] if axis == 1 else p.float()[None]


def _stored(p: torch.Tensor, axis: int) -> torch.Tensor:
    """Reduced group statistic -> stored layout."""
    return p.t().contiguous() if axis == 1 else p.contiguous()


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight`` float ``[N, K]`` -> (``q`` uint8 ``[N, K]`` in ``0 .. 2**bits - 1``, ``scale`` bf16,
    ``offset`` bf16 or ``None`` when symmetric); params are ``[K/g, N]`` (axis 1) or ``[N/g, K]``."""
    _check_bits(bits)
    if symmetric and bits == 1:
        raise ValueError("symmetric 1-bit codes have only the levels {-scale, 0}; use the asymmetric uint1")
    n, k = weight.shape
    if reason := layout_reason(n, k, group_size, axis):
        raise ValueError(reason)
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1
    w = _grouped(weight.detach().float(), group_size, axis)
    red = _RED[axis]
    if symmetric:
        amax = w.abs().amax(dim=red)
        scale = round_up_to((amax / (qmax / 2)).clamp(min=MIN_SCALE), PARAM_DTYPE)
        offset = None
        s = _param_view(_stored(scale, axis), axis)
        q = torch.round(w / s) + mid
    else:
        wmin, wmax = w.amin(dim=red), w.amax(dim=red)
        scale = round_up_to(((wmax - wmin) / qmax).clamp(min=MIN_SCALE), PARAM_DTYPE)
        offset = _stored((wmin + mid * scale.float()).to(PARAM_DTYPE), axis)
        s = _param_view(_stored(scale, axis), axis)
        q = torch.round((w - _param_view(offset, axis)) / s) + mid
    q = q.clamp_(0, qmax).to(torch.uint8).reshape(n, k)
    return q, _stored(scale, axis), offset


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
               group_size: int, axis: int) -> torch.Tensor:
    """(``q`` ``[N, K]``, params as :func:`quantize` returns them) -> float32 ``[N, K]``."""
    n, k = q.shape
    s = _param_view(scale, axis)
    base = -(1 << (bits - 1)) * s  # (q - mid) * s + offset = q * s + (offset - mid * s)
    if offset is not None and offset.numel():
        base = base + _param_view(offset, axis)
    return torch.addcmul(base, _grouped(q, group_size, axis).float(), s).reshape(n, k)


# ---- stored buffers -------------------------------------------------------------------------------
def to_storage(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, axis: int,
               block_n: int) -> dict[str, torch.Tensor]:
    """Quantize float ``[N, K]`` into the buffers ``codes_lo``, ``codes_hi``, ``scale``, ``offset``
    (empty tensors stand for an absent high plane / offset)."""
    q, scale, offset = quantize(weight, bits, group_size, symmetric, axis)
    seq = tile_order(int4.pad_rows(q, int4.padded_rows(q.shape[0]), 0), block_n)
    lo, hi = plane_bits(bits)
    empty = torch.empty(0, dtype=torch.uint8, device=q.device)
    return {"codes_lo": pack_bits(seq & 0xF, lo), "codes_hi": pack_bits(seq >> 4, hi) if hi else empty,
            "scale": scale, "offset": offset if offset is not None else empty.to(PARAM_DTYPE)}


def codes_from_storage(codes_lo: torch.Tensor, codes_hi: torch.Tensor, bits: int, block_n: int,
                       out_features: int, in_features: int) -> torch.Tensor:
    """Stored planes -> uint8 codes ``[out_features, in_features]``."""
    rows = int4.padded_rows(out_features)
    lo, hi = plane_bits(bits)
    seq = unpack_bits(codes_lo, lo, rows * in_features)
    if hi:
        seq = seq | (unpack_bits(codes_hi, hi, rows * in_features) << 4)
    return untile(seq, rows, in_features, block_n)[:out_features]


def in_features(scale: torch.Tensor, group_size: int, axis: int) -> int:
    """K of the weight whose params are ``scale``."""
    return scale.shape[0] * group_size if axis == 1 else scale.shape[1]


def from_storage(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bits: int, group_size: int, axis: int, block_n: int, out_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, K]`` (the reference dequantization)."""
    k = in_features(scale, group_size, axis)
    q = codes_from_storage(codes_lo, codes_hi, bits, block_n, out_features, k)
    return dequantize(q, scale, offset, bits, group_size, axis)


def nbytes(n: int, k: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Exact stored bytes of an ``[n, k]`` weight: both code planes (rows padded to 64) + params."""
    rows = int4.padded_rows(n)
    lo, hi = plane_bits(bits)
    params = (n * k // group_size) * PARAM_DTYPE.itemsize * (1 if symmetric else 2)
    return packed_len(rows * k, lo) + packed_len(rows * k, hi) + params


# ---- operands of aten._weight_int4pack_mm_for_cpu (the CPU fast path) -----------------------------
def int4_kernel_operands(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                         offset: torch.Tensor, bits: int, out_features: int,
                         dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Axis-1 storage -> ``[(qweight uint8 [Np, K/2], scales_and_zeros dtype [K/g, Np, 2]), ...]``,
    one pair per plane, such that ``W = sum over planes of (nibble - 8) * scale + zero``.

    With ``q = lo + 16 * hi``: ``(q - mid) * s + offset = (lo - 8) * s + [offset + (8 + 128h - mid) * s]
    + (hi - 8) * 16s`` where ``h`` is 1 when a high plane exists.  4-bit planes are used as stored;
    narrower ones are widened to nibbles (a copy, made per call).  The zero of the low plane is
    rounded to ``dtype`` (exact for b = 4)."""
    rows = int4.padded_rows(out_features)
    lo_bits, hi_bits = plane_bits(bits)
    k = codes_lo.numel() * 8 // (rows * lo_bits)
    s = scale.float()
    base = (8 + (128 if hi_bits else 0) - (1 << (bits - 1))) * s
    zero = base + offset.float() if offset.numel() else base
    extra = rows - out_features

    def sz(sc: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t = torch.stack([sc, z], dim=-1).to(dtype)  # [K/g, N, 2]
        return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t

    def nibbles(stream: torch.Tensor, b: int) -> torch.Tensor:
        return widen_to_nibbles(stream, b, rows * k).view(rows, k // 2)

    ops = [(nibbles(codes_lo, lo_bits), sz(s, zero))]
    if hi_bits:
        ops.append((nibbles(codes_hi, hi_bits), sz(16 * s, torch.zeros_like(s))))
    return ops
