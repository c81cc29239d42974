"""Dynamic int8 activation schemes: ``int8dq`` (w8a8) and ``llm.int8[-<threshold>]`` (w8a8 + outliers).

Both store the weight as :mod:`fxquant.formats.int8` does (int8 codes, bf16 per-channel scales)
and quantize activations per token when the layer runs (:mod:`fxquant.formats.int8dq`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import int8dq as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["Int8DynamicActivation", "LLMInt8"]


class OutlierThreshold(Scheme):
    """``<name>[-<threshold>]`` strings of the LLM.int8 schemes (``llm.int8``, ``bnb8``): input columns
    with ``|x| >= threshold`` run in float.  Subclasses set ``name``, ``zero_ok`` (whether 0, no outlier
    columns, is a valid threshold) and ``zero_hint``, and declare the ``threshold`` field."""

    name: ClassVar[str]
    zero_ok: ClassVar[bool]
    zero_hint: ClassVar[str]

    def __post_init__(self):
        super().__post_init__()
        t = self.threshold
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                or t < 0 or (t == 0 and not self.zero_ok)):
            raise ValueError(f"{type(self).__name__}.threshold={t!r} is not supported; valid: a finite number "
                             f"{'>=' if self.zero_ok else '>'} 0 (default {fmt.DEFAULT_THRESHOLD}; {self.zero_hint})")
        object.__setattr__(self, "threshold", float(t))

    def __str__(self) -> str:
        return self.name if self.threshold == fmt.DEFAULT_THRESHOLD else f"{self.name}-{self.threshold!r}"

    @classmethod
    def parse(cls, text: str) -> "OutlierThreshold | None":
        m = re.fullmatch(re.escape(cls.name) + r"(?:-(.+))?", text)
        if m is None:
            return None
        if m.group(1) is None:
            return cls()
        try:
            threshold = float(m.group(1))
        except ValueError:
            raise ValueError(f"{cls.__name__}.threshold={m.group(1)!r} is not a number; write e.g. "
                             f"'{cls.name}-4.5'") from None
        return cls(threshold=threshold)


class _Int8Weights(Scheme):
    """Weight side shared by both schemes: symmetric per-output-channel int8."""

    row_split: ClassVar[dict] = {"qweight": 0, "scale": 0}

    def _quantize(self, weight: torch.Tensor, **scalars) -> QuantizedWeight:
        q, scale = fmt.quantize_weight(weight)
        return QuantizedWeight(self.op, {"qweight": q, "scale": scale}, self.op_attrs(**scalars), *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.dequantize_weight(qw.tensors["qweight"], qw.tensors["scale"])


@dataclass(frozen=True, kw_only=True)
class Int8DynamicActivation(_Int8Weights):
    """``int8dq``: per-token symmetric int8 activations x per-channel int8 weights, int32
    accumulation (torchao ``Int8DynamicActivationInt8WeightConfig``, EETQ)."""

    family: ClassVar[str] = "int8dq"
    op: ClassVar[str] = "linear_int8dq"
    forms: ClassVar[tuple[str, ...]] = ('int8dq',)
    examples: ClassVar[tuple[str, ...]] = ("int8dq",)

    def __str__(self) -> str:
        return "int8dq"

    @classmethod
    def parse(cls, text: str) -> "Int8DynamicActivation | None":
        return cls() if text == "int8dq" else None

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return self._quantize(weight)


@dataclass(frozen=True, kw_only=True)
class LLMInt8(OutlierThreshold, _Int8Weights):
    """``llm.int8`` / ``llm.int8-<threshold>``: LLM.int8 (bitsandbytes ``Linear8bitLt``): input
    columns with ``|x| >= threshold`` in any row run in float, the rest as ``int8dq``."""

    family: ClassVar[str] = "llm.int8"
    op: ClassVar[str] = "linear_llm_int8"
    forms: ClassVar[tuple[str, ...]] = ('llm.int8[-<threshold>]',)
    examples: ClassVar[tuple[str, ...]] = ("llm.int8", "llm.int8-4.5")
    name: ClassVar[str] = "llm.int8"
    zero_ok: ClassVar[bool] = False
    zero_hint: ClassVar[str] = "for no outlier columns use 'int8dq'"
    threshold: float = fmt.DEFAULT_THRESHOLD

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        return self._quantize(weight, threshold=self.threshold)
