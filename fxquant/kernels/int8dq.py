"""Triton kernels for ``fxquant::linear_int8dq`` and ``fxquant::linear_llm_int8``.

Three steps, each a private ``@triton.jit`` kernel, all following :mod:`fxquant.formats.int8dq`
rounding for rounding:

1. (LLM.int8 only) ``_outlier_cols_kernel``: ``cols[k] = any_m |x[m, k]| >= threshold``.
2. ``_act_quant_kernel``, a few rows per program: ``absmax`` (skipping outlier elements), then
   ``sx = max(absmax / 127, FLT_MIN)`` and ``qx = clamp(rint(x / sx), -127, 127)`` with IEEE
   round-to-nearest divisions (``div_rn``) and ties-to-even rounding, so codes and scales equal
   :func:`fxquant.formats.int8dq.quantize_activations` bit for bit; codes in outlier columns are 0.
3. ``_int8dq_gemm_kernel``: ``acc = tl.dot(qx, qweight.T)`` on int8 tiles with int32 accumulation
   (exact), and for LLM.int8 ``facc = tl.dot(where(cols, x, 0), qweight.T)`` in fp32 on the K tiles
   that hold an outlier column (tiles without one are skipped; the masks keep every shape static).
   Epilogue: ``y = acc * sx * scale + facc * scale + bias``, since
   ``x_out @ (qweight * scale).T = scale * (x_out @ qweight.T)`` per output channel.

The result equals the op references up to fp32 rounding of the epilogue and the fp32 summation
order of the outlier part.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import int8dq as fmt
from ..ops import int8dq as op
from ._common import INTERPRETED, check_launch, bf16_via_fp32, config, grouped_tile, store_tile, tuned
_FLT_MIN = torch.finfo(torch.float32).tiny


@triton.jit
def _outlier_cols_kernel(x_ptr, cols_ptr, M, K, stride_xm, stride_xk, threshold,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    hit = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        hit = tl.maximum(hit, tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0))
    tl.store(cols_ptr + offs_k, hit.to(tl.int8), mask=k_mask)


@triton.jit
def _round_half_even(v):
    # Exact for |v| < 2^23: truncate, then look at the (exactly computed) fraction.
    t = v.to(tl.int32)
    f = v - t.to(tl.float32)
    odd = (t % 2) != 0
    return t + ((f > 0.5) | ((f == 0.5) & odd)).to(tl.int32) - ((f < -0.5) | ((f == -0.5) & odd)).to(tl.int32)


@triton.jit
def _act_quant_kernel(x_ptr, cols_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, threshold, flt_min,
                      QMAX: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        a = tl.abs(tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32))
        if HAS_THRESHOLD:  # bitsandbytes: outlier elements do not count towards the row scale
            a = tl.where(a >= threshold, 0.0, a)
        amax = tl.maximum(amax, a)
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), QMAX * 1.0), flt_min)  # [BLOCK_M]
    tl.store(s_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale[:, None])), -QMAX), QMAX)
        if HAS_THRESHOLD:
            q = tl.where((tl.load(cols_ptr + offs_k, mask=k_mask, other=0) != 0)[None, :], 0, q)
        tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _int8dq_gemm_kernel(qx_ptr, sx_ptr, qw_ptr, sw_ptr, bias_ptr, x_ptr, cols_ptr, y_ptr,
                        M, N, K, M_BUCKET,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                        HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    qx_ptrs = qx_ptr + offs_m[:, None] * K + offs_k[None, :]                     # [BLOCK_M, BLOCK_K]
    qw_ptrs = qw_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    facc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(qx_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(qw_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc)  # int8 x int8 -> int32: exact
        if HAS_OUTLIERS:
            cols = tl.load(cols_ptr + k0 + offs_k, mask=k_mask, other=0) != 0
            if tl.max(cols.to(tl.int32), axis=0) > 0:  # most K tiles hold no outlier column
                x = tl.load(x_ptrs, mask=m_mask[:, None] & (k_mask & cols)[None, :], other=0.0)
                # "ieee": exact fp32 products as in the reference (tf32 keeps ~10 mantissa bits)
                facc = tl.dot(x.to(tl.float32), b.to(tl.float32), facc, input_precision="ieee")
        qx_ptrs += BLOCK_K
        qw_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk

    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_OUTLIERS:
        y += facc * sw[None, :]
    store_tile(y, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  int8 tensor-core
# dots need K tiles of >= 32; the sizes otherwise follow the usual Triton int8 GEMM ranges
# (narrow-M tiles with long K steps for decode, square-ish tiles for prefill).
_CUDA_CONFIGS = [
    config(16, 64, 128, num_warps=4, num_stages=4),
    config(16, 128, 128, num_warps=4, num_stages=3),
    config(32, 64, 128, num_warps=4, num_stages=4),
    config(64, 64, 128, num_warps=4, num_stages=4),
    config(64, 128, 128, num_warps=4, num_stages=3),
    config(128, 128, 64, num_warps=8, num_stages=3),
    config(128, 256, 64, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config (autotune then never benchmarks), smallest legal tiles.
_INTERPRETER_CONFIGS = [config(16, 64, 64, num_warps=1, num_stages=1)]
# (rows, columns) per step of the quantize kernel: GPU programs take a few rows in long chunks.
_QUANT_BLOCK = (16, 128) if INTERPRETED else (4, 1024)
_COLS_BLOCK = (16, 32) if INTERPRETED else (32, 128)  # (rows, columns) per step of the mask kernel


_int8dq_gemm_tuned = tuned(_int8dq_gemm_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                           key=["M_BUCKET", "N", "K", "HAS_OUTLIERS"])


def _check(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
           threshold: Optional[float]) -> None:
    tensors = {"qweight": qweight, "scale": scale}
    if threshold is None:
        check_launch("int8dq_linear", "int8dq", x2d, bias, tensors, op.check_int8dq)
    else:
        check_launch("int8dq_linear", "int8dq", x2d, bias, tensors, op.check_llm_int8, threshold=threshold)


def quantize_activations(x2d: torch.Tensor, threshold: Optional[float] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Steps 1-2: ``x2d`` ``[M, K]`` -> (codes int8 ``[M, K]``, scale fp32 ``[M]``, outlier column
    mask int8 ``[K]`` or ``None`` without ``threshold``), as :mod:`fxquant.formats.int8dq` defines."""
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    s = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    cols = None
    if threshold is not None:
        cols = torch.empty((k,), dtype=torch.int8, device=x2d.device)
        bm, bk = _COLS_BLOCK
        if k:
            _outlier_cols_kernel[(triton.cdiv(k, bk),)](x2d, cols, m, k, x2d.stride(0), x2d.stride(1),
                                                        float(threshold), BLOCK_M=bm, BLOCK_K=bk)
    if m:
        bm, bk = _QUANT_BLOCK
        _act_quant_kernel[(triton.cdiv(m, bm),)](x2d, cols if cols is not None else q, q, s, m, k,
                                                 x2d.stride(0), x2d.stride(1), float(threshold or 0.0), _FLT_MIN,
                                                 QMAX=fmt.QMAX, HAS_THRESHOLD=threshold is not None,
                                                 BLOCK_M=bm, BLOCK_K=bk)
    return q, s, cols


def int8dq_linear(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, threshold: Optional[float] = None) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16; ``qweight`` int8 ``[N, K]``; ``scale`` float ``[N]``;
    ``bias`` float ``[N]`` or None; ``threshold`` None (``int8dq``) or > 0 (``llm.int8``)
    -> ``y2d`` ``[M, N]`` in ``x2d.dtype``.

    Raises ValueError naming the argument when shapes, dtypes or devices do not fit.
    """
    _check(x2d, qweight, scale, bias, threshold)
    m, k = x2d.shape
    n = qweight.shape[0]
    # The interpreter mishandles bf16 stores (truncation, see _common.bf16_via_fp32): write
    # fp32 and round with torch.  Compiled GPU runs store bf16 directly.
    out_dtype = torch.float32 if bf16_via_fp32(x2d.dtype) else x2d.dtype
    y = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    if m == 0 or n == 0:
        return y.to(x2d.dtype)
    qx, sx, cols = quantize_activations(x2d, threshold)
    scale = scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8dq_gemm_tuned[grid](qx, sx, qweight, scale, bias_arg, x2d, cols if cols is not None else qx, y,
                             m, n, k, triton.next_power_of_2(m),
                             x2d.stride(0), x2d.stride(1), qweight.stride(0), qweight.stride(1),
                             y.stride(0), y.stride(1),
                             HAS_BIAS=bias is not None, HAS_OUTLIERS=cols is not None)
    return y.to(x2d.dtype)
