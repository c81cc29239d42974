"""Triton kernel for ``fxquant::linear_aqlm``: ``y = x @ W.T + bias`` with the AQLM ``W`` (layout in
:mod:`fxquant.formats.aqlm`), read as stored.

Element ``(n, k)`` of ``W`` belongs to out group ``o = n // og`` (row ``r = n % og`` of its block) and in
group ``j = k // ig`` (column ``i = k % ig``); it is ``scales[o] * sum_c codebooks[c, code, r, i]`` with
``code`` the low ``B`` bits of ``codes[o, j, c]``.  Each ``[BLOCK_K, BLOCK_N]`` tile of ``W`` is built in
registers that way: one gather of the code and one of the codeword entry per codebook (``NUM_CODEBOOKS`` is
a compile-time constant, the sum unrolled in codebook order, fp32), times the gathered scale; the tile
enters ``tl.dot`` with fp32 accumulation (fp32 activations: exact fp32 products, as the reference; bf16 /
fp16 on GPU: the tile rounded to the activation dtype).  ``x`` is masked to the true ``K`` (the padded
columns of a partial in group are never read), and only the first ``out_features`` rows are stored.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import aqlm as op
from ._common import bf16_via_fp32, check_launch, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _aqlm_kernel(x_ptr, codes_ptr, cb_ptr, scales_ptr, bias_ptr, y_ptr, M, N, K, G, M_BUCKET,
                 stride_xm, stride_xk, stride_ym, stride_yn,
                 NUM_CODEBOOKS: tl.constexpr, CODEBOOK_SIZE: tl.constexpr, IN_GROUP: tl.constexpr,
                 OUT_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    o = offs_n // OUT_GROUP
    r = offs_n % OUT_GROUP
    scale = tl.load(scales_ptr + o, mask=n_mask, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        j = (offs_k // IN_GROUP).to(tl.int64)
        i = (offs_k % IN_GROUP).to(tl.int64)
        first = (o[None, :] * G + j[:, None]) * NUM_CODEBOOKS  # [BLOCK_K, BLOCK_N]: the block's first code
        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(NUM_CODEBOOKS):
            code = tl.load(codes_ptr + first + c, mask=w_mask, other=0).to(tl.int32) & (CODEBOOK_SIZE - 1)
            entry = ((c * CODEBOOK_SIZE + code.to(tl.int64)) * OUT_GROUP + r[None, :]) * IN_GROUP + i[:, None]
            w += tl.load(cb_ptr + entry, mask=w_mask, other=0.0).to(tl.float32)
        w = tl.where(w_mask, w * scale[None, :], 0.0)
        acc = dot(x, w, acc, DOT_IN_FP32)  # fp32: fp32 activations, or bf16 under the interpreter

    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The sizes follow the usual
# Triton GEMM ranges (16 is tl.dot's minimum tile side): narrow-M tiles with long K steps for decode,
# square-ish tiles for prefill.
_CUDA_CONFIGS = [
    config(16, 64, 64, num_warps=4, num_stages=3),
    config(16, 128, 64, num_warps=4, num_stages=3),
    config(32, 64, 64, num_warps=4, num_stages=3),
    config(64, 64, 32, num_warps=4, num_stages=3),
    config(64, 128, 64, num_warps=8, num_stages=3),
    config(128, 128, 32, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config, so autotune never benchmarks there.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]

_aqlm_tuned = tuned(_aqlm_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                    key=["M_BUCKET", "N", "K", "NUM_CODEBOOKS", "CODEBOOK_SIZE", "IN_GROUP", "OUT_GROUP"])


def aqlm_linear(x2d: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor], *, num_codebooks: int, nbits_per_codebook: int, in_group_size: int,
                out_group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 (``K = in_features``); ``codes`` int8 / int16 ``[O, G, M_c]``;
    ``codebooks`` ``[M_c, 2**B, og, ig]`` and ``scales`` ``[O, 1, 1, 1]`` (fp16 / bf16 / fp32); ``bias``
    ``[N]`` or None -> ``y2d`` ``[M, N]`` in ``x2d.dtype`` (``N = out_features``), accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes, devices or layout parameters do not fit
    (:func:`fxquant.ops.aqlm.check`)."""
    scalars = dict(num_codebooks=num_codebooks, nbits_per_codebook=nbits_per_codebook, in_group_size=in_group_size,
                   out_group_size=out_group_size, out_features=out_features, in_features=in_features)
    check_launch("aqlm_linear", "aqlm", x2d, bias, {"codes": codes, "codebooks": codebooks, "scales": scales},
                 op.check, **scalars)
    m, k = x2d.shape
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, out_features), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or out_features == 0 or k == 0:
        return y.zero_().to(x2d.dtype) if bias is None else (y.zero_() + bias).to(x2d.dtype)
    bias_arg = bias.contiguous() if bias is not None else scales  # unread without bias

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _aqlm_tuned[grid](x2d, codes.contiguous(), codebooks.contiguous(), scales.contiguous(), bias_arg, y,
                      m, out_features, k, codes.shape[1], triton.next_power_of_2(m),
                      x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
                      NUM_CODEBOOKS=num_codebooks, CODEBOOK_SIZE=1 << nbits_per_codebook, IN_GROUP=in_group_size,
                      OUT_GROUP=out_group_size, HAS_BIAS=bias is not None,
                      DOT_IN_FP32=via_fp32 or x2d.dtype == torch.float32)
    return y.to(x2d.dtype)
