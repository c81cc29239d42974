"""int4 asymmetric group-wise weights (``int4wo-<group>``), in the CPU kernel's tiled layout.

Math: per output row ``n`` and group ``j`` of ``group_size`` input columns,
``W[n, k] ≈ (q[n, k] - 8) * scale[j, n] + zero[j, n]`` with ``q`` in 0..15 (``zero`` is the value
code 8 stands for; this is the convention of ``aten._weight_int4pack_mm_for_cpu``).
``scale = (max - min) / 15`` rounded *up* to bfloat16, ``zero = min + 8 * scale`` rounded to
bfloat16, then codes are chosen against the stored bf16 values.  Error bound per element:
``scale / 2`` plus the bf16 rounding of ``zero``.

Any K: a partial last group is padded (``Kp = ceil(K / group_size) * group_size`` stored columns).
The padded columns repeat the weight's last real column while the group's min / max are taken, so
the group's scale and zero are those of its real columns (the per-element bound holds unchanged);
their codes are stored, and meet only zero activations: every kernel zero-pads (or masks) ``x`` to
``Kp``, and the reference dequantization slices them off (``[N, K]``).  The op takes the true K as
its ``in_features`` scalar.

Storage (what a module's buffers hold and what is saved):
- ``qweight`` uint8 ``[Np, Kp / 2]``: rows padded to ``Np`` = a multiple of 64, packed in *tiles* of
  ``block_n`` rows: for tile ``t``, column ``k`` and ``d < block_n / 2``, the byte at flat index
  ``(t * Kp + k) * block_n / 2 + d`` holds row ``t * block_n + d`` in its low nibble and row
  ``t * block_n + block_n / 2 + d`` in its high nibble.  This is the layout that
  ``aten._convert_weight_to_int4pack_for_cpu`` produces (its ``block_n`` depends on the CPU:
  measured 32 on AVX2 builds), so the CPU kernel consumes it with no conversion.
- ``scales_and_zeros`` bf16 ``[Kp / group_size, Np, 2]``: ``[..., 0]`` scale, ``[..., 1]`` zero.
"""
from __future__ import annotations

import functools

import torch

from ._common import pad_last_group, round_up, round_up_to

GROUP_SIZES = (32, 64, 128, 256)
ROW_ALIGN = 64  # pad N to this so every block_n the CPU kernel may use (16/32/64) tiles it exactly
#: tile heights a stored layout may have: even divisors of ROW_ALIGN (so they tile every padded N)
BLOCK_NS = frozenset(b for b in range(2, ROW_ALIGN + 1, 2) if ROW_ALIGN % b == 0)
PARAM_DTYPE = torch.bfloat16


def padded_rows(n: int) -> int:
    """Rows stored for an ``n``-row weight."""
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def padded_k(k: int, group_size: int) -> int:
    """Columns stored for a ``k``-column weight: whole groups."""
    return round_up(k, group_size)


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` float ``[N, K]`` -> (``q`` uint8 ``[N, Kp]`` in 0..15, ``scale`` bf16 ``[N, Kp/g]``,
    ``zero`` bf16 ``[N, Kp/g]``), ``Kp`` = K rounded up to whole groups (the padded columns repeat
    column K - 1: the last group's statistics are its real columns')."""
    n, k = weight.shape
    kp = padded_k(k, group_size)
    w = pad_last_group(weight.detach().float(), kp).reshape(n, kp // group_size, group_size)
    wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
    scale = round_up_to(((wmax - wmin) / 15).clamp(min=1e-10), PARAM_DTYPE)
    zero = (wmin + 8 * scale.float()).to(PARAM_DTYPE)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8)
    q = q.clamp_(0, 15).to(torch.uint8).reshape(n, kp)
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(``q`` ``[N, Kp]``, ``scale``/``zero`` ``[N, Kp/g]``) -> float32 ``[N, Kp]``."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    return ((qg - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def pack(q: torch.Tensor, block_n: int) -> torch.Tensor:
    """``q`` uint8 ``[Np, K]`` (values 0..15, ``Np % block_n == 0``) -> tiled uint8 ``[Np, K/2]``."""
    n, k = q.shape
    if n % block_n or block_n % 2:
        raise ValueError(f"rows {n} must be a multiple of block_n {block_n}")
    t = q.to(torch.uint8).reshape(n // block_n, 2, block_n // 2, k).permute(0, 3, 2, 1)
    return (t[..., 0] | (t[..., 1] << 4)).reshape(n, k // 2).contiguous()


def unpack(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: tiled uint8 ``[Np, K/2]`` -> uint8 ``[Np, K]``."""
    n, half_k = packed.shape
    t = packed.reshape(n // block_n, 2 * half_k, block_n // 2)
    both = torch.stack([t & 0xF, t >> 4], dim=-1)  # [tiles, K, block_n/2, 2]
    return both.permute(0, 3, 2, 1).reshape(n, 2 * half_k)


def pad_rows(t: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    """Pad dim 0 of ``t`` up to ``rows`` with ``value``."""
    extra = rows - t.shape[0]
    if extra == 0:
        return t
    return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)], dim=0)


def to_storage(weight: torch.Tensor, group_size: int, block_n: int) -> dict[str, torch.Tensor]:
    """Quantize float ``[N, K]`` (any K) into the stored buffers ``qweight`` ``[Np, Kp/2]`` and
    ``scales_and_zeros`` ``[Kp/g, Np, 2]``."""
    return store(*quantize(weight, group_size), block_n)


def store(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, block_n: int) -> dict[str, torch.Tensor]:
    """Codes ``q`` ``[N, Kp]`` (0..15) and ``scale`` / ``zero`` ``[N, Kp/g]`` (values bf16 holds) ->
    the stored buffers (rows padded to ``Np``, codes tiled by ``block_n``)."""
    rows = padded_rows(q.shape[0])
    q = pad_rows(q.to(torch.uint8), rows, 8)
    sz = torch.stack([pad_rows(scale.to(PARAM_DTYPE), rows), pad_rows(zero.to(PARAM_DTYPE), rows)], dim=-1)
    return {"qweight": pack(q, block_n), "scales_and_zeros": sz.transpose(0, 1).contiguous()}  # sz: [Np, G, 2]


def from_storage(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                 block_n: int, out_features: int, in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, in_features]`` (the reference dequantization; the
    padded rows and columns sliced off)."""
    q = unpack(qweight, block_n)
    sz = scales_and_zeros.transpose(0, 1)  # [Np, G, 2]
    return dequantize(q, sz[..., 0], sz[..., 1], group_size)[:out_features, :in_features]


def nbytes(n: int, k: int, group_size: int) -> int:
    """Exact stored bytes of an ``[n, k]`` int4wo weight, row and column padding included."""
    rows, kp = padded_rows(n), padded_k(k, group_size)
    return rows * kp // 2 + (kp // group_size) * rows * 2 * PARAM_DTYPE.itemsize


@functools.lru_cache(maxsize=None)
def native_cpu_block_n() -> int | None:
    """The tile height ``aten._convert_weight_to_int4pack_for_cpu`` uses on this CPU, or ``None``
    when its layout is not one :func:`pack` can produce (then the CPU fast path is not used)."""
    k = 4
    probe = (torch.arange(ROW_ALIGN)[:, None] * 3 + torch.arange(k)[None, :]) % 16
    try:
        native = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    except (RuntimeError, AttributeError):
        return None
    for block_n in (64, 32, 16):
        if torch.equal(pack(probe.to(torch.uint8), block_n), native):
            return block_n
    return None
