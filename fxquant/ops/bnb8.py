"""``fxquant::linear_bnb8``: bitsandbytes' ``Linear8bitLt`` (LLM.int8) on its own stored weight.

``linear_bnb8(x, qweight, scb, bias, threshold)``: ``qweight`` int8 ``[N, K]`` and ``scb`` fp32 ``[N]``
as :mod:`fxquant.formats.bnb8` lays them out; activations quantized per token as ``linear_int8dq`` /
``linear_llm_int8`` do (:mod:`fxquant.formats.int8dq`), ``threshold`` as bitsandbytes' (``> 0``: input
columns with ``|x| >= threshold`` in any row run in float; ``0``: none).  The definition::

    acc = qx @ qweight.T                       exact (int32)
    y   = (acc * sx) * row_scale(scb)          + where(outlier_col, x, 0) @ W.T   (threshold > 0)
                                               + bias,      W = dequantize_weight(qweight, scb)

in ``compute_dtype`` (fp32 when ``None``; ``acc * sx`` always in fp32, the integer sums overflow fp16;
the activations are never rounded to bf16 under ``None``).
CPU: the integer product of ``linear_int8dq`` (:func:`fxquant.ops.int8dq.cpu_int8_matmul`: the native
int8 GEMV / GEMM at small M, oneDNN above), rescaled in fp32; LLM.int8's outlier columns gathered and
multiplied in fp32 against the exact weight columns.  CUDA: the reference (no Triton kernel yet; the
int8dq kernel's epilogue takes a bf16 step).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..formats import bnb8 as fmt
from ..formats import int8dq as act
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define
from .int8dq import cpu_int8_matmul

OP_NAME = "linear_bnb8"


def check(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scb: torch.Tensor,
          threshold: float) -> None:
    """``qweight`` int8 ``[N, K]``, ``scb`` fp32 ``[N]``, ``threshold`` >= 0, ``x`` ``[..., K]``,
    ``bias`` ``[N]``."""
    if not threshold >= 0:
        v.fail(OP_NAME, f"threshold={threshold!r} is not supported; valid: a float >= 0 (0: no outlier columns)")
    n, k = v.matrix(OP_NAME, "qweight", qweight, (torch.int8,))
    v.stored(OP_NAME, "scb", scb, torch.float32, (n,), "[N] (row absmax)")
    v.activations(OP_NAME, x, k)
    v.bias(OP_NAME, bias, n)


def _quantize_x(x2: torch.Tensor, threshold: float):
    """-> (codes int8 ``[M, K]``, scale fp32 ``[M, 1]``, outlier column mask ``[K]`` or None)."""
    if threshold > 0:
        return act.quantize_activations_llm(x2, threshold)
    return (*act.quantize_activations(x2), None)


def reference(x: torch.Tensor, qweight: torch.Tensor, scb: torch.Tensor, *, bias: torch.Tensor | None,
              threshold: float, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Definition of ``linear_bnb8`` (masks only: shapes never depend on the data)."""
    cd = compute_dtype or torch.float32
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx, cols = _quantize_x(x2, threshold)
    # acc * sx in fp32 first: the integer sums overflow fp16 (127 * 127 * K)
    y = (act.int8_matmul(qx, qweight).float() * sx).to(cd) * fmt.row_scale(scb).to(cd)
    if cols is not None:
        y = y + F.linear(torch.where(cols, x2.to(cd), 0), fmt.dequantize_weight(qweight, scb).to(cd))
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bfloat16)


def _cpu_fast(x2: torch.Tensor, qweight: torch.Tensor, scb: torch.Tensor, threshold: float, *,
              nm: _cpu.Numerics) -> torch.Tensor:
    qx, sx, cols = _quantize_x(x2, threshold)
    # a unit bf16 step lets the int8 engines (native GEMV / GEMM included) return the exact product
    y = cpu_int8_matmul(qx, qweight, _ones(qweight.shape[0]), exact=nm.exact).mul_(fmt.row_scale(scb)).mul_(sx)
    if cols is None or not cols.any():
        return y
    idx = cols.nonzero().squeeze(1)  # data-dependent, but inside this eager kernel
    w_sub_t = qweight.t()[idx].float().mul_(scb.float()).mul_(fmt.INV_QMAX)  # W[:, idx].T, bit for bit
    return y.addmm_(nm.rounded(x2[:, idx]).float(), w_sub_t)


def dequantize_weight(qweight: torch.Tensor, scb: torch.Tensor, **_) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]`` (bitsandbytes' weight; the threshold does not enter it)."""
    return fmt.dequantize_weight(qweight, scb)


OP = LinearOpDef(
    name=OP_NAME, tensors=("qweight", "scb"), scalars=(("threshold", "float"),),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check,
    reference_fn=reference, cpu_fast=_cpu_fast, cpu_fast_any_m=True, dynamic_activations=True,
    doc="bitsandbytes LLM.int8: x [..., K] quantized per token (columns with |x| >= threshold in float when "
        "threshold > 0); qweight int8 [N, K]; scb fp32 [N] (row absmax, W = qweight * scb / 127); "
        "bias [N] -> [..., N]",
)
linear_bnb8 = define(OP)
