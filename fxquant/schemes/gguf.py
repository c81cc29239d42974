"""``gguf-<qtype>``: llama.cpp's GGUF block types kept packed (:mod:`fxquant.formats.gguf`), run by
``torch.ops.fxquant.linear_gguf``.

``GGUF(qtype="q4_k")`` is ``"gguf-q4_k"``.  The legacy types (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``,
``q8_0``) quantize a float weight with the ``gguf`` package's round to nearest, byte for byte, so
``quantize_(model, "gguf-q8_0")`` works; the k-quants (``q2_k`` .. ``q6_k``) are load-only: a weight
reaches them from a GGUF file (``fxquant.from_gguf``), through :meth:`GGUF.packed` /
:func:`fxquant.formats.gguf.pack_rows`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import gguf as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["GGUF"]

_PATTERN = re.compile(r"gguf-(\w+)")


@dataclass(frozen=True, kw_only=True)
class GGUF(Scheme):
    """One GGUF block type, ``qtype`` in ``q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k``
    (a name, case-insensitive, or a ``gguf.GGMLQuantizationType`` value; stored as the name)."""

    family: ClassVar[str] = "gguf"
    op: ClassVar[str] = "linear_gguf"
    forms: ClassVar[tuple[str, ...]] = (f"gguf-<qtype> (qtype in {', '.join(fmt.QTYPES)}; the k-quants load-only)",)
    examples: ClassVar[tuple[str, ...]] = ("gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q4_k", "gguf-q6_k")
    row_split: ClassVar[dict] = {"blocks": 0}
    qtype: str = "q4_k"

    def __post_init__(self):
        super().__post_init__()
        try:
            q = fmt.qtype(self.qtype)
        except ValueError:
            raise ValueError(f"GGUF.qtype={self.qtype!r} is not supported; valid: {', '.join(fmt.QTYPES)}") from None
        object.__setattr__(self, "qtype", q.name)

    def __str__(self) -> str:
        return f"gguf-{self.qtype}"

    @classmethod
    def parse(cls, text: str) -> "GGUF | None":
        m = _PATTERN.fullmatch(text)
        return None if m is None else cls(qtype=m.group(1))

    @property
    def block_size(self) -> int:
        """Values per block (32 legacy, 256 k-quants): ``in_features`` must be a multiple."""
        return fmt.QTYPES[self.qtype].block_size

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is not None:
            return reason
        if not fmt.QTYPES[self.qtype].quantizable:
            return f"{self} is load-only: read it from a GGUF file (fxquant.from_gguf)"
        if weight.numel() == 0:
            return f"weight has no elements (shape {tuple(weight.shape)})"
        if weight.shape[1] % self.block_size:
            return (f"in_features={weight.shape[1]} is not a multiple of {self}'s block size {self.block_size} "
                    "(GGUF blocks do not straddle rows and have no partial form)")
        return None

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        n, k = weight.shape
        return self.packed(fmt.quantize(weight, self.qtype), n, k)

    def packed(self, raw: torch.Tensor, n: int, k: int) -> QuantizedWeight:
        """A GGUF tensor's bytes (uint8, ``n`` rows of ``row_bytes`` in the file's order) -> the packed
        weight with this scheme's ``compute_dtype`` (:func:`fxquant.formats.gguf.pack_rows`; ``ValueError``
        naming the type and the shapes when they do not fit)."""
        return fmt.pack_rows(self.qtype, raw, n, k, compute_dtype=self.compute_dtype)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return fmt.dequantize(qw.tensors["blocks"], self.qtype, qw.in_features)
