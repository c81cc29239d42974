"""``fxquant::linear_affine_perm``: the ``affine`` weight with its input columns stored in another order
(GPTQ's act-order ``g_idx``, held as a column permutation: the exllama approach).

``y = x @ W.T + bias`` with ``W[:, perm[i]] = Ws[:, i]``, where ``Ws`` ``[N, K]`` is the
:mod:`fxquant.formats.affine` weight of ``qweight`` / ``scale`` / ``zero_point`` (stored column ``i``
in group ``i // group_size``) and ``perm`` int32 ``[K]`` a permutation of ``0 .. K-1``; equivalently
``y = x[..., perm] @ Ws.T + bias``.

Why a permutation and not a stored ``g_idx`` read per column: a GPTQ act-order checkpoint assigns
column ``k`` to group ``g_idx[k] = invperm[k] // group_size`` (every group has ``group_size``
columns), so sorting the columns by group makes the groups contiguous again and the layer *is* an
``affine`` layer on permuted inputs: the same values bit for bit (``(q - z) * s`` of the same
codes), the affine CPU path unchanged, and one gather of ``x`` (``M x K`` elements) per call instead
of gathering the per-group scale and zero for every weight element decoded.

CPU (every M): ``x`` gathered to the stored order once, then exactly the ``linear_affine`` paths (the
native GEMV up to ``affine.NATIVE_MAX_ROWS`` rows, else rows of ``Ws`` decoded a block at a time and
multiplied while in cache, under the ``compute_dtype`` policy of :func:`._cpu.numerics`).
``compute_dtype=float16``: the fp16 reference.  CUDA: the reference.
"""
from __future__ import annotations

import torch

from ..formats import affine as fmt
from ..schemes._base import QuantizedWeight
from . import _validate as v
from . import affine
from ._dequant_gemm import block_rows, blocked_linear
from ._linear import LinearOpDef, define

OP_NAME = "linear_affine_perm"
TENSORS = ("qweight", "scale", "zero_point", "perm")


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, perm: torch.Tensor,
                      bits: int, group_size: int, symmetric: bool, in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, in_features]`` in the input order (``W[:, perm] = Ws``)."""
    ws = fmt.dequantize(qweight, scale, zero_point, bits, group_size, in_features)
    return torch.empty_like(ws).index_copy_(1, perm.long(), ws)


def check(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor, perm: torch.Tensor, bits: int, group_size: int, symmetric: bool,
          in_features: int) -> None:
    """The ``linear_affine`` tensors (:func:`.affine.check`) and ``perm`` int32 ``[K]``.  That ``perm`` is
    a permutation is checked once, when the layer is built (:func:`packed`), not on every call."""
    affine.check(x, bias, qweight, scale, zero_point, bits, group_size, symmetric, in_features)
    v.stored(OP_NAME, "perm", perm, torch.int32, (in_features,), "[K] (stored column i is input column perm[i])")


def _cpu_fast(xs: torch.Tensor, qweight, scale, zero_point, perm, bits, group_size, symmetric, in_features, nm):
    """``x`` gathered into the stored column order, then the ``linear_affine`` paths: the native GEMV at
    small M, else the blocked dequantize path."""
    xp = xs.index_select(1, perm)
    y = affine.native_linear(xp, qweight, scale, zero_point, bits, group_size, symmetric, nm)
    if y is not None:
        return y
    dt = nm.gemm_dtype(xp)
    decode, row_scale, mult = affine._block_decoder(qweight, scale, zero_point, bits, group_size, symmetric,
                                                    in_features, dt)
    rows = max(mult, block_rows(in_features, dt) // mult * mult)
    return blocked_linear(nm.rounded(xp), qweight.shape[0], in_features, decode, row_scale, dt, rows)


OP = LinearOpDef(
    name=OP_NAME, tensors=TENSORS,
    scalars=(("bits", "int"), ("group_size", "int"), ("symmetric", "bool"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check,
    cpu_fast=_cpu_fast, cpu_fast_any_m=True,
    doc="x [..., K]; qweight int32 [N, ceil(K*bits/32)], scale [N, ceil(K/g)], zero_point uint8 (as "
        "linear_affine, columns in stored order); perm int32 [K] (stored column i is input column perm[i]); "
        "bias [N] -> [..., N] = x[..., perm] @ Ws.T + bias",
)
linear_affine_perm = define(OP)
reference = OP.reference


def packed(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, perm: torch.Tensor, *,
           bits: int, group_size: int, symmetric: bool, n: int, k: int) -> QuantizedWeight:
    """Stored tensors (``zero_point`` ``None`` when symmetric) -> the packed weight of this op, checked:
    ``ValueError`` naming the tensor when a shape or dtype is off or ``perm`` is not a permutation."""
    empty = torch.empty(0, dtype=torch.uint8, device=qweight.device)
    tensors = {"qweight": qweight, "scale": scale, "zero_point": empty if zero_point is None else zero_point,
               "perm": perm}
    attrs = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "in_features": k}
    check(torch.empty(0, k, device="meta"), None, **tensors, **attrs)
    if qweight.shape[0] != n:
        raise ValueError(f"fxquant::{OP_NAME}: qweight has {qweight.shape[0]} rows, the layer {n} out_features")
    if k and not torch.equal(torch.sort(perm.long()).values, torch.arange(k, device=perm.device)):
        raise ValueError(f"fxquant::{OP_NAME}: perm is not a permutation of 0..{k - 1}")
    return QuantizedWeight(OP_NAME, tensors, attrs, n, k)
