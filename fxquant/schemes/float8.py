"""float8 schemes: ``float8wo[-e5m2]`` (weight-only) and ``float8dq[-row][-ub<bound>]`` (dynamic
float8 activations x float8 weights, torchao's float8dq / transformers' FbgemmFp8Config)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import float8 as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["Float8WeightOnly", "Float8DynamicActivation"]


@dataclass(frozen=True, kw_only=True)
class Float8WeightOnly(Scheme):
    """``float8wo`` (e4m3fn) / ``float8wo-e5m2``: float8 weights with a per-output-channel fp32
    scale, float activations (torchao ``Float8WeightOnlyConfig``)."""

    family: ClassVar[str] = "float8wo"
    op: ClassVar[str] = "linear_float8wo"
    forms: ClassVar[tuple[str, ...]] = ('float8wo[-e4m3fn|-e5m2]',)
    examples: ClassVar[tuple[str, ...]] = ("float8wo", "float8wo-e5m2")
    row_split: ClassVar[dict] = {"qweight": 0, "scale": 0}
    dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self):
        super().__post_init__()
        if self.dtype not in fmt.DTYPES.values():
            raise ValueError(f"Float8WeightOnly.dtype={self.dtype!r} is not supported; valid: "
                             f"{', '.join(f'torch.float8_{n}' for n in fmt.DTYPES)}")

    def __str__(self) -> str:
        name = fmt.dtype_name(self.dtype)
        return "float8wo" if name == "e4m3fn" else f"float8wo-{name}"

    @classmethod
    def parse(cls, text: str) -> "Float8WeightOnly | None":
        m = re.fullmatch(r"float8wo(?:-(\w+))?", text)
        if m is None:
            return None
        name = m.group(1) or "e4m3fn"
        if name not in fmt.DTYPES:
            raise ValueError(f"float8 dtype {name!r} is not supported; valid: {', '.join(fmt.DTYPES)}")
        return cls(dtype=fmt.DTYPES[name])

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        q, scale = fmt.quantize_weight(weight, self.dtype, "row")
        return QuantizedWeight(self.op, {"qweight": q, "scale": scale}, self.op_attrs(), *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.dequantize_weight(qw.tensors["qweight"], qw.tensors["scale"])


_DQ = re.compile(r"float8dq(?:-(?!ub)(\w+))?(?:-ub(.+))?")


@dataclass(frozen=True, kw_only=True)
class Float8DynamicActivation(Scheme):
    """``float8dq`` (per-tensor) / ``float8dq-row``: activations quantized to float8 e4m3fn on every
    call, weights float8 e4m3fn, both with the same ``granularity`` (as torchao
    ``Float8DynamicActivationFloat8WeightConfig``; ``torch._scaled_mm`` takes no mixed scaling).
    ``activation_scale_ub`` bounds the activation ``amax`` behind the scale (fbgemm / transformers
    ``FbgemmFp8Config``, default 1200.0; ``inf`` disables it); a non-default bound is spelled
    ``-ub<value>`` in the scheme string, e.g. ``float8dq-row-ub448.0``."""

    family: ClassVar[str] = "float8dq"
    op: ClassVar[str] = "linear_float8dq"
    forms: ClassVar[tuple[str, ...]] = ('float8dq[-row][-ub<bound>]',)
    examples: ClassVar[tuple[str, ...]] = ("float8dq", "float8dq-row", "float8dq-row-ub600.0")
    granularity: str = "tensor"
    row_split: ClassVar[dict] = {"qweight": 0, "scale": 0}
    activation_scale_ub: float = fmt.DEFAULT_ACTIVATION_SCALE_UB

    def __post_init__(self):
        super().__post_init__()
        if self.granularity not in fmt.GRANULARITIES:
            raise ValueError(f"Float8DynamicActivation.granularity={self.granularity!r} is not supported; "
                             f"valid: {', '.join(map(repr, fmt.GRANULARITIES))}")
        ub = self.activation_scale_ub
        if isinstance(ub, bool) or not isinstance(ub, (int, float)) or math.isnan(ub) or ub <= 0:
            raise ValueError(f"Float8DynamicActivation.activation_scale_ub={ub!r} must be a positive float "
                             f"(default {fmt.DEFAULT_ACTIVATION_SCALE_UB}; inf for no bound)")
        object.__setattr__(self, "activation_scale_ub", float(ub))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    def __str__(self) -> str:
        text = "float8dq" + ("-row" if self.granularity == "row" else "")
        if self.activation_scale_ub != fmt.DEFAULT_ACTIVATION_SCALE_UB:
            text += f"-ub{self.activation_scale_ub!r}"
        return text

    @classmethod
    def parse(cls, text: str) -> "Float8DynamicActivation | None":
        m = _DQ.fullmatch(text)
        if m is None:
            return None
        gran, ub = m.group(1) or "tensor", m.group(2)
        if gran not in fmt.GRANULARITIES:
            raise ValueError(f"float8dq granularity {gran!r} is not supported; valid: {', '.join(fmt.GRANULARITIES)}")
        try:
            bound = fmt.DEFAULT_ACTIVATION_SCALE_UB if ub is None else float(ub)
        except ValueError:
            raise ValueError(f"activation_scale_ub {ub!r} is not a number (e.g. float8dq-row-ub600.0)") from None
        return cls(granularity=gran, activation_scale_ub=bound)

    def row_multiple(self, n: int, k: int) -> int | None:
        return 1 if self.granularity == "row" else None  # a tensor-wise scale is a statistic of the whole

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        q, scale = fmt.quantize_weight(weight, self.dtype, self.granularity)
        attrs = self.op_attrs(granularity=self.granularity, activation_scale_ub=self.activation_scale_ub)
        return QuantizedWeight(self.op, {"qweight": q, "scale": scale}, attrs, *weight.shape)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.dequantize_weight(qw.tensors["qweight"], qw.tensors["scale"])
