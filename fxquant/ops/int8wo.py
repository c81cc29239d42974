"""``fxquant::linear_int8wo``: int8 per-channel weight-only linear.

``y = x @ (qweight * scale[:, None]).T + bias``; layout in :mod:`fxquant.formats.int8`.
CPU: ``torch._weight_int8pack_mm`` with bf16 activations at small M, dequantize + dense GEMM at
large M (see :mod:`fxquant.ops._cpu`).  CUDA: the Triton kernel in :mod:`fxquant.kernels.int8wo`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..formats import int8 as fmt
from . import _common, _cpu


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]``."""
    return fmt.dequantize(qweight, scale)


def reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch definition of the op: dequantize, then fp32 ``F.linear``, cast to ``x.dtype``."""
    return _common.reference_linear(x, dequantize_weight(qweight, scale), bias)


@torch.library.custom_op("fxquant::linear_int8wo", mutates_args=())
def linear_int8wo(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x ``[..., K]`` float; qweight int8 ``[N, K]``; scale bf16 ``[N]``; bias ``[N]`` -> ``[..., N]``."""
    return reference(x, qweight, scale, bias)


@linear_int8wo.register_fake
def _(x, qweight, scale, bias=None):
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "x last dim must equal qweight.shape[1]")
    return _common.linear_out(x, qweight.shape[0])


@linear_int8wo.register_kernel("cpu")
def _cpu_impl(x, qweight, scale, bias=None):
    x2 = x.reshape(-1, x.shape[-1])
    # _weight_int8pack_mm segfaults or returns garbage for K % 8 != 0 with M >= 2 (measured on the
    # AVX2 build of torch 2.13: tests/ops/test_weight_only_ops.py covers odd K).
    if _cpu.rows(x) >= _cpu.large_m_threshold() or x.shape[-1] % 8:
        dt = _cpu.dense_dtype()
        y = F.linear(x2.to(dt), qweight.to(dt) * scale.to(dt)[:, None])
    else:
        kd = _cpu.kernel_dtype(x)
        y = torch._weight_int8pack_mm(x2.to(kd).contiguous(), qweight, scale.to(kd))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.contiguous().reshape(*x.shape[:-1], qweight.shape[0])


@linear_int8wo.register_kernel("cuda")
def _cuda_impl(x, qweight, scale, bias=None):
    from ..kernels.int8wo import int8wo_linear

    y = int8wo_linear(x.reshape(-1, x.shape[-1]), qweight, scale, bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


_common.register_weight_only_autograd(linear_int8wo, dequantize_weight, ("qweight", "scale"))
