"""Triton kernels for ``fxquant::linear_float8wo`` and ``fxquant::linear_float8dq``.

Layout (:mod:`fxquant.formats.float8`): ``qweight`` float8 ``[N, K]`` row-major, ``scale`` fp32
``[N]`` (per row) or ``[1]`` (per tensor).  The weight scale is per output channel (or global),
so it factors out of the K sum and is applied to the fp32 tile once, after the K loop.

- ``float8wo``: the float8 codes are converted (exactly) to ``x``'s dtype inside the K loop and
  fed to ``tl.dot`` with fp32 accumulation: ``y = (x @ decode(q).T) * scale + bias``.
- ``float8dq``: the launcher quantizes the activation with :func:`fxquant.formats.float8.quantize_activation`
  (the format's own math, as fbgemm's separate ``quantize_fp8_row`` kernel) and the kernel
  multiplies float8 by float8: ``y = (xq @ q.T) * x_scale[:, None] * scale[None, :] + bias``.
  ``tl.dot`` takes float8 operands natively on sm89+ (and the CPU interpreter: exact there);
  on older GPUs (``DOT_FP8=False``) both tiles go through fp16, which holds every e4m3 value.

Both equal their op's reference up to fp32 summation order.

What the CPU interpreter can and cannot run (Triton 3.9, measured): float8 -> fp32 conversion
and float8 ``tl.dot`` are exact; fp32 -> float8 conversion is not (a rounding carry does not reach
the exponent: 7.8 -> 4.0 instead of 8.0), which is one more reason the activation is quantized
by torch in the launcher rather than in the kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import float8 as fmt
from ..ops import float8 as op
from ._common import check_launch, bf16_via_fp32, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _float8_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr,
                   M, N, K, M_BUCKET,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                   X_FP8: tl.constexpr, X_ROW_SCALE: tl.constexpr, W_ROW_SCALE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, DOT_FP8: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """``X_FP8``: x is float8 codes with scales at ``xs_ptr`` (float8dq); else float (float8wo)."""
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

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
        q = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if X_FP8:
            if DOT_FP8:
                acc = tl.dot(x, q, acc)
            else:  # fp16 holds every e4m3 value exactly; products are exact in the fp32 accumulator
                acc = tl.dot(x.to(tl.float16), q.to(tl.float16), acc)
        else:
            # float8 -> x's dtype is exact (fp32, bf16 and fp16 hold every e4m3 / e5m2 value); fp32
            # with DOT_IN_FP32: interpreter only, see _common.bf16_via_fp32
            acc = dot(x, q, acc, DOT_IN_FP32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if W_ROW_SCALE:
        acc = acc * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    else:
        acc = acc * tl.load(ws_ptr)
    if X_FP8:
        if X_ROW_SCALE:
            acc = acc * tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
        else:
            acc = acc * tl.load(xs_ptr)
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The usual Triton
# GEMM ranges; float8 tiles are half the bytes of bf16 ones, so K steps go to 128 (fp8 tl.dot
# needs K tiles >= 32).
_CUDA_CONFIGS = [
    config(16, 64, 128, num_warps=4, num_stages=4),
    config(16, 128, 128, num_warps=4, num_stages=3),
    config(32, 64, 128, num_warps=4, num_stages=4),
    config(64, 64, 128, num_warps=4, num_stages=4),
    config(64, 128, 64, num_warps=4, num_stages=4),
    config(128, 128, 64, num_warps=8, num_stages=3),
    config(128, 256, 64, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config (autotune then never benchmarks), smallest legal tiles.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]


_float8_tuned = tuned(_float8_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                      key=["M_BUCKET", "N", "K", "X_FP8"])


def fp8_dot_supported(device: torch.device) -> bool:
    """``tl.dot`` on float8 operands: sm89+ GPUs (Ada, Hopper, Blackwell) and the interpreter."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _check(name: str, x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
           bias: Optional[torch.Tensor], **dq_scalars) -> None:
    """``dq_scalars`` (granularity, activation_scale_ub): float8dq's check, else float8wo's."""
    check_launch(name, "float8", x2d, bias, {"qweight": qweight, "scale": scale},
                 op.check_dq if dq_scalars else op.check_wo, **dq_scalars)


def _launch(x, xs, qweight, scale, bias, out_dtype, *, x_fp8: bool, x_row_scale: bool,
            dot_fp8: bool) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    via_fp32 = bf16_via_fp32(out_dtype)
    y = torch.empty((m, n), dtype=torch.float32 if via_fp32 else out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y.to(out_dtype)
    scale = scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _float8_tuned[grid](x, qweight, xs, scale, bias_arg, y,
                        m, n, k, triton.next_power_of_2(m),
                        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), y.stride(0), y.stride(1),
                        X_FP8=x_fp8, X_ROW_SCALE=x_row_scale, W_ROW_SCALE=scale.numel() == n and n != 1,
                        HAS_BIAS=bias is not None, DOT_FP8=dot_fp8, DOT_IN_FP32=via_fp32)
    return y.to(out_dtype)


def float8wo_linear(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16; ``qweight`` float8_e4m3fn/e5m2 ``[N, K]``; ``scale`` fp32
    ``[N]`` or ``[1]``; ``bias`` float ``[N]`` or None -> ``[M, N]`` in ``x2d.dtype`` (fp32 accumulation).

    Raises ValueError naming the argument when shapes, dtypes or devices do not fit."""
    _check("float8wo_linear", x2d, qweight, scale, bias)
    return _launch(x2d, scale, qweight, scale, bias, x2d.dtype, x_fp8=False, x_row_scale=False, dot_fp8=False)


def float8dq_linear(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, granularity: str,
                    activation_scale_ub: float, dot_fp8: bool | None = None) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16, quantized here to ``qweight``'s float8 dtype per tensor or
    per row (amax clamped to ``activation_scale_ub``); ``qweight`` float8_e4m3fn ``[N, K]``; ``scale``
    fp32 ``[N]`` (``granularity="row"``) or ``[1]`` (``"tensor"``) -> ``[M, N]`` in ``x2d.dtype``.
    ``dot_fp8``: float8 ``tl.dot`` (default: when the device has it) or fp16 ``tl.dot``.

    Raises ValueError naming the argument when shapes, dtypes, devices or options do not fit."""
    _check("float8dq_linear", x2d, qweight, scale, bias, granularity=granularity,
           activation_scale_ub=activation_scale_ub)
    xq, xs = fmt.quantize_activation(x2d, qweight.dtype, granularity, activation_scale_ub)
    dot = fp8_dot_supported(x2d.device) if dot_fp8 is None else dot_fp8
    return _launch(xq, xs.reshape(-1).contiguous(), qweight, scale, bias, x2d.dtype, x_fp8=True,
                   x_row_scale=granularity == "row", dot_fp8=dot)
