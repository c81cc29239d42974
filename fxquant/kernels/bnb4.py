"""Triton kernel for ``fxquant::linear_bnb4`` / ``linear_bnb4_dq``: ``y = x @ W.T + bias`` with
bitsandbytes NF4 / FP4 ``W`` (layout in :mod:`fxquant.formats.bnb4`), read as stored.

Element ``(n, k)`` of ``W`` is flat element ``e = n * K + k``: its code is the high nibble of byte
``e // 2`` when ``e`` is even, else the low nibble; its block is ``e // blocksize`` (blocks may
straddle rows, so nothing is assumed about ``K``).  Each ``[BLOCK_K, BLOCK_N]`` tile of ``W`` is
decoded in registers: ``code_table[q]`` (a gather from the 16-entry table) times the block's absmax,
which with double quantization is itself decoded in-kernel as
``absmax_code[absmax_q[b]] * absmax_scale[b // absmax_blocksize] + absmax_offset``.  The fp32
tile enters ``tl.dot`` with fp32 accumulation: exact fp32 products for fp32 activations (as the
reference), the activation's dtype for bf16/fp16 on GPU (``W`` rounded to it, as bitsandbytes'
``compute_dtype`` does).  Only the first ``out_features`` rows are computed and stored.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import bnb4 as fmt
from ..ops import bnb4 as op
from ._common import check_launch, bf16_via_fp32, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _bnb4_kernel(x_ptr, codes_ptr, absmax_ptr, aq_ptr, acode_ptr, ascale_ptr, aoff_ptr, table_ptr,
                 bias_ptr, y_ptr, M, N, K, M_BUCKET,
                 stride_xm, stride_xk, stride_ym, stride_yn,
                 BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if DOUBLE_QUANT:
        offset = tl.load(aoff_ptr).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        e = offs_n[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N] flat element index
        byte = tl.load(codes_ptr + e // 2, mask=w_mask, other=0).to(tl.int32)
        q = (byte >> ((1 - e % 2) * 4).to(tl.int32)) & 0xF  # even e: high nibble
        value = tl.load(table_ptr + q)
        blk = e // BLOCKSIZE
        if DOUBLE_QUANT:
            aq = tl.load(aq_ptr + blk, mask=w_mask, other=0).to(tl.int32)
            scale = tl.load(ascale_ptr + blk // ABSMAX_BLOCKSIZE, mask=w_mask, other=0.0)
            absmax = tl.load(acode_ptr + aq) * scale + offset
        else:
            absmax = tl.load(absmax_ptr + blk, mask=w_mask, other=0.0)
        w = tl.where(w_mask, value * absmax, 0.0)
        acc = dot(x, w, acc, DOT_IN_FP32)  # fp32: fp32 activations, or bf16 under the interpreter

    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The sizes follow
# the usual Triton GEMM ranges (16 is tl.dot's minimum tile side): narrow-M tiles with long K
# steps for decode, square-ish tiles for prefill.
_CUDA_CONFIGS = [
    config(16, 64, 128, num_warps=4, num_stages=4),
    config(16, 64, 64, num_warps=4, num_stages=4),
    config(16, 128, 64, num_warps=4, num_stages=3),
    config(32, 64, 64, num_warps=4, num_stages=4),
    config(64, 128, 64, num_warps=4, num_stages=4),
    config(64, 64, 32, num_warps=4, num_stages=4),
    config(128, 128, 64, num_warps=8, num_stages=3),
    config(128, 128, 32, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config, so autotune never benchmarks there.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]


_bnb4_tuned = tuned(_bnb4_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                    key=["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"])


def _launch(x2d, codes, absmax, aq, acode, ascale, aoff, code_table, bias, blocksize, absmax_blocksize,
            out_features) -> torch.Tensor:
    m, k = x2d.shape
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, out_features), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or out_features == 0 or k == 0:
        return y.zero_().to(x2d.dtype) if bias is None else (y.zero_() + bias).to(x2d.dtype)
    table = code_table.float().contiguous()
    dq = aq is not None
    absmax = absmax.float().contiguous() if not dq else table  # unread placeholders keep one signature
    aq, acode, ascale, aoff = ((aq.contiguous(), acode.float().contiguous(), ascale.float().contiguous(),
                                aoff.float().reshape(1)) if dq else (table, table, table, table))
    bias_arg = bias.contiguous() if bias is not None else table  # unread without bias

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _bnb4_tuned[grid](x2d, codes.contiguous(), absmax, aq, acode, ascale, aoff, table, bias_arg, y,
                      m, out_features, k, triton.next_power_of_2(m),
                      x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
                      BLOCKSIZE=blocksize, ABSMAX_BLOCKSIZE=absmax_blocksize, DOUBLE_QUANT=dq,
                      HAS_BIAS=bias is not None, DOT_IN_FP32=via_fp32 or x2d.dtype == torch.float32)
    return y.to(x2d.dtype)


def bnb4_linear(x2d: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code_table: torch.Tensor,
                bias: Optional[torch.Tensor], *, blocksize: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 (``K = in_features``); ``codes`` uint8 ``[ceil(N*K/2)]``;
    ``absmax`` fp32 ``[ceil(N*K/blocksize)]``; ``code_table`` fp32 ``[16]``; ``bias`` ``[N]`` or None ->
    ``y2d`` ``[M, N]`` in ``x2d.dtype`` (``N = out_features``), accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes, devices or layout parameters do not fit
    (:func:`fxquant.ops.bnb4.check`).
    """
    check_launch("bnb4_linear", "bnb4", x2d, bias, {"codes": codes, "absmax": absmax, "code_table": code_table},
                 op.check, blocksize=blocksize, out_features=out_features, in_features=in_features)
    return _launch(x2d, codes, absmax, None, None, None, None, code_table, bias, blocksize,
                   fmt.NESTED_BLOCKSIZE, out_features)


def bnb4_linear_dq(x2d: torch.Tensor, codes: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
                   absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code_table: torch.Tensor,
                   bias: Optional[torch.Tensor], *, blocksize: int, absmax_blocksize: int,
                   out_features: int, in_features: int) -> torch.Tensor:
    """As :func:`bnb4_linear` with the double-quantized absmax: ``absmax_q`` uint8 ``[nblocks]``,
    ``absmax_code`` fp32 ``[256]``, ``absmax_scale`` fp32 ``[ceil(nblocks / absmax_blocksize)]``,
    ``absmax_offset`` fp32 with one element (:func:`fxquant.ops.bnb4.check_dq`)."""
    tensors = {"codes": codes, "absmax_q": absmax_q, "absmax_code": absmax_code, "absmax_scale": absmax_scale,
               "absmax_offset": absmax_offset, "code_table": code_table}
    check_launch("bnb4_linear_dq", "bnb4", x2d, bias, tensors, op.check_dq, blocksize=blocksize,
                 absmax_blocksize=absmax_blocksize, out_features=out_features, in_features=in_features)
    return _launch(x2d, codes, None, absmax_q, absmax_code, absmax_scale, absmax_offset, code_table, bias,
                   blocksize, absmax_blocksize, out_features)
