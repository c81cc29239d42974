"""bitsandbytes 4-bit weights: NF4 and FP4 blockwise, optionally with double quantization.

Math (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314; bitsandbytes
``functional.quantize_4bit``): the weight ``[N, K]`` is flattened row-major and cut into blocks of
``blocksize`` consecutive values (the last block holds ``N*K % blocksize`` values when that is not
zero, so blocks straddle rows when ``K % blocksize != 0``).  Per block ``b``:
``absmax[b] = max |w|``; every value gets the 4-bit code ``q`` whose table value ``T[q]`` is nearest
to ``w / absmax[b]``; ``Ŵ = T[q] * absmax[b]`` (fp32).  ``T`` is NF4 (16 quantiles of N(0, 1)
scaled to [-1, 1]) or bitsandbytes' FP4 (sign + 2 exponent + 1 mantissa bits, scaled by 1/12).
Double quantization (``compress_statistics`` / ``bnb_4bit_use_double_quant``) stores ``absmax``
itself in 8 bits: ``offset = mean(absmax)``; ``absmax - offset`` is quantized blockwise (blocks of
256) to the nearest entry of bitsandbytes' signed 8-bit dynamic map ``D`` with an fp32 scale per
block: ``absmax[b] ≈ D[absmax_q[b]] * absmax_scale[b // 256] + offset``.

Storage (bit for bit what ``bitsandbytes.functional.quantize_4bit`` returns on CPU):
- ``codes`` uint8 ``[ceil(N*K / 2)]``: element ``e = n*K + k`` sits in byte ``e // 2``, in the
  *high* nibble when ``e`` is even, the low nibble when odd (an odd ``N*K`` pads the last low
  nibble with the code of 0.0);
- ``absmax`` fp32 ``[ceil(N*K / blocksize)]``, or with double quant ``absmax_q`` uint8
  ``[ceil(N*K / blocksize)]``, ``absmax_scale`` fp32 ``[ceil(len(absmax_q) / 256)]``,
  ``absmax_offset`` fp32 ``[]`` and the 256-entry map ``absmax_code`` fp32 ``[256]``;
- ``code_table`` fp32 ``[16]`` (``T``; bitsandbytes saves it as ``quant_map``).

Error bound per element: ``|W - Ŵ| <= absmax[b] * gap(T) / 2`` with ``gap`` the largest distance
between neighbouring table values (NF4 0.304, FP4 0.333); with double quant add
``|absmax[b] - absmax_dq[b]| <= absmax_scale * (gap(D) / 2 + 2 / 65535)`` (the last term is
bitsandbytes' CPU encoder, which rounds ``w / scale`` to a 65536-step grid before its table lookup).
"""
from __future__ import annotations

import functools
import math

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # as bitsandbytes.functional.quantize_4bit
NESTED_BLOCKSIZE = 256  # bitsandbytes' quantize_4bit hard-codes 256 for the absmax blocks
NF4_OFFSET = 0.9677083  # outermost quantile of the NF4 construction (bitsandbytes create_normal_map)
_LUT_STEPS = 65535  # bitsandbytes' CPU blockwise encoder: [-1, 1] cut into 65536 grid points
_TINY = 1e-38  # bitsandbytes clamps absmax to this before dividing


# ---- code tables -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _nf4() -> torch.Tensor:
    # create_normal_map(offset, use_extra_value=True): 8 positive quantiles, 7 negative, and 0,
    # from evenly spaced probabilities in fp32; inverse normal CDF in fp64; normalised in fp32.
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


@functools.lru_cache(maxsize=None)
def _fp4() -> torch.Tensor:
    # Code bits s e1 e0 m: exponent field e = 1, 2, 3 gives (1 + m/2) * 2^(4 - e) (8, 12 / 4, 6 /
    # 2, 3); e = 0 gives the subnormals 0 and 0.0625; bit 3 is the sign.  Scaled by 1/12 to [-1, 1].
    vals = []
    for code in range(16):
        e, m = (code >> 1) & 3, code & 1
        mag = 0.0625 * m if e == 0 else (1 + 0.5 * m) * 2.0 ** (4 - e)
        vals.append(-mag if code & 8 else mag)
    t = torch.tensor(vals, dtype=torch.float32)
    return t / t.abs().max()


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 fp32 values ``T[q]`` of ``quant_type`` ("nf4" sorted ascending; "fp4" in code order)."""
    if quant_type == "nf4":
        return _nf4().clone()
    if quant_type == "fp4":
        return _fp4().clone()
    raise ValueError(f"quant_type={quant_type!r} is not supported; valid: {', '.join(QUANT_TYPES)}")


@functools.lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    # bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for decade
    # i = 0..6, 2^i + 1 evenly spaced fp32 boundaries in [0.1, 1]; their midpoints times
    # 10^(i - 6), with both signs; plus 0 and 1.0; sorted.  (With 7 exponent bits out of 7 there
    # are no "additional items".)
    # The products are fp32 tensor ops, as there (fp64 products differ in the last bit).
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map: 256 sorted fp32 values in [-0.993, 1]."""
    return _dynamic_map().clone()


def max_gap(table: torch.Tensor) -> float:
    """Largest distance between neighbouring values of ``table`` (twice the worst rounding error)."""
    s = table.float().sort().values
    return (s[1:] - s[:-1]).max().item()


# ---- nibble packing --------------------------------------------------------------------------
def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 ``[n]`` (0..15) -> uint8 ``[ceil(n / 2)]``, element ``2i`` in the high nibble."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return (q[0::2] << 4) | q[1::2]


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[ceil(numel / 2)]`` -> codes uint8 ``[numel]``."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=-1).reshape(-1)[:numel]


# ---- blockwise absmax scaling, as bitsandbytes computes it ------------------------------------
def _scaled_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[n]`` -> (``flat / absmax`` clamped to [-1, 1], ``absmax`` ``[ceil(n / blocksize)]``).

    The float operations are those of bitsandbytes' ``quantize_4bit`` (multiply by the reciprocal
    in full blocks, divide in the tail block, whose absmax is clamped to 1e-38) so the codes match
    it bit for bit."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=_TINY))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return scaled, absmax


def expand_blocks(per_block: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    """Per-block values ``[ceil(numel / blocksize)]`` -> one per element ``[numel]``."""
    return per_block.repeat_interleave(blocksize)[:numel]


# ---- 4-bit ----------------------------------------------------------------------------------------
def _check(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; valid: {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; valid: {', '.join(map(str, BLOCKSIZES))}")


def quantize_4bit(weight: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight (any shape) -> (``codes`` packed uint8 ``[ceil(numel / 2)]``, ``absmax`` fp32
    ``[ceil(numel / blocksize)]``), nearest table value per element (ties to the lower value)."""
    _check(quant_type, blocksize)
    scaled, absmax = _scaled_blocks(weight.detach().reshape(-1).float(), blocksize)
    if scaled.numel() % 2:  # the pad nibble of an odd count encodes the value 0, as bitsandbytes does
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    table = code_table(quant_type)
    sorted_vals, order = table.sort(stable=True)  # FP4: +0 (code 0) sorts before -0 (code 8)
    q = order[torch.bucketize(scaled, (sorted_vals[:-1] + sorted_vals[1:]) / 2)]
    return pack(q), absmax


def dequantize_4bit(codes: torch.Tensor, absmax: torch.Tensor, code_table: torch.Tensor, blocksize: int,
                    shape: tuple[int, ...]) -> torch.Tensor:
    """(packed ``codes``, per-block ``absmax`` fp32, ``code_table`` [16]) -> fp32 of ``shape``:
    ``T[q] * absmax`` in fp32 (what bitsandbytes' ``dequantize_4bit`` computes)."""
    numel = math.prod(shape)
    vals = code_table.float()[unpack(codes, numel).int()]
    nblocks = -(-numel // blocksize)
    if numel % blocksize:  # the short tail block
        vals = torch.cat([vals, vals.new_zeros(nblocks * blocksize - numel)])
    return (vals.view(nblocks, blocksize) * absmax.float()[:, None]).view(-1)[:numel].reshape(shape)


@functools.lru_cache(maxsize=8)
def _byte_pair_table(table_key: tuple[float, ...]) -> torch.Tensor:
    """complex128 ``[65536]``: entry ``v`` holds, as 4 fp32, the decoded elements of the two code
    bytes whose in-memory ``uint16`` value is ``v`` (high nibble first, first byte first)."""
    table = torch.tensor(table_key, dtype=torch.float32)
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(256)).to(torch.uint8)  # [65536, 2]
    nibbles = torch.stack([pairs >> 4, pairs & 0xF], dim=-1).reshape(-1, 4).long()  # element order
    quads = torch.empty(65536, 4)
    quads[pairs.view(torch.uint16).reshape(-1).int()] = table[nibbles]  # endianness-agnostic
    return quads.view(torch.complex128).reshape(-1)


def buffer(workspace: dict | None, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``[numel]`` tensor from ``workspace`` (grown when too small), or a fresh one without it."""
    if workspace is None:
        return torch.empty(numel, dtype=dtype)
    buf = workspace.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = workspace[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dequantize_span(codes: torch.Tensor, span_absmax: torch.Tensor, code_table: torch.Tensor, blocksize: int,
                    start: int, stop: int, workspace: dict | None = None) -> torch.Tensor:
    """Elements ``start:stop`` of the flattened weight as fp32, bit-identical to
    :func:`dequantize_4bit`, with one gather per 4 elements (the CPU fast path's dequantizer).

    ``span_absmax``: the fp32 absmax of the blocks ``start // blocksize ..`` covering the span;
    ``start`` must be a multiple of ``blocksize`` (hence of 4: two whole code bytes per gathered
    table entry).  With a ``workspace`` dict the large temporaries are reused between calls (the
    result is then a view into it, valid until the next call with the same workspace)."""
    if start % blocksize:
        raise ValueError(f"start={start} must be a multiple of blocksize={blocksize}")
    n = stop - start
    nblocks = -(-n // blocksize)
    raw = codes[start // 2:(stop + 1) // 2]
    if raw.numel() % 2:
        raw = torch.cat([raw, raw.new_zeros(1)])
    lut = _byte_pair_table(tuple(code_table.float().tolist()))
    index = buffer(workspace, "index", raw.numel() // 2, torch.int32).copy_(raw.view(torch.uint16))
    vals = buffer(workspace, "vals", max(index.numel(), -(-nblocks * blocksize // 4)), torch.complex128)
    torch.index_select(lut, 0, index, out=vals[:index.numel()])
    vals = vals.view(torch.float32)
    vals[4 * index.numel():].zero_()  # a partial last block: its padding must stay finite
    blocks = vals[:nblocks * blocksize].view(nblocks, blocksize)
    blocks.mul_(span_absmax[:nblocks, None].float())
    return blocks.view(-1)[:n]


# ---- 8-bit dynamic blockwise (the double-quant encoder) --------------------------------------------
@functools.lru_cache(maxsize=8)
def _grid_lut(code_key: tuple[float, ...]) -> torch.Tensor:
    """bitsandbytes' CPU encoder table: for each of 65536 grid points ``-1 + 2 i / 65535`` (fp32),
    the index of the nearest of the 256 sorted ``code`` values (the number of midpoints below it)."""
    code = torch.tensor(code_key, dtype=torch.float32)
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_STEPS + 1, dtype=torch.float32)) / _LUT_STEPS
    return torch.bucketize(grid, mid).to(torch.uint8)


def quantize_8bit_dynamic(values: torch.Tensor, code: torch.Tensor,
                          blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[n]`` -> (uint8 indices into ``code`` ``[n]``, fp32 block absmax ``[ceil(n / blocksize)]``).

    As bitsandbytes' CPU ``quantize_blockwise``: ``v * (1 / absmax)`` is rounded to the nearest
    point of a 65536-step grid over [-1, 1], whose nearest code was precomputed; all-zero blocks
    store absmax 0 and code 0."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.cat([flat, flat.new_zeros(nblocks * blocksize - n)]).reshape(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    v = (padded * inv[:, None]).clamp(-1, 1)
    # Grid index (v + 1) * 0.5 * 65535 + 0.5, truncated.  The multiply-add is done exactly (fp64)
    # and rounded once, as a fused multiply-add does (bitsandbytes builds with -mfma); the unfused
    # fp32 form differs only when the sum lands within an fp32 ulp of an integer.
    pos = (((v + 1.0) * 0.5).double() * _LUT_STEPS + 0.5).float().to(torch.int64)
    q = _grid_lut(tuple(code.float().tolist()))[pos]
    q = torch.where((absmax > 0)[:, None], q, torch.zeros_like(q))
    return q.reshape(-1)[:n], absmax


def dequantize_8bit_dynamic(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                            blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_8bit_dynamic`: ``code[q] * absmax[block]`` in fp32."""
    return code.float()[q.long()] * expand_blocks(absmax.float(), blocksize, q.numel())


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-block fp32 ``absmax`` -> the double-quant buffers ``absmax_q``, ``absmax_code``,
    ``absmax_scale`` and ``absmax_offset`` (see the module docstring)."""
    offset = absmax.float().mean()
    code = dynamic_map()
    q, scale = quantize_8bit_dynamic(absmax.float() - offset, code, NESTED_BLOCKSIZE)
    return {"absmax_q": q, "absmax_code": code, "absmax_scale": scale, "absmax_offset": offset}


def double_dequantize(absmax_q: torch.Tensor, absmax_code: torch.Tensor, absmax_scale: torch.Tensor,
                      absmax_offset: torch.Tensor, absmax_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Double-quant buffers -> fp32 per-block absmax ``D[q] * scale + offset``."""
    return dequantize_8bit_dynamic(absmax_q, absmax_scale, absmax_code, absmax_blocksize) + absmax_offset.float()


def double_dequantize_span(absmax_q: torch.Tensor, absmax_code: torch.Tensor, absmax_scale: torch.Tensor,
                           absmax_offset: torch.Tensor, absmax_blocksize: int, first: int, stop: int) -> torch.Tensor:
    """Blocks ``first:stop`` of :func:`double_dequantize` (same fp32 operations, same bits)."""
    nested = torch.arange(first, stop) // absmax_blocksize
    return absmax_code.float()[absmax_q[first:stop].long()] * absmax_scale.float()[nested] + absmax_offset.float()


# ---- storage -------------------------------------------------------------------------------------
def to_storage(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> dict[str, torch.Tensor]:
    """Float ``[N, K]`` -> the stored buffers, in op argument order: ``codes``, then ``absmax`` or
    (``absmax_q``, ``absmax_code``, ``absmax_scale``, ``absmax_offset``), then ``code_table``."""
    codes, absmax = quantize_4bit(weight, quant_type, blocksize)
    stats = double_quantize(absmax) if double_quant else {"absmax": absmax}
    return {"codes": codes, **stats, "code_table": code_table(quant_type)}


def block_absmax(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 per-block absmax stored in ``tensors`` (plain, or rebuilt from double quant)."""
    if "absmax" in tensors:
        return tensors["absmax"].float()
    return double_dequantize(tensors["absmax_q"], tensors["absmax_code"], tensors["absmax_scale"],
                             tensors["absmax_offset"])


def from_storage(tensors: dict[str, torch.Tensor], blocksize: int, out_features: int,
                 in_features: int) -> torch.Tensor:
    """Stored buffers -> fp32 ``[out_features, in_features]`` (the reference dequantization)."""
    return dequantize_4bit(tensors["codes"], block_absmax(tensors), tensors["code_table"], blocksize,
                           (out_features, in_features))


def nbytes(n: int, k: int, blocksize: int, double_quant: bool) -> int:
    """Exact stored bytes of an ``[n, k]`` weight: codes, block statistics and both tables."""
    blocks = -(-n * k // blocksize)
    stats = (blocks + 4 * (-(-blocks // NESTED_BLOCKSIZE)) + 4 + 4 * 256) if double_quant else 4 * blocks
    return -(-n * k // 2) + stats + 4 * 16
