"""Triton kernel for ``fxquant::linear_int8wo``: ``y = x @ (qweight * scale[:, None]).T + bias``.

Layout (:mod:`fxquant.formats.int8`): ``qweight`` int8 ``[N, K]`` row-major, ``scale`` ``[N]``
(bf16 as stored).  Because the scale is per output channel it factors out of the K sum:
``y[m, n] = scale[n] * sum_k x[m, k] * qweight[n, k] + bias[n]``.  The kernel therefore feeds the
integer codes, cast exactly to ``x``'s dtype (|q| <= 127 fits bf16/fp16/fp32), to ``tl.dot`` with
fp32 accumulation and applies scale and bias to the fp32 tile once, after the K loop.  The result
equals :func:`fxquant.ops.int8wo.reference` up to fp32 summation order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import int8wo as op
from ._common import check_launch, bf16_via_fp32, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _int8wo_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
                   M, N, K, M_BUCKET,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 row offsets: N * K and M * N overflow int32 for large vocab projections.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk   # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk   # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = dot(x, q, acc, DOT_IN_FP32)  # fp32: interpreter only, see _common.bf16_via_fp32
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The sizes follow
# the usual Triton GEMM ranges (16 is tl.dot's minimum tile side): narrow-M tiles with long K
# steps for decode (M <= 16 streams the weight once), square-ish tiles for prefill.
_CUDA_CONFIGS = [
    config(16, 64, 128, num_warps=4, num_stages=4),
    config(16, 128, 128, num_warps=4, num_stages=3),
    config(32, 64, 128, num_warps=4, num_stages=4),
    config(64, 64, 64, num_warps=4, num_stages=4),
    config(64, 128, 64, num_warps=4, num_stages=4),
    config(128, 128, 64, num_warps=8, num_stages=3),
    config(128, 256, 64, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config (autotune then never benchmarks), smallest legal tiles.
_INTERPRETER_CONFIGS = [config(16, 64, 64, num_warps=1, num_stages=1)]


_int8wo_tuned = tuned(_int8wo_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                      key=["M_BUCKET", "N", "K"])


def _check(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    check_launch("int8wo_linear", "int8wo", x2d, bias, {"qweight": qweight, "scale": scale}, op.check)


def int8wo_linear(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16; ``qweight`` int8 ``[N, K]``; ``scale`` float ``[N]``;
    ``bias`` float ``[N]`` or None -> ``y2d`` ``[M, N]`` in ``x2d.dtype``, accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes or devices do not fit.
    """
    _check(x2d, qweight, scale, bias)
    m, k = x2d.shape
    n = qweight.shape[0]
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, n), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or n == 0:
        return y.to(x2d.dtype)
    scale = scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8wo_tuned[grid](x2d, qweight, scale, bias_arg, y,
                        m, n, k, triton.next_power_of_2(m),
                        x2d.stride(0), x2d.stride(1), qweight.stride(0), qweight.stride(1),
                        y.stride(0), y.stride(1),
                        HAS_BIAS=bias is not None, DOT_IN_FP32=via_fp32)
    return y.to(x2d.dtype)
