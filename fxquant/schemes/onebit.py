"""OneBit scheme: ``onebit`` — a sign bit per weight and two bf16 value vectors (Xu et al. 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import onebit as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["OneBit"]


@dataclass(frozen=True, kw_only=True)
class OneBit(Scheme):
    """``onebit``: ``W ≈ sign(W) ⊙ (a bᵀ)``, ``a bᵀ`` the rank-1 SVD of ``|W|`` (round-to-nearest
    init, no calibration); ``y = ((x ⊙ b) · sign(W)ᵀ) ⊙ a``.  About 1 bit per weight plus
    16 (N + K) bits per layer.  Layout and error: :mod:`fxquant.formats.onebit`."""

    family: ClassVar[str] = "onebit"
    op: ClassVar[str] = "linear_onebit"
    forms: ClassVar[tuple[str, ...]] = ('onebit',)
    examples: ClassVar[tuple[str, ...]] = ("onebit",)

    def __str__(self) -> str:
        return "onebit"

    @classmethod
    def parse(cls, text: str) -> "OneBit | None":
        return cls() if text == "onebit" else None

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        if reason is None and not bool(torch.isfinite(weight).all()):
            reason = "weight has non-finite values (the rank-1 fit of |W| needs finite magnitudes)"
        return reason

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(self.op, fmt.quantize(weight), self.op_attrs(), *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.dequantize(qw.tensors["sign_bits"], qw.tensors["a"], qw.tensors["b"])
