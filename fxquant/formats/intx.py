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
  row.  Any K: the columns are padded to ``Kp = ceil(K/g) * g`` (the padding repeats column K - 1
  while the last group's statistics are taken, so they are its real columns'; the padded columns'
  codes are stored and meet only zero activations: kernels zero-pad or mask x, the dequantization
  slices them off).  ``scale``/``offset`` bf16 ``[Kp/g, N]``, group of ``(n, k)`` is ``[k // g, n]``.
- ``axis=0`` (HQQ ``W.reshape(g, -1)``): one input column ``k`` and the ``g`` rows
  ``r, r + R, r + 2R, ...`` with ``R = ceil(N/g)`` (rows strided by ``R``, as HQQ's reshape makes
  them when ``g`` divides N).  Any N: the rows are padded to ``R * g`` for the statistics only (row
  ``n >= N`` repeats row ``n % R``, a real row of its group), so a group holds between
  ``g - R + 1`` and ``g`` real rows and its statistics are theirs; no padded row is stored.
  ``scale``/``offset`` bf16 ``[R, K]``, group of ``(n, k)`` is ``[n % R, k]``.

Storage, for both axes (``Kp`` = the stored columns: padded for axis 1, ``K`` for axis 0;
``L = Np * Kp`` codes):

- Rows are padded to ``Np`` (a multiple of 64, padded codes 0) and the codes are put in the tile
  order of ``aten._convert_weight_to_int4pack_for_cpu`` (:func:`tile_order`, ``block_n`` rows per
  tile: ``int4.native_cpu_block_n()`` when quantized).  Seen two at a time, as *nibble-pair bytes*
  ``v[2j] | v[2j+1] << 4``, a sequence of 4-bit values is exactly the int4 kernel's packed weight.
- A code is split in *planes*: its low ``min(b, 4)`` bits and, for b > 4, its high ``b - 4`` bits.
- A plane of ``p`` bits is stored as *shards* of 4, 2 or 1 bits (``SHARDS``: 3 = 2 + 1).  A ``w``-bit
  shard folds the ``4 / w`` equal chunks of its nibble-pair bytes into one byte stream,
  ``S[j] = sum_i C[i * L/(2r) + j] << (w * i)`` (``r = 4 / w``), the shard layout torchao's uintx
  packing uses; unpacking a chunk is one contiguous ``(S >> w*i) & mask``.  Every byte is full:
  8 codes take exactly ``p`` bytes of a ``p``-bit plane.
- ``codes_lo`` uint8 ``[L * min(b, 4) / 8]`` (the low plane's shards), ``codes_hi`` uint8
  ``[L * (b - 4) / 8]`` (empty for b <= 4), ``scale`` and ``offset`` (empty when symmetric) bf16.

So a 4-bit plane *is* the int4 CPU kernel's packed weight (``codes_lo.view(Np, Kp/2)``): b = 4 and
b = 8 (two planes) run ``aten._weight_int4pack_mm_for_cpu`` on the stored bytes as they are; the
1..3-bit planes of other widths are widened to nibble-pair bytes per call (:func:`plane_nibbles`).
:func:`pack` / :func:`unpack` are the same layout for a flat code sequence of any length.
"""
from __future__ import annotations

import torch

from . import int4
from ._common import pad_last_group, round_up, round_up_to

BITS = tuple(range(1, 9))
AXES = (0, 1)
PARAM_DTYPE = torch.bfloat16
KERNEL_GROUP_SIZES = int4.GROUP_SIZES  # what aten._weight_int4pack_mm_for_cpu accepts
MIN_SCALE = 1e-10  # scale of an all-equal group: any positive value gives exact codes
#: Output bytes decoded per block by :func:`from_storage` and the blocked CPU path.  Measured (1 thread,
#: CPU time, 11008x4096, uint3 g128): see docs/formats/intx.md.
DECODE_BLOCK_BYTES = 2 << 20


# ---- bit packing: planes of 1..4 bits, folded shards ----------------------------------------------
#: plane bits -> widths of its shards, low bits first
SHARDS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}
_NIBBLE_MASK = {1: 0x11, 2: 0x33, 4: 0xFF}  # the low w bits of both nibbles of a byte


def plane_bits(bits: int) -> tuple[int, int]:
    """Bits of the low and high plane of a ``bits``-bit code."""
    return min(bits, 4), max(bits - 4, 0)


def nibble_pairs(values: torch.Tensor) -> torch.Tensor:
    """uint8 ``[L]`` (values < 16, L even) -> ``[L/2]``: byte ``j`` = ``v[2j] | v[2j+1] << 4``."""
    v = values.reshape(-1, 2)
    return v[:, 0] | (v[:, 1] << 4)


def pack_plane(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[L]`` (values < ``2**bits``, bits <= 4, ``L % 8 == 0``) -> uint8 ``[L * bits / 8]``.

    Shard ``w`` (bits ``a .. a+w-1`` of each value) takes the nibble-pair bytes ``C`` of those bits
    and folds their ``r = 4 / w`` equal chunks into one: ``S[j] = sum_i C[i * L/(2r) + j] << (w*i)``."""
    nib, out, a = nibble_pairs(values), [], 0
    for w in SHARDS[bits]:
        chunks = ((nib >> a) & _NIBBLE_MASK[w]).view(4 // w, -1)
        shard = chunks[0].clone()
        for i in range(1, 4 // w):
            shard |= chunks[i] << (w * i)
        out.append(shard)
        a += w
    return torch.cat(out)


def plane_nibbles(packed: torch.Tensor, bits: int, length: int, start: int = 0, stop: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_plane` up to :func:`nibble_pairs`: a plane of ``length`` codes ->
    its nibble-pair bytes ``[start:stop]`` (default all ``length / 2``; a 4-bit plane's are the
    stored bytes themselves).  Each chunk is a contiguous shift and mask, written into ``out``
    when given: this is also the per-call widening of the CPU fast path."""
    if packed.numel() != length * bits // 8 or length % 8:
        raise ValueError(f"a plane of {length} {bits}-bit codes has {length * bits // 8} bytes (length a "
                         f"multiple of 8), got {packed.numel()} bytes for length {length}")
    half = length // 2
    stop = half if stop is None else stop
    if bits == 4:
        return packed[start:stop]
    out = torch.empty(stop - start, dtype=torch.uint8, device=packed.device) if out is None else out
    if stop <= start:
        return out
    base, a = 0, 0
    for w in SHARDS[bits]:
        chunk = half * w // 4
        for i in range(start // chunk, (stop - 1) // chunk + 1):
            lo, hi = max(start, i * chunk), min(stop, (i + 1) * chunk)
            src, dst = packed[base + lo - i * chunk:base + hi - i * chunk], out[lo - start:hi - start]
            move = w * i - a  # chunk i sits at bit w*i of each nibble; its bits belong at bit a
            part = src >> move if move > 0 else (src << -move if move < 0 else src)
            if a == 0:
                torch.bitwise_and(part, _NIBBLE_MASK[w], out=dst)
            else:
                dst |= part & (_NIBBLE_MASK[w] << a)
        base, a = base + chunk, a + w
    return out


def packed_len(length: int, bits: int) -> int:
    """Bytes :func:`pack` makes of ``length`` codes: whole blocks of 8 codes, ``bits`` bytes each."""
    return -(-length // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1-D ``codes`` (integers in ``0 .. 2**bits - 1``, any length) -> uint8 ``[packed_len]``: the
    low plane's shards, then the high plane's (the tail is padded to 8 codes with zeros)."""
    _check_bits(bits)
    c = codes.reshape(-1).to(torch.uint8)
    c = torch.cat([c, c.new_zeros(-c.numel() % 8)])
    lo, hi = plane_bits(bits)
    return torch.cat([pack_plane(c & 0xF, lo), *([pack_plane(c >> 4, hi)] if hi else [])])


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[packed_len(length, bits)]`` -> uint8 ``[length]``."""
    _check_bits(bits)
    if packed.numel() != packed_len(length, bits):
        raise ValueError(f"{length} {bits}-bit codes pack into {packed_len(length, bits)} bytes, got {packed.numel()}")
    lo, hi = plane_bits(bits)
    n8 = -(-length // 8) * 8
    nib = plane_nibbles(packed[:n8 * lo // 8], lo, n8)
    codes = torch.stack([nib & 0xF, nib >> 4], dim=-1).reshape(-1)
    if hi:
        nib = plane_nibbles(packed[n8 * lo // 8:], hi, n8)
        codes |= torch.stack([nib & 0xF, nib >> 4], dim=-1).reshape(-1) << 4
    return codes[:length]


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


def untile_nibbles(nib: torch.Tensor, rows: int, k: int, block_n: int) -> torch.Tensor:
    """Nibble-pair bytes of a tile-ordered sequence (:func:`tile_order`, then :func:`nibble_pairs`),
    ``[rows * k / 2]`` -> the values ``[rows, k]`` (two strided writes, no intermediate copy)."""
    t = nib.view(rows // block_n, k, block_n // 2)
    out = torch.empty(rows // block_n, 2, block_n // 2, k, dtype=torch.uint8, device=nib.device)
    torch.bitwise_and(t, 0xF, out=out[:, 0].transpose(1, 2))
    torch.bitwise_right_shift(t, 4, out=out[:, 1].transpose(1, 2))
    return out.view(rows, k)


# ---- quantize / dequantize ----------------------------------------------------------------------------
def stored_in_features(k: int, group_size: int, axis: int) -> int:
    """Columns stored for an ``[N, k]`` weight: ``k`` rounded up to whole groups (axis 1), ``k`` (axis 0)."""
    return round_up(k, group_size) if axis == 1 else k


def param_shape(n: int, k: int, group_size: int, axis: int) -> tuple[int, int]:
    """Shape of ``scale`` / ``offset``: ``[Kp/g, N]`` (axis 1) or ``[ceil(N/g), K]`` (axis 0)."""
    return (-(-k // group_size), n) if axis == 1 else (-(-n // group_size), k)


def _padded(w: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """``[N, K]`` -> whole groups: columns padded to ``Kp`` with copies of column K - 1 (axis 1), rows
    padded to ``ceil(N/g) * g`` with row ``n % ceil(N/g)`` (axis 0; the same group's row 0 .. R - 1)."""
    n, k = w.shape
    if axis == 1:
        return pad_last_group(w, round_up(k, group_size))
    r = -(-n // group_size)
    if r * group_size == n:
        return w
    return torch.cat([w, w[torch.arange(n, r * group_size, device=w.device) % r]])


def _grouped(w: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """``[N, K]`` of whole groups (:func:`_padded`) -> a view whose dim ``_RED[axis]`` runs over one group."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size) if axis == 1 else w.reshape(group_size, n // group_size, k)


_RED = {1: 2, 0: 0}


def _param_view(p: torch.Tensor, axis: int) -> torch.Tensor:
    """Stored params (``[Kp/g, N]`` or ``[R, K]``) -> broadcastable against :func:`_grouped`."""
    return p.float().t()[..., None] if axis == 1 else p.float()[None]


def _stored(p: torch.Tensor, axis: int) -> torch.Tensor:
    """Reduced group statistic -> stored layout."""
    return p.t().contiguous() if axis == 1 else p.contiguous()


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight`` float ``[N, K]`` (any N, K) -> (``q`` uint8 ``[N, Kp]`` in ``0 .. 2**bits - 1``,
    ``scale`` bf16, ``offset`` bf16 or ``None`` when symmetric); params are ``[Kp/g, N]`` (axis 1) or
    ``[ceil(N/g), K]`` (axis 0), partial groups padded as :func:`_padded` says."""
    _check_bits(bits)
    if symmetric and bits == 1:
        raise ValueError("symmetric 1-bit codes have only the levels {-scale, 0}; use the asymmetric uint1")
    if group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not supported; valid: an integer >= 1")
    n = weight.shape[0]
    padded = _padded(weight.detach().float(), group_size, axis)
    mid, qmax = 1 << (bits - 1), (1 << bits) - 1
    w = _grouped(padded, group_size, axis)
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
        q = torch.round((w - _param_view(offset, axis)) / s + mid)  # as int4wo / HQQ: round after the shift
    q = q.clamp_(0, qmax).to(torch.uint8).reshape(padded.shape)[:n]
    return q, _stored(scale, axis), offset


def _row_params(p: torch.Tensor, row0: int, rows: int, axis: int) -> torch.Tensor:
    """Params of weight rows ``row0 .. row0+rows``: ``[rows, K/g]`` (axis 1) or ``[rows, K]`` (axis 0,
    row ``n`` uses param row ``n % R``, ``R = ceil(N/g)``)."""
    if axis == 1:
        return p[:, row0:row0 + rows].t()
    if row0 % p.shape[0] + rows <= p.shape[0]:
        return p[row0 % p.shape[0]:row0 % p.shape[0] + rows]
    return p.index_select(0, torch.arange(row0, row0 + rows, device=p.device) % p.shape[0])


def dequant_params(scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored params -> fp32 ``(scale, base)`` of ``W = q * scale + base``, ``base = offset - mid * scale``
    (same shapes as the stored params: small, computed once per call)."""
    s = scale.float()
    base = s * -(1 << (bits - 1))
    if offset is not None and offset.numel():
        base += offset
    return s, base


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, group_size: int,
               axis: int, row0: int = 0, out: torch.Tensor | None = None,
               params: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``q`` ``[R, K]`` (rows ``row0 ..`` of the weight), params as :func:`quantize` returns them ->
    ``q * scale + (offset - 2**(bits-1) * scale)`` written into ``out`` (default a new float32 tensor).
    In float32 this is exact up to one rounding (``q * scale`` is exact).  ``params``: the
    :func:`dequant_params` of ``scale``/``offset``, when the caller decodes several blocks."""
    r, k = q.shape
    out = torch.empty(r, k, dtype=torch.float32, device=q.device) if out is None else out
    out.copy_(q)
    s_all, base_all = params if params is not None else dequant_params(scale, offset, bits)
    period = scale.shape[0]  # axis 0: row n uses param row n % period
    # axis 0: runs of rows whose param rows are contiguous (no gather), unless the period is short
    runs = [(row0, r)] if axis == 1 or period <= 8 else _runs(row0, r, period)
    for n0, count in runs:
        s, base = _row_params(s_all, n0, count, axis), _row_params(base_all, n0, count, axis)
        view = out[n0 - row0:n0 - row0 + count]
        if axis == 1:
            _affine_(view.view(count, k // group_size, group_size), s[..., None], base[..., None])
        else:
            _affine_(view, s, base)
    return out


def _affine_(t: torch.Tensor, s: torch.Tensor, base: torch.Tensor) -> None:
    """``t = t * s + base`` in place, ``t`` holding integer codes: one rounding in ``t``'s dtype.
    fp32: ``q * s`` is exact (8 + 8 significant bits), so the in-place ops round once (and trace
    under fake tensors); bf16/fp16 (the CPU GEMM paths): ``addcmul`` into ``t`` computes in fp32 and
    rounds once, where ``mul_`` then ``add_`` would round ``q * s`` first and lose the difference."""
    if t.dtype == torch.float32:
        t.mul_(s).add_(base)
    else:
        torch.addcmul(base, t, s, out=t)


def _runs(row0: int, rows: int, period: int) -> list[tuple[int, int]]:
    """Split rows ``row0 .. row0+rows`` where ``n % period`` wraps around."""
    runs, n = [], row0
    while n < row0 + rows:
        count = min(period - n % period, row0 + rows - n)
        runs.append((n, count))
        n += count
    return runs


# ---- stored buffers -------------------------------------------------------------------------------
def to_storage(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, axis: int,
               block_n: int) -> dict[str, torch.Tensor]:
    """Quantize float ``[N, K]`` into the buffers ``codes_lo``, ``codes_hi``, ``scale``, ``offset``
    (empty tensors stand for an absent high plane / offset)."""
    return store(*quantize(weight, bits, group_size, symmetric, axis), bits, block_n)


def store(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
          block_n: int) -> dict[str, torch.Tensor]:
    """Codes ``q`` uint8 ``[N, Kp]`` and params in the stored layout (``offset`` ``None`` when
    symmetric) -> the stored buffers (rows padded, tiled by ``block_n``, bit planes)."""
    seq = tile_order(int4.pad_rows(q, int4.padded_rows(q.shape[0]), 0), block_n)
    lo, hi = plane_bits(bits)
    empty = torch.empty(0, dtype=torch.uint8, device=q.device)
    return {"codes_lo": pack_plane(seq & 0xF, lo), "codes_hi": pack_plane(seq >> 4, hi) if hi else empty,
            "scale": scale.to(PARAM_DTYPE).contiguous(),
            "offset": offset.to(PARAM_DTYPE).contiguous() if offset is not None else empty.to(PARAM_DTYPE)}


def codes_from_storage(codes_lo: torch.Tensor, codes_hi: torch.Tensor, bits: int, block_n: int,
                       out_features: int, stored_k: int, row0: int = 0, row1: int | None = None) -> torch.Tensor:
    """Stored planes -> uint8 codes of rows ``row0 .. row1`` (``row0`` a multiple of ``block_n``;
    default all ``out_features`` rows) ``[row1 - row0, stored_k]`` (every stored column, padding included)."""
    rows, k = int4.padded_rows(out_features), stored_k
    row1 = out_features if row1 is None else row1
    stop = min(rows, -(-row1 // block_n) * block_n)  # whole tiles
    lo, hi = plane_bits(bits)
    span = (row0 * k // 2, stop * k // 2)
    q = untile_nibbles(plane_nibbles(codes_lo, lo, rows * k, *span), stop - row0, k, block_n)
    if hi:
        q |= untile_nibbles(plane_nibbles(codes_hi, hi, rows * k, *span), stop - row0, k, block_n) << 4
    return q[:row1 - row0]


def stored_k(scale: torch.Tensor, group_size: int, axis: int) -> int:
    """The stored columns ``Kp`` of the weight whose params are ``scale``."""
    return scale.shape[0] * group_size if axis == 1 else scale.shape[1]


def block_rows(k: int, block_n: int, element_bytes: int = 4) -> int:
    """Rows decoded at a time: about :data:`DECODE_BLOCK_BYTES` of output, whole tiles."""
    return max(block_n, DECODE_BLOCK_BYTES // (k * element_bytes) // block_n * block_n)


def decode_rows(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                bits: int, group_size: int, axis: int, block_n: int, out_features: int, row0: int, row1: int,
                out: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Dequantize weight rows ``row0 .. row1`` (``row0`` a multiple of ``block_n``) into ``out``
    ``[row1 - row0, Kp]`` (any float dtype; all stored columns); ``params`` as in :func:`dequantize`."""
    k = stored_k(scale, group_size, axis)
    q = codes_from_storage(codes_lo, codes_hi, bits, block_n, out_features, k, row0, row1)
    return dequantize(q, scale, offset, bits, group_size, axis, row0, out, params)


def decode_tiles(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bits: int, group_size: int, axis: int, block_n: int, out_features: int, tile0: int, tile1: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Dequantize whole tiles ``tile0 .. tile1`` *in tile order*, into ``out`` ``[tiles, 2, Kp, block_n/2]``
    (any float dtype): ``out[t, h, k, d]`` is ``W[n, k]`` for row ``n = (tile0 + t) * block_n + h *
    block_n/2 + d`` (0 for padded rows).  No transpose is made: ``out[t, h]`` is the ``[K, block_n/2]``
    right-hand side of a GEMM for those rows (all ``Kp`` stored columns)."""
    k, half, rows = stored_k(scale, group_size, axis), block_n // 2, int4.padded_rows(out_features)
    tiles, r0, r1 = tile1 - tile0, tile0 * block_n, tile1 * block_n
    lo, hi = plane_bits(bits)
    nib = plane_nibbles(codes_lo, lo, rows * k, r0 * k // 2, r1 * k // 2).view(tiles, 1, k, half)
    nib_hi = plane_nibbles(codes_hi, hi, rows * k, r0 * k // 2, r1 * k // 2).view(tiles, k, half) if hi else None
    for h in (0, 1):
        q = (nib[:, 0] >> 4 * h) & 0xF if h else nib[:, 0] & 0xF
        if nib_hi is not None:
            q |= ((nib_hi >> 4 * h) & 0xF if h else nib_hi & 0xF) << 4
        out[:, h].copy_(q)
    n_real = min(r1, out_features) - r0
    s = _row_params(scale, r0, n_real, axis).float()
    base = s * -(1 << (bits - 1))
    if offset.numel():
        base += _row_params(offset, r0, n_real, axis)
    if n_real < r1 - r0:  # padded rows: scale and base 0
        s, base = (torch.nn.functional.pad(t, (0, 0, 0, r1 - r0 - n_real)) for t in (s, base))
    # params per row -> [tiles, 2, (K/g or K), half], strided views matching `out`
    s, base = (t.reshape(tiles, 2, half, -1).transpose(2, 3) for t in (s, base))
    if axis == 1:
        view = out.view(tiles, 2, k // group_size, group_size, half)
        _affine_(view, s[:, :, :, None], base[:, :, :, None])
    else:
        _affine_(out, s, base)
    return out


def from_storage(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 bits: int, group_size: int, axis: int, block_n: int, out_features: int,
                 in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, in_features]`` (the reference dequantization; padded
    columns sliced off), decoded a cache-sized block of rows at a time."""
    k = stored_k(scale, group_size, axis)
    out = torch.empty(out_features, k, dtype=torch.float32, device=scale.device)
    step, params = block_rows(k, block_n), dequant_params(scale, offset, bits)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        decode_rows(codes_lo, codes_hi, scale, offset, bits, group_size, axis, block_n, out_features, r0, r1,
                    out[r0:r1], params)
    return out[:, :in_features]


def nbytes(n: int, k: int, bits: int, group_size: int, symmetric: bool, axis: int = 1) -> int:
    """Exact stored bytes of an ``[n, k]`` weight: both code planes (rows padded to 64, columns to
    whole groups on axis 1) + params (partial groups included)."""
    rows, kp = int4.padded_rows(n), stored_in_features(k, group_size, axis)
    p_rows, p_cols = param_shape(n, k, group_size, axis)
    params = p_rows * p_cols * PARAM_DTYPE.itemsize * (1 if symmetric else 2)
    return rows * kp * bits // 8 + params


# ---- parameters of aten._weight_int4pack_mm_for_cpu (the CPU fast path) ----------------------------
def int4_kernel_params(scale: torch.Tensor, offset: torch.Tensor, bits: int, row0: int, row1: int,
                       dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Axis-1 params ``[K/g, N]`` -> per plane (low, then high) the kernel's ``scales_and_zeros``
    ``[K/g, row1 - row0, 2]`` in ``dtype`` for rows ``row0 .. row1`` (rows >= N: 0), and the fp32
    ``residual`` ``[K/g, row1 - row0]`` (``None`` when 0) such that, per group,
    ``W = sum over planes of ((nibble - 8) * scale + zero) + residual`` exactly.

    Total zero ``Z = offset + (8 - mid) * s`` (b <= 4) or ``offset + (136 - mid) * s`` with
    ``q = lo + 16 * hi`` (b > 4).  For b > 4 the high plane gets ``16 s`` and the zero
    ``(8 - c) * 16 s`` with ``c`` the centre of its codes, so that both planes' parts are centred
    (the kernel rounds each part's output to ``dtype``: the rounding is then relative to values no
    larger than the result).  Zeros are rounded to ``dtype``; the rounding is the residual (none for
    b = 4 and b = 8, whose zeros are ``offset`` and ``8 s``)."""
    n = scale.shape[1]
    real = max(0, min(row1, n) - row0)
    s = scale[:, row0:row0 + real]
    o = offset[:, row0:row0 + real] if offset.numel() else None

    def pack(sc: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        sz = torch.zeros(s.shape[0], row1 - row0, 2, dtype=dtype, device=s.device)
        sz[:, :real, 0] = sc  # strided writes: ~5x faster than torch.stack here
        if z is not None:
            sz[:, :real, 1] = z
        return sz

    if bits == 4:  # zero = offset: the stored values, no arithmetic
        return [pack(s, o)], None
    if bits == 8:  # zeros offset and 8 s, scales s and 16 s: exact in any float dtype
        return [pack(s, o), pack(s * 16, s * 8)], None
    s32 = s.float()
    mid = 1 << (bits - 1)
    total = (8 + (128 if bits > 4 else 0) - mid) * s32
    if o is not None:
        total += o
    planes = [(s, total)]
    if bits > 4:
        hi_zero = (8 - ((1 << (bits - 4)) - 1) / 2) * 16 * s32
        planes = [(s, total - hi_zero), (s * 16, hi_zero)]
    out = [pack(sc, z) for sc, z in planes]
    residual = torch.zeros(s.shape[0], row1 - row0, device=s.device)
    residual[:, :real] = total - sum(sz[:, :real, 1].float() for sz in out)
    return out, residual
