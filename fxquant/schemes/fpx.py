"""Sub-byte floating point weight-only scheme ``fp<X>_e<A>m<B>`` (torchao's ``fpx_weight_only``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import fpx as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["FPx"]


@dataclass(frozen=True, kw_only=True)
class FPx(Scheme):
    """``fp<X>_e<A>m<B>``: sign + ``A`` exponent + ``B`` mantissa bits (``X = 1 + A + B`` in 3..7,
    ``A >= 1``, ``B >= 0``), no inf/NaN, per-output-channel bf16 scale, codes bit-packed
    (e.g. ``fp6_e3m2`` = FP6-LLM, ``fp4_e2m1`` = the MX FP4 element, ``fp5_e2m2``)."""

    family: ClassVar[str] = "fpx"
    op: ClassVar[str] = "linear_fpx"
    forms: ClassVar[tuple[str, ...]] = ('fp<X>_e<A>m<B> (X = A + B + 1 in 3..7)',)
    examples: ClassVar[tuple[str, ...]] = ("fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1", "fp3_e1m1")
    exponent_bits: int = 3
    mantissa_bits: int = 2

    def __post_init__(self):
        super().__post_init__()
        try:
            fmt.check_format(self.exponent_bits, self.mantissa_bits)
        except ValueError as e:
            raise ValueError(f"FPx: {e}") from None

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    def __str__(self) -> str:
        return fmt.format_name(self.exponent_bits, self.mantissa_bits)

    @classmethod
    def parse(cls, text: str) -> "FPx | None":
        parsed = fmt.parse_format(text)
        return None if parsed is None else cls(exponent_bits=parsed[0], mantissa_bits=parsed[1])

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        tensors = fmt.to_storage(weight, self.exponent_bits, self.mantissa_bits)
        attrs = self.op_attrs(ebits=self.exponent_bits, mbits=self.mantissa_bits, in_features=weight.shape[1])
        return QuantizedWeight(self.op, tensors, attrs, *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.from_storage(qw.tensors["qweight"], qw.tensors["scale"], self.exponent_bits,
                                self.mantissa_bits, qw.in_features)
