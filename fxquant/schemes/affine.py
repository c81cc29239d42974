"""``affine<b>-g<g>`` / ``affine<b>-ch``: integer weights with integer zero points, ``W = (q - z) * s``,
the layout of compressed-tensors' ``pack-quantized`` checkpoints (:mod:`fxquant.formats.affine`).

Grammar: ``affine<b>-g<g>[-sym|-asym][-bf16|-fp16|-fp32]`` (groups of ``g`` input columns) and
``affine<b>-ch[...]`` (one group per output channel), b in 2..8.  No suffix means asymmetric (a zero
point per group) with bf16 scales; the string names a non-default scale dtype and ``-sym``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import affine as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["Affine"]

_PATTERN = re.compile(r"affine(\d+)-(?:g(\d+)|(ch))(?:-(sym|asym))?(?:-(bf16|fp16|fp32))?")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
BITS = tuple(range(2, 9))


@dataclass(frozen=True, kw_only=True)
class Affine(Scheme):
    """``bits``-bit codes with an integer zero point and a ``scale_dtype`` scale per group.

    ``group_size``: an integer >= 1 (consecutive input columns of one row; a partial last group is
    allowed), or ``None`` / ``-1`` for one group per output channel (stored as ``None``).
    ``symmetric``: no zero point is stored (it is ``2**(bits-1)``: compressed-tensors' signed codes).
    ``scale_dtype``: bf16, fp16 or fp32, the dtype the scales are stored (and exported) in."""

    family: ClassVar[str] = "affine"
    op: ClassVar[str] = "linear_affine"
    forms: ClassVar[tuple[str, ...]] = ("affine<b>-g<g>[-sym|-asym][-bf16|-fp16|-fp32] (b in 2..8)",
                                        "affine<b>-ch[-sym|-asym][-bf16|-fp16|-fp32]: one group per channel")
    examples: ClassVar[tuple[str, ...]] = ("affine4-g128", "affine4-g128-sym", "affine8-ch-sym", "affine4-g32-fp16",
                                           "affine3-g64")
    row_split: ClassVar[dict] = {"qweight": 0, "scale": 0, "zero_point": 0}
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not _is_int(self.bits) or self.bits not in BITS:
            raise ValueError(f"{name}.bits={self.bits!r} is not supported; valid: 2..8")
        if self.group_size == -1 and _is_int(self.group_size):
            object.__setattr__(self, "group_size", None)
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise ValueError(f"{name}.group_size={self.group_size!r} is not supported; valid: an integer >= 1, "
                             "or None / -1 (one group per output channel)")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{name}.symmetric={self.symmetric!r} is not supported; valid: True, False")
        if self.scale_dtype not in fmt.SCALE_DTYPES:
            raise ValueError(f"{name}.scale_dtype={self.scale_dtype!r} is not supported; valid: torch.bfloat16, "
                             "torch.float16, torch.float32")

    def __str__(self) -> str:
        text = f"affine{self.bits}-" + ("ch" if self.group_size is None else f"g{self.group_size}")
        text += "-sym" if self.symmetric else ""
        return text + ("" if self.scale_dtype == torch.bfloat16 else f"-{_DTYPE_NAMES[self.scale_dtype]}")

    @classmethod
    def parse(cls, text: str) -> "Affine | None":
        m = _PATTERN.fullmatch(text)
        if m is None:
            return None
        bits, group, _, sym, dtype = m.groups()
        return cls(bits=int(bits), group_size=None if group is None else int(group), symmetric=sym == "sym",
                   scale_dtype=_NAMED_DTYPES[dtype or "bf16"])

    def group(self, n: int, k: int) -> int:
        """The group size of an ``[n, k]`` weight (``group_size``, or ``k`` per channel)."""
        return max(k, 1) if self.group_size is None else self.group_size

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        return reason

    def _attrs(self, n: int, k: int) -> dict:
        return self.op_attrs(bits=self.bits, group_size=self.group(n, k), symmetric=self.symmetric, in_features=k)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        tensors = fmt.to_storage(weight, self.bits, self.group(n, k), self.symmetric, self.scale_dtype)
        return QuantizedWeight(self.op, tensors, self._attrs(n, k), n, k)

    def packed(self, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, n: int,
               k: int) -> QuantizedWeight:
        """Stored tensors made elsewhere (a checkpoint's ``weight_packed``, ``weight_scale`` and unpacked
        zero points) -> the packed weight, checked against the op's layout (``ValueError`` naming the
        tensor otherwise)."""
        empty = torch.empty(0, dtype=torch.uint8, device=qweight.device)
        tensors = {"qweight": qweight, "scale": scale, "zero_point": empty if zero_point is None else zero_point}
        attrs = self._attrs(n, k)
        from ..ops import affine as op

        op.check(torch.empty(0, k, device="meta"), None, **tensors,
                 **{a: attrs[a] for a in ("bits", "group_size", "symmetric", "in_features")})
        if scale.dtype != self.scale_dtype:
            raise ValueError(f"{self}: scale is {scale.dtype}, the scheme's scale_dtype is {self.scale_dtype}")
        return QuantizedWeight(self.op, tensors, attrs, n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        t, a = qw.tensors, qw.attrs
        return fmt.dequantize(t["qweight"], t["scale"], t["zero_point"], a["bits"], a["group_size"], a["in_features"])

    def grid(self, n: int, k: int) -> fmt.AffineGrid:
        qmax = (1 << self.bits) - 1
        return fmt.AffineGrid(qlo=0, qhi=qmax, mid=1 << (self.bits - 1), symmetric=self.symmetric,
                              group_size=self.group(n, k), axis=1, sym_den=qmax / 2, param_dtype=self.scale_dtype,
                              bits=self.bits)

    def pack_grid(self, q, scale, offset, n, k) -> QuantizedWeight:
        grid = self.grid(n, k)
        codes = grid.ungroup(q, n, k).to(torch.uint8)
        s = scale.reshape(n, -1)
        zero = None if self.symmetric else grid.zero(s, offset.reshape(n, -1)).to(torch.uint8)
        tensors = fmt.store(codes, s.to(self.scale_dtype), zero, self.bits)
        return QuantizedWeight(self.op, tensors, self._attrs(n, k), n, k)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
