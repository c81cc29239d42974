"""bitsandbytes' 8-bit scheme as its checkpoints store it: ``bnb8[-<threshold>]``.

``Bnb8(threshold=6.0)`` is ``"bnb8"``: a ``Linear8bitLt(threshold=6.0, has_fp16_weights=False)`` /
transformers ``BitsAndBytesConfig(load_in_8bit=True)`` layer, its int8 codes and fp32 row absmax
(``SCB``) held as they are (:mod:`fxquant.formats.bnb8`), so ``fxquant.load_bnb`` loads and
``fxquant.save_bnb`` writes them bit for bit.  ``"bnb8-0"``: no outlier columns (bitsandbytes'
``threshold=0``).  ``llm.int8`` is the same algorithm on fxquant's bf16-step int8 layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import bnb8 as fmt
from ..formats import int8dq
from ._base import QuantizedWeight
from .int8dq import OutlierThreshold

__all__ = ["Bnb8"]


@dataclass(frozen=True, kw_only=True)
class Bnb8(OutlierThreshold):
    """``bnb8[-<threshold>]``: LLM.int8 on bitsandbytes' stored layout (codes + fp32 row absmax)."""

    family: ClassVar[str] = "bnb8"
    op: ClassVar[str] = "linear_bnb8"
    forms: ClassVar[tuple[str, ...]] = ("bnb8[-<threshold>]",)
    examples: ClassVar[tuple[str, ...]] = ("bnb8", "bnb8-0.0", "bnb8-4.5")
    row_split: ClassVar[dict] = {"qweight": 0, "scb": 0}
    name: ClassVar[str] = "bnb8"
    zero_ok: ClassVar[bool] = True
    zero_hint: ClassVar[str] = "0: no outlier columns"
    threshold: float = int8dq.DEFAULT_THRESHOLD

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        q, scb = fmt.quantize_weight(weight)
        return QuantizedWeight(self.op, {"qweight": q, "scb": scb}, self.op_attrs(threshold=self.threshold),
                               *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.dequantize_weight(qw.tensors["qweight"], qw.tensors["scb"])
