"""``aqlm-<M>x<B>-g<in>``: additive quantization (AQLM), the layout of the aqlm library's and
transformers' AQLM checkpoints (:mod:`fxquant.formats.aqlm`).

Grammar: ``aqlm-<M>x<B>-g<in>[-o<out>][-fp16|-bf16|-fp32]``: ``M`` codebooks of ``2**B`` entries
(B in 1..16), each entry a block of ``out`` rows by ``in`` input columns (``out`` 1 when absent),
codebooks and scales in fp16 (the published checkpoints') unless a dtype is named.
``aqlm-1x16-g8`` is transformers' ``AqlmConfig()`` default (2.5 bits per weight on large layers),
``aqlm-2x8-g8`` its fast-kernel setup, ``aqlm-1x8-g4`` 2 bits of codes per weight with a small
codebook (small layers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import aqlm as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["AQLM"]

_PATTERN = re.compile(r"aqlm-(\d+)x(\d+)-g(\d+)(?:-o(\d+))?(?:-(fp16|bf16|fp32))?")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass(frozen=True, kw_only=True)
class AQLM(Scheme):
    """``num_codebooks`` codebooks of ``2**nbits_per_codebook`` codewords, each a block of
    ``out_group_size`` x ``in_group_size`` weights; a block of ``W`` is its per-out-group scale
    times the sum of one codeword per codebook.  ``param_dtype``: the codebooks' and scales' dtype.

    Without a method the codes and codebooks are found by :class:`fxquant.methods.AQLM` with its
    defaults and no data (residual k-means, then beam search and least-squares codebook updates on
    the weight error); ``@aqlm`` with ``AQLM(calibrated=True)`` fits the layer's output error."""

    family: ClassVar[str] = "aqlm"
    op: ClassVar[str] = "linear_aqlm"
    forms: ClassVar[tuple[str, ...]] = ("aqlm-<M>x<B>-g<in>[-o<out>][-fp16|-bf16|-fp32] (M codebooks of 2^B "
                                        "codewords, B in 1..16, each a block of <out> x <in> weights)",)
    examples: ClassVar[tuple[str, ...]] = ("aqlm-1x16-g8", "aqlm-2x8-g8", "aqlm-1x8-g4")
    num_codebooks: int = 1
    nbits_per_codebook: int = 16
    in_group_size: int = 8
    out_group_size: int = 1
    param_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        for field, lo in (("num_codebooks", 1), ("in_group_size", 1), ("out_group_size", 1)):
            value = getattr(self, field)
            if not _is_int(value) or value < lo:
                raise ValueError(f"{name}.{field}={value!r} is not supported; valid: an integer >= {lo}")
        if not _is_int(self.nbits_per_codebook) or self.nbits_per_codebook not in fmt.NBITS:
            raise ValueError(f"{name}.nbits_per_codebook={self.nbits_per_codebook!r} is not supported; valid: 1..16 "
                             "(codebooks of 2..65536 entries; int8 codes up to 8 bits, int16 above)")
        if self.param_dtype not in fmt.PARAM_DTYPES:
            raise ValueError(f"{name}.param_dtype={self.param_dtype!r} is not supported; valid: torch.float16, "
                             "torch.bfloat16, torch.float32")

    def __str__(self) -> str:
        text = f"aqlm-{self.num_codebooks}x{self.nbits_per_codebook}-g{self.in_group_size}"
        text += "" if self.out_group_size == 1 else f"-o{self.out_group_size}"
        return text + ("" if self.param_dtype == torch.float16 else f"-{_DTYPE_NAMES[self.param_dtype]}")

    @classmethod
    def parse(cls, text: str) -> "AQLM | None":
        m = _PATTERN.fullmatch(text)
        if m is None:
            return None
        books, bits, gin, gout, dtype = m.groups()
        return cls(num_codebooks=int(books), nbits_per_codebook=int(bits), in_group_size=int(gin),
                   out_group_size=int(gout or 1), param_dtype=_NAMED_DTYPES[dtype or "fp16"])

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        if reason is None and not bool(torch.isfinite(weight).all()):
            reason = "weight has non-finite values (k-means and least squares need finite weights)"
        return reason

    def op_scalars(self, n: int, k: int) -> dict:
        """The op's scalar arguments for an ``[n, k]`` weight."""
        return self.op_attrs(num_codebooks=self.num_codebooks, nbits_per_codebook=self.nbits_per_codebook,
                             in_group_size=self.in_group_size, out_group_size=self.out_group_size,
                             out_features=n, in_features=k)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        from ..methods.aqlm import AQLM as AQLMMethod

        return AQLMMethod().quantize(self, weight, None).qweight

    def pack(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, n: int,
             k: int) -> QuantizedWeight:
        """Unsigned codes ``[O, G, M]``, float codebooks ``[M, 2**B, og, ig]``, scales ``[O]`` -> the
        packed weight (values rounded to ``param_dtype``)."""
        tensors = fmt.store(codes, codebooks, scales, self.nbits_per_codebook, self.param_dtype)
        return QuantizedWeight(self.op, tensors, self.op_scalars(n, k), n, k)

    def packed(self, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, n: int,
               k: int) -> QuantizedWeight:
        """Stored tensors made elsewhere (a checkpoint's ``codes``, ``codebooks``, ``scales``) -> the
        packed weight, checked against the op's layout (``ValueError`` naming the tensor otherwise)."""
        tensors = {"codes": codes, "codebooks": codebooks, "scales": scales}
        attrs = self.op_scalars(n, k)
        from ..ops import aqlm as op

        op.check(torch.empty(0, k, device="meta"), None, **tensors,
                 **{a: v for a, v in attrs.items() if a != "compute_dtype"})
        for name in ("codebooks", "scales"):
            if tensors[name].dtype != self.param_dtype:
                raise ValueError(f"{self}: {name} is {tensors[name].dtype}, the scheme's param_dtype is "
                                 f"{self.param_dtype}")
        return QuantizedWeight(self.op, tensors, attrs, n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        t, a = qw.tensors, qw.attrs
        return fmt.dequantize(t["codes"], t["codebooks"], t["scales"], a["nbits_per_codebook"], a["out_features"],
                              a["in_features"])

    def nbytes(self, n: int, k: int) -> int:
        """Exact stored bytes of an ``[n, k]`` weight in this scheme."""
        return fmt.nbytes(n, k, self.num_codebooks, self.nbits_per_codebook, self.in_group_size,
                          self.out_group_size, self.param_dtype)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
