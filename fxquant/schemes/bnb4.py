"""bitsandbytes 4-bit schemes: ``nf4-<blocksize>[+dq]`` and ``fp4-<blocksize>[+dq]``.

``NF4(blocksize=64, double_quant=True)`` is ``"nf4-64+dq"``: transformers'
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``;
``compute_dtype`` plays ``bnb_4bit_compute_dtype``.  The blocksize may be left out of a string
(``"nf4"``, ``"fp4+dq"``: 64, bitsandbytes' default); ``str()`` always writes it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import bnb4 as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["NF4", "FP4"]


@dataclass(frozen=True, kw_only=True)
class _Bnb4(Scheme):
    """Blockwise absmax over the flattened weight, 4-bit codes into a 16-value table."""

    quant_type: ClassVar[str]
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.blocksize, bool) or self.blocksize not in fmt.BLOCKSIZES:
            raise ValueError(f"{name}.blocksize={self.blocksize!r} is not supported; "
                             f"valid: {', '.join(map(str, fmt.BLOCKSIZES))}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"{name}.double_quant={self.double_quant!r} is not supported; valid: True, False")

    @property
    def op(self) -> str:  # type: ignore[override]  # the storage (hence the op) depends on double_quant
        return "linear_bnb4_dq" if self.double_quant else "linear_bnb4"

    def __str__(self) -> str:
        return f"{self.quant_type}-{self.blocksize}{'+dq' if self.double_quant else ''}"

    @classmethod
    def parse(cls, text: str) -> "_Bnb4 | None":
        m = re.fullmatch(rf"{cls.quant_type}(?:-(\d+))?(\+dq)?", text)
        if m is None:
            return None
        return cls(blocksize=int(m.group(1) or 64), double_quant=m.group(2) is not None)

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        return reason

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        tensors = fmt.to_storage(weight, self.quant_type, self.blocksize, self.double_quant)
        n, k = weight.shape
        scalars = {"blocksize": self.blocksize}
        if self.double_quant:
            scalars["absmax_blocksize"] = fmt.NESTED_BLOCKSIZE
        attrs = self.op_attrs(**scalars, out_features=n, in_features=k)
        return QuantizedWeight(self.op, tensors, attrs, n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.from_storage(qw.tensors, self.blocksize, qw.out_features, qw.in_features)


@dataclass(frozen=True, kw_only=True)
class NF4(_Bnb4):
    """``nf4-<blocksize>[+dq]``: 4-bit NormalFloat (QLoRA), bit-identical to bitsandbytes."""

    family: ClassVar[str] = "nf4"
    quant_type: ClassVar[str] = "nf4"
    forms: ClassVar[tuple[str, ...]] = ('nf4[-<blocksize>][+dq]',)
    examples: ClassVar[tuple[str, ...]] = ("nf4-64", "nf4-128", "nf4-64+dq", "nf4-128+dq")  # canonical forms


@dataclass(frozen=True, kw_only=True)
class FP4(_Bnb4):
    """``fp4-<blocksize>[+dq]``: bitsandbytes' FP4 (e2m1, its own exponent bias), bit-identical."""

    family: ClassVar[str] = "fp4"
    quant_type: ClassVar[str] = "fp4"
    forms: ClassVar[tuple[str, ...]] = ('fp4[-<blocksize>][+dq]',)
    examples: ClassVar[tuple[str, ...]] = ("fp4-64", "fp4-128", "fp4-64+dq", "fp4-128+dq")
