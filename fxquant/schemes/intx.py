"""Group-wise b-bit integer weight-only schemes: ``int<b>wo-<g>`` (symmetric) and ``uint<b>wo-<g>``
(asymmetric, with an offset per group), b in 1..8, optional ``-sym`` / ``-asym`` and ``-axis0`` /
``-axis1`` suffixes.

Names, once (docs/formats.md "Names"): a ``u`` prefix or ``-asym`` means asymmetric, ``-sym`` or
no prefix symmetric, with one exception kept from torchao: ``int4wo-<g>`` with no suffix is
:class:`~fxquant.schemes.Int4WeightOnly` (asymmetric, tiled for the int4 kernels), never this
family.  This family's symmetric 4-bit scheme is therefore written ``int4wo-<g>-sym`` (the older
spelling ``int4wo-<g>-axis1`` is still read).  ``int8wo`` (no group) is the per-channel
:class:`~fxquant.schemes.Int8WeightOnly`; ``int8wo-<g>`` is this family's group-wise symmetric int8:
both symmetric.  The structured form (``scheme_to_json``: every field explicit) is canonical.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import int4 as int4_fmt
from ..formats import intx as fmt
from ..formats.grid import Grid
from ._base import QuantizedWeight, Scheme

__all__ = ["IntX"]

_PATTERN = re.compile(r"(u?)int(\d+)wo-(\d+|ch)(?:-(sym|asym))?(?:-axis(\d+))?")
#: ``group_size`` of one group per output row (axis 1) / input column (axis 0), written ``-ch``
PER_CHANNEL = -1


@dataclass(frozen=True, kw_only=True)
class IntX(Scheme):
    """``[u]int<bits>wo-<group_size>[-axis<axis>]``: b-bit group-wise integer weights, float activations.

    ``symmetric=True`` (``int``): torchao's symmetric intx, codes ``-2**(b-1) .. 2**(b-1) - 1`` times
    a bf16 scale per group.  ``symmetric=False`` (``uint``): HQQ-style min/max affine codes
    ``0 .. 2**b - 1`` with a bf16 scale and offset per group.  ``axis=1`` groups ``group_size``
    consecutive input columns of one output row; ``axis=0`` groups one input column across
    ``group_size`` output rows (strided by ``ceil(N / group_size)``, as HQQ's ``axis=0``).  Any
    ``group_size >= 1`` and any layer shape: a partial group is padded (:mod:`fxquant.formats.intx`).
    ``group_size=-1`` (``-ch``, GPTQ / AWQ / compressed-tensors' per-channel ``-1``): one group per
    output row (axis 1; per layer it is ``in_features``) or per input column (axis 0).
    """

    family: ClassVar[str] = "intx"
    op: ClassVar[str] = "linear_intx"
    forms: ClassVar[tuple[str, ...]] = ('uint<b>wo-<g>[-axis0|-axis1] (b in 1..8)',
                                        'int<b>wo-<g>[-sym|-asym][-axis0|-axis1] (b in 2..8; int4wo-<g>-sym)',
                                        '<g> = ch: one group per channel (uint4wo-ch, int4wo-ch-sym)')
    examples: ClassVar[tuple[str, ...]] = ("uint4wo-64", "int3wo-128", "uint2wo-32-axis0", "int8wo-128",
                                           "uint1wo-64", "int4wo-128-sym")
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    axis: int = 1

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not _is_int(self.bits) or self.bits not in fmt.BITS:
            raise ValueError(f"{name}.bits={self.bits!r} is not supported; valid: 1..8")
        if not _is_int(self.group_size) or (self.group_size < 1 and self.group_size != PER_CHANNEL):
            raise ValueError(f"{name}.group_size={self.group_size!r} is not supported; valid: an integer >= 1, "
                             f"or {PER_CHANNEL} (one group per channel)")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{name}.symmetric={self.symmetric!r} is not supported; valid: True, False")
        if not _is_int(self.axis) or self.axis not in fmt.AXES:
            raise ValueError(f"{name}.axis={self.axis!r} is not supported; valid: 0, 1")
        if self.symmetric and self.bits == 1:
            raise ValueError(f"{name}.bits=1 with symmetric=True is not supported: a symmetric 1-bit code has "
                             "only the levels {-scale, 0}; valid: symmetric=False (uint1wo-<g>) or bits 2..8")

    def __str__(self) -> str:
        group = "ch" if self.group_size == PER_CHANNEL else self.group_size
        text = f"{'' if self.symmetric else 'u'}int{self.bits}wo-{group}"
        if self.symmetric and self.bits == 4:  # "int4wo-<g>" is Int4WeightOnly's
            text += "-sym"
        return text + (f"-axis{self.axis}" if self.axis != 1 else "")

    @classmethod
    def parse(cls, text: str) -> "IntX | None":
        m = _PATTERN.fullmatch(text)
        if m is None:
            return None
        unsigned, bits, group, sym, axis = m.groups()
        if not unsigned and bits == "4" and axis is None and sym is None:
            return None  # int4wo-<g>: Int4WeightOnly
        if unsigned and sym == "sym":
            raise ValueError("'uint' is asymmetric and '-sym' symmetric: write int<b>wo-<g>[-sym] or uint<b>wo-<g>")
        return cls(bits=int(bits), group_size=PER_CHANNEL if group == "ch" else int(group),
                   symmetric=not unsigned and sym != "asym", axis=1 if axis is None else int(axis))

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        return reason

    def group(self, n: int, k: int) -> int:
        """The group size of an ``[n, k]`` weight (``group_size``, or the channel length for ``-1``)."""
        if self.group_size != PER_CHANNEL:
            return self.group_size
        return max(k if self.axis == 1 else n, 1)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        block_n = int4_fmt.native_cpu_block_n() or 64
        g = self.group(*weight.shape)
        tensors = fmt.to_storage(weight, self.bits, g, self.symmetric, self.axis, block_n)
        attrs = self.op_attrs(bits=self.bits, group_size=g, symmetric=self.symmetric,
                              axis=self.axis, block_n=block_n, out_features=weight.shape[0],
                              in_features=weight.shape[1])
        return QuantizedWeight(self.op, tensors, attrs, *weight.shape)

    def grid(self, n: int, k: int) -> Grid:
        qmax = (1 << self.bits) - 1
        return Grid(qlo=0, qhi=qmax, mid=1 << (self.bits - 1), symmetric=self.symmetric,
                    group_size=self.group(n, k), axis=self.axis, sym_den=qmax / 2, param_dtype=fmt.PARAM_DTYPE,
                    min_scale=fmt.MIN_SCALE)

    def pack_grid(self, q, scale, offset, n, k) -> QuantizedWeight:
        grid = self.grid(n, k)
        g = grid.group_size
        codes = grid.ungroup(q, n, fmt.stored_in_features(k, g, self.axis)).to(torch.uint8)
        if self.axis == 1:
            params = [p.reshape(n, -1).t() for p in (scale, offset)]
        else:
            params = [p.reshape(-1, k) for p in (scale, offset)]
        block_n = int4_fmt.native_cpu_block_n() or 64
        tensors = fmt.store(codes, params[0], None if self.symmetric else params[1], self.bits, block_n)
        attrs = self.op_attrs(bits=self.bits, group_size=g, symmetric=self.symmetric,
                              axis=self.axis, block_n=block_n, out_features=n, in_features=k)
        return QuantizedWeight(self.op, tensors, attrs, n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        t = qw.tensors
        return fmt.from_storage(t["codes_lo"], t["codes_hi"], t["scale"], t["offset"], self.bits,
                                qw.attrs["group_size"], self.axis, qw.attrs["block_n"], qw.out_features, qw.in_features)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
