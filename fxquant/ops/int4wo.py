"""``fxquant::linear_int4wo``: int4 asymmetric group-wise weight-only linear.

``y = x @ W.T + bias`` with ``W = (q - 8) * scale + zero`` per group; layout (tiled nibbles,
rows padded to 64, ``scales_and_zeros [K/g, Np, 2]`` bf16) in :mod:`fxquant.formats.int4`.
CPU: ``aten._weight_int4pack_mm_for_cpu`` with bf16 activations when the stored tile height equals
this CPU's native one, dequantize + dense GEMM at large M or otherwise.  CUDA: Triton kernel in
:mod:`fxquant.kernels.int4wo`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..formats import int4 as fmt
from . import _common, _cpu


def dequantize_weight(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                      block_n: int, out_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, K]``."""
    return fmt.from_storage(qweight, scales_and_zeros, group_size, block_n, out_features)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
              bias: Optional[torch.Tensor], group_size: int, block_n: int, out_features: int) -> torch.Tensor:
    """Plain-torch definition of the op: dequantize, then fp32 ``F.linear``, cast to ``x.dtype``."""
    w = dequantize_weight(qweight, scales_and_zeros, group_size, block_n, out_features)
    return _common.reference_linear(x, w, bias)


@torch.library.custom_op("fxquant::linear_int4wo", mutates_args=())
def linear_int4wo(x: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
                  bias: Optional[torch.Tensor], group_size: int, block_n: int, out_features: int) -> torch.Tensor:
    """x ``[..., K]``; qweight uint8 ``[Np, K/2]`` tiled by ``block_n``; scales_and_zeros bf16
    ``[K/group_size, Np, 2]``; bias ``[out_features]`` -> ``[..., out_features]``."""
    return reference(x, qweight, scales_and_zeros, bias, group_size, block_n, out_features)


@linear_int4wo.register_fake
def _(x, qweight, scales_and_zeros, bias, group_size, block_n, out_features):
    torch._check(x.shape[-1] == 2 * qweight.shape[1], lambda: "x last dim must equal 2 * qweight.shape[1]")
    return _common.linear_out(x, out_features)


_warned_layout = False


@linear_int4wo.register_kernel("cpu")
def _cpu_impl(x, qweight, scales_and_zeros, bias, group_size, block_n, out_features):
    global _warned_layout
    x2 = x.reshape(-1, x.shape[-1])
    native = block_n == fmt.native_cpu_block_n()
    if not native and not _warned_layout:
        _warned_layout = True
        warnings.warn(f"int4wo weights were packed with block_n={block_n} but this CPU's kernel uses "
                      f"{fmt.native_cpu_block_n()}: using the slower dequantize path. Re-run "
                      "fxquant.compile on this machine for the fast path.", stacklevel=2)
    if native and _cpu.rows(x) < _cpu.large_m_threshold():
        kd = _cpu.kernel_dtype(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(kd).contiguous(), qweight, group_size,
                                                        scales_and_zeros.to(kd))
        y = y[:, :out_features]
    else:
        dt = _cpu.dense_dtype()
        w = dequantize_weight(qweight, scales_and_zeros, group_size, block_n, out_features)
        y = F.linear(x2.to(dt), w.to(dt))
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.contiguous().reshape(*x.shape[:-1], out_features)


@linear_int4wo.register_kernel("cuda")
def _cuda_impl(x, qweight, scales_and_zeros, bias, group_size, block_n, out_features):
    from ..kernels.int4wo import int4wo_linear

    y = int4wo_linear(x.reshape(-1, x.shape[-1]), qweight, scales_and_zeros, bias,
                      group_size=group_size, block_n=block_n, out_features=out_features)
    return y.reshape(*x.shape[:-1], out_features)


_common.register_weight_only_autograd(linear_int4wo, dequantize_weight, ("qweight", "scales_and_zeros"),
                                      ("group_size", "block_n", "out_features"))
