"""Weight-only integer schemes of the pipeline: ``int8wo`` and ``int4wo-<group>``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import int4 as int4_fmt
from ..formats import int8 as int8_fmt
from ..formats.grid import Grid
from ._base import QuantizedWeight, Scheme

__all__ = ["Int8WeightOnly", "Int4WeightOnly"]


@dataclass(frozen=True, kw_only=True)
class Int8WeightOnly(Scheme):
    """``int8wo``: symmetric per-output-channel int8 weights, float activations."""

    family: ClassVar[str] = "int8wo"
    op: ClassVar[str] = "linear_int8wo"
    forms: ClassVar[tuple[str, ...]] = ('int8wo',)
    examples: ClassVar[tuple[str, ...]] = ("int8wo",)
    row_split: ClassVar[dict] = {"qweight": 0, "scale": 0}

    def __str__(self) -> str:
        return "int8wo"

    @classmethod
    def parse(cls, text: str) -> "Int8WeightOnly | None":
        return cls() if text == "int8wo" else None

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        q, scale = int8_fmt.quantize(weight)
        return QuantizedWeight(self.op, {"qweight": q, "scale": scale}, self.op_attrs(), *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return int8_fmt.dequantize(qw.tensors["qweight"], qw.tensors["scale"])

    def grid(self, n: int, k: int) -> Grid:
        q = int8_fmt.QMAX
        return Grid(qlo=128 - q, qhi=128 + q, mid=128, symmetric=True, group_size=max(k, 1), sym_den=q,
                    param_dtype=int8_fmt.SCALE_DTYPE, min_scale=1e-12 / q)

    def pack_grid(self, q, scale, offset, n, k) -> QuantizedWeight:
        tensors = {"qweight": (q.reshape(n, k) - 128).to(torch.int8), "scale": scale.to(int8_fmt.SCALE_DTYPE)}
        return QuantizedWeight(self.op, tensors, self.op_attrs(), n, k)


@dataclass(frozen=True, kw_only=True)
class Int4WeightOnly(Scheme):
    """``int4wo-<group_size>``: asymmetric group-wise int4 with a zero point per group; any in_features
    (a partial last group is padded, :mod:`fxquant.formats.int4`)."""

    family: ClassVar[str] = "int4wo"
    op: ClassVar[str] = "linear_int4wo"
    forms: ClassVar[tuple[str, ...]] = ('int4wo-<g> (g in 32, 64, 128, 256)',)
    examples: ClassVar[tuple[str, ...]] = tuple(f"int4wo-{g}" for g in int4_fmt.GROUP_SIZES)
    row_split: ClassVar[dict] = {"qweight": 0, "scales_and_zeros": 1}
    group_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.group_size not in int4_fmt.GROUP_SIZES:
            raise ValueError(f"Int4WeightOnly.group_size={self.group_size!r} is not supported; "
                             f"valid: {', '.join(map(str, int4_fmt.GROUP_SIZES))}")

    def __str__(self) -> str:
        return f"int4wo-{self.group_size}"

    @classmethod
    def parse(cls, text: str) -> "Int4WeightOnly | None":
        m = re.fullmatch(r"int4wo(?:-(\d+))?", text)
        return cls(group_size=int(m.group(1) or 128)) if m else None

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        return reason

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        block_n = int4_fmt.native_cpu_block_n() or 64
        tensors = int4_fmt.to_storage(weight, self.group_size, block_n)
        attrs = self.op_attrs(group_size=self.group_size, block_n=block_n, out_features=weight.shape[0],
                              in_features=weight.shape[1])
        return QuantizedWeight(self.op, tensors, attrs, *weight.shape)

    def row_multiple(self, n: int, k: int) -> int:
        return int4_fmt.ROW_ALIGN  # whole tiles: only the last block is padded

    def grid(self, n: int, k: int) -> Grid:
        return Grid(qlo=0, qhi=15, mid=8, symmetric=False, group_size=self.group_size,
                    param_dtype=int4_fmt.PARAM_DTYPE)

    def pack_grid(self, q, scale, offset, n, k) -> QuantizedWeight:
        block_n = int4_fmt.native_cpu_block_n() or 64
        tensors = int4_fmt.store(q.reshape(n, -1), scale.reshape(n, -1), offset.reshape(n, -1), block_n)
        attrs = self.op_attrs(group_size=self.group_size, block_n=block_n, out_features=n, in_features=k)
        return QuantizedWeight(self.op, tensors, attrs, n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return int4_fmt.from_storage(qw.tensors["qweight"], qw.tensors["scales_and_zeros"], self.group_size,
                                     qw.attrs["block_n"], qw.out_features, qw.in_features)
