"""``vptq-v<v>-c<C>[...]``: vector quantization with residual codebooks and outlier columns (VPTQ), the
layout of the VPTQ library's ``VQuantLinear`` (:mod:`fxquant.formats.vptq`).

Grammar: ``vptq-v<v>-c<C>[-r<Cr>][-o<size>[-ov<vo>][-oc<Co>]][-g<G>][-gs<gs>][-norm][-perm][-fp16|-fp32]``:
vectors of ``v`` output rows, ``C`` centroids, ``Cr`` residual centroids, ``size`` outlier columns in a
codebook of ``Co`` vectors of ``vo`` rows (defaults: ``C`` and ``v``), ``G`` codebook groups of ``gs``
columns each (default: the non-outlier columns split evenly), a per-column scale and bias (``-norm``),
a column permutation (``-perm``), codebooks and norms in bf16 unless ``-fp16`` / ``-fp32``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import vptq as fmt
from ._base import QuantizedWeight, Scheme

__all__ = ["VPTQ"]

_PATTERN = re.compile(r"vptq-v(\d+)-c(\d+)(?:-r(\d+))?(?:-o(\d+)(?:-ov(\d+))?(?:-oc(\d+))?)?(?:-g(\d+))?"
                      r"(?:-gs(\d+))?(-norm)?(-perm)?(?:-(bf16|fp16|fp32))?")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass(frozen=True, kw_only=True)
class VPTQ(Scheme):
    """Vector post-training quantization, vectors along the output dim (module docstring).

    ``vector_len`` (v >= 1) rows per vector; ``num_centroids`` (a power of two, 2..65536) per codebook;
    ``num_res_centroids`` 0 (no residual codebook) or a power of two; ``outlier_size`` columns (the first
    ones after the permutation: with ``enable_perm`` and calibration, the most important) quantized in a
    codebook of ``num_outlier_centroids`` vectors of ``outlier_vector_len`` rows (default: as the main
    one); ``group_num`` codebooks for the other columns, ``group_size`` columns each (``None``: split
    evenly; a number: every layer must have ``outlier_size + group_num * group_size`` inputs);
    ``enable_norm``: per input column ``W = Ŵ * scale + bias`` (min / max of the column);
    ``enable_perm``: columns permuted (by decreasing Hessian diagonal with calibration data, else
    column energy); ``codebook_dtype``: of codebooks, scales and biases.  Round-to-nearest (no method) is
    k-means (plus residual k-means on the remainder); ``@vptq`` adds the Hessian
    (:class:`fxquant.methods.VPTQ`)."""

    family: ClassVar[str] = "vptq"
    op: ClassVar[str] = "linear_vptq"
    forms: ClassVar[tuple[str, ...]] = (
        "vptq-v<v>-c<C>[-r<Cr>][-o<outliers>[-ov<v>][-oc<C>]][-g<groups>][-gs<group size>][-norm][-perm]"
        "[-fp16|-fp32] (C, Cr: powers of two up to 65536)",)
    examples: ClassVar[tuple[str, ...]] = ("vptq-v8-c256-r256", "vptq-v4-c256", "vptq-v8-c65536-r256-norm-perm",
                                           "vptq-v6-c4096-o32-perm")
    vector_len: int = 8
    num_centroids: int = 256
    num_res_centroids: int = 0
    outlier_size: int = 0
    outlier_vector_len: int | None = None
    num_outlier_centroids: int | None = None
    group_num: int = 1
    group_size: int | None = None
    enable_norm: bool = False
    enable_perm: bool = False
    codebook_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__

        def bad(field, valid):
            raise ValueError(f"{name}.{field}={getattr(self, field)!r} is not supported; valid: {valid}")

        if not _is_int(self.vector_len) or self.vector_len < 1:
            bad("vector_len", "an integer >= 1")
        if not fmt.is_codebook_size(self.num_centroids):
            bad("num_centroids", f"a power of two in 2..{fmt.MAX_CENTROIDS}")
        if self.num_res_centroids in (-1, None):
            object.__setattr__(self, "num_res_centroids", 0)
        if self.num_res_centroids != 0 and not fmt.is_codebook_size(self.num_res_centroids):
            bad("num_res_centroids", f"0 (no residual codebook) or a power of two in 2..{fmt.MAX_CENTROIDS}")
        if fmt.index_bits(self.num_centroids) + (fmt.index_bits(self.num_res_centroids)
                                                  if self.num_res_centroids else 0) > 32:
            bad("num_res_centroids", "index bits of the two codebooks summing to at most 32")
        if not _is_int(self.outlier_size) or self.outlier_size < 0:
            bad("outlier_size", "an integer >= 0")
        if self.outlier_size:
            if self.outlier_vector_len is None:
                object.__setattr__(self, "outlier_vector_len", self.vector_len)
            if self.num_outlier_centroids is None:
                object.__setattr__(self, "num_outlier_centroids", self.num_centroids)
            if not _is_int(self.outlier_vector_len) or self.outlier_vector_len < 1:
                bad("outlier_vector_len", "an integer >= 1")
            if not fmt.is_codebook_size(self.num_outlier_centroids):
                bad("num_outlier_centroids", f"a power of two in 2..{fmt.MAX_CENTROIDS}")
        elif self.outlier_vector_len is not None or self.num_outlier_centroids is not None:
            bad("outlier_size", "an integer >= 1 when outlier_vector_len / num_outlier_centroids are set")
        if not _is_int(self.group_num) or self.group_num < 1:
            bad("group_num", "an integer >= 1")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            bad("group_size", "an integer >= 1, or None / -1 (the non-outlier columns split into group_num groups)")
        for flag in ("enable_norm", "enable_perm"):
            if not isinstance(getattr(self, flag), bool):
                bad(flag, "True, False")
        if self.codebook_dtype not in fmt.FLOAT_DTYPES:
            bad("codebook_dtype", "torch.bfloat16, torch.float16, torch.float32")

    def __str__(self) -> str:
        text = f"vptq-v{self.vector_len}-c{self.num_centroids}"
        text += f"-r{self.num_res_centroids}" if self.num_res_centroids else ""
        if self.outlier_size:
            text += f"-o{self.outlier_size}"
            text += f"-ov{self.outlier_vector_len}" if self.outlier_vector_len != self.vector_len else ""
            text += f"-oc{self.num_outlier_centroids}" if self.num_outlier_centroids != self.num_centroids else ""
        text += f"-g{self.group_num}" if self.group_num != 1 else ""
        text += f"-gs{self.group_size}" if self.group_size is not None else ""
        text += ("-norm" if self.enable_norm else "") + ("-perm" if self.enable_perm else "")
        return text + ("" if self.codebook_dtype == torch.bfloat16 else f"-{_DTYPE_NAMES[self.codebook_dtype]}")

    @classmethod
    def parse(cls, text: str) -> "VPTQ | None":
        m = _PATTERN.fullmatch(text)
        if m is None:
            return None
        v, c, r, o, ov, oc, g, gs, norm, perm, dtype = m.groups()
        as_int = lambda s: None if s is None else int(s)  # noqa: E731
        return cls(vector_len=int(v), num_centroids=int(c), num_res_centroids=as_int(r) or 0,
                   outlier_size=as_int(o) or 0, outlier_vector_len=as_int(ov), num_outlier_centroids=as_int(oc),
                   group_num=as_int(g) or 1, group_size=as_int(gs), enable_norm=norm is not None,
                   enable_perm=perm is not None, codebook_dtype=_NAMED_DTYPES[dtype or "bf16"])

    # ---- per layer ---------------------------------------------------------------------------------
    def layout(self, n: int, k: int) -> fmt.Layout:
        """The sizes of an ``[n, k]`` weight (``ValueError`` when this scheme cannot lay it out)."""
        reason = self._layout_problem(n, k)
        if reason:
            raise ValueError(f"{self}: {reason}")
        return self._layout(n, k)

    def _layout(self, n: int, k: int) -> fmt.Layout:
        return fmt.Layout(out_features=n, in_features=k, vector_len=self.vector_len,
                          num_centroids=self.num_centroids, num_res_centroids=self.num_res_centroids,
                          outlier_size=self.outlier_size, outlier_vector_len=self.outlier_vector_len or 1,
                          num_outlier_centroids=self.num_outlier_centroids or 0, group_num=self.group_num,
                          enable_perm=self.enable_perm, enable_norm=self.enable_norm)

    def _layout_problem(self, n: int, k: int) -> str | None:
        if self.group_size is not None and self.outlier_size + self.group_num * self.group_size != k:
            return (f"outlier_size {self.outlier_size} + group_num {self.group_num} x group_size {self.group_size} "
                    f"= {self.outlier_size + self.group_num * self.group_size} columns, the weight has {k}")
        return self._layout(n, k).problem()

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        reason = super().unsupported_reason(weight)
        if reason is None and weight.numel() == 0:
            reason = f"weight has no elements (shape {tuple(weight.shape)})"
        if reason is None:
            reason = self._layout_problem(*weight.shape)
        if reason is None and not bool(torch.isfinite(weight).all()):
            reason = "weight has non-finite values (k-means needs finite vectors)"
        return reason

    def attrs(self, lay: fmt.Layout) -> dict:
        """The op's scalar arguments for a layout."""
        return self.op_attrs(vector_len=lay.vector_len, num_centroids=lay.num_centroids,
                             num_res_centroids=lay.num_res_centroids, outlier_size=lay.outlier_size,
                             outlier_vector_len=lay.outlier_vector_len,
                             num_outlier_centroids=lay.num_outlier_centroids, group_num=lay.group_num,
                             enable_perm=lay.enable_perm, enable_norm=lay.enable_norm,
                             out_features=lay.out_features, in_features=lay.in_features)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Round-to-nearest's counterpart: k-means codebooks and nearest indices, no data
        (:func:`fxquant.methods.vptq.fit` with the default parameters)."""
        from ..methods.vptq import VPTQ as Method, fit

        return fit(self.format, weight, None, Method())[0]

    def packed(self, tensors: dict[str, torch.Tensor], n: int, k: int) -> QuantizedWeight:
        """Stored tensors made elsewhere (a checkpoint's, :mod:`fxquant.formats.vptq` names; absent parts
        may be left out) -> the packed weight, checked against the op's layout (``ValueError`` naming the
        tensor otherwise)."""
        lay = self.layout(n, k)
        empty = torch.empty(0, dtype=self.codebook_dtype)
        full = {name: tensors.get(name, empty) for name in lay.shapes()}
        for name in ("outlier_indices", "perm"):
            if full[name] is empty:
                full[name] = torch.empty(0, dtype=torch.int16)
        from ..ops import vptq as op

        attrs = self.attrs(lay)
        op.check(torch.empty(0, k, device="meta"), None, **full,
                 **{a: v for a, v in attrs.items() if a != "compute_dtype"})
        return QuantizedWeight(self.op, full, attrs, n, k)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        from ..ops.vptq import layout_of

        return fmt.dequantize(qw.tensors, layout_of(qw.attrs))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
