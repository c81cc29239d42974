"""Triton kernel for ``fxquant::linear_onebit``: ``y = ((x ⊙ b) · Sᵀ) ⊙ a + bias``.

Layout (:mod:`fxquant.formats.onebit`), read as stored: ``sign_bits`` uint8 ``[N, C]``,
``C = ceil(K / 8)``; ``S[n, k]`` is bit ``k % 8`` (LSB first) of byte ``(n, k // 8)``, 1 = +1 and
0 = -1; ``a`` ``[N]``, ``b`` ``[K]``.

Per K step the kernel loads the ``[BLOCK_K, BLOCK_N]`` bytes holding the tile's bits (each byte is
addressed by the 8 columns it covers; the repeats hit L1), shifts and masks them into ±1 in the
activation dtype (exact), scales the ``[BLOCK_M, BLOCK_K]`` activation tile by ``b`` in fp32 and
rounds it once to the activation dtype, then ``tl.dot`` accumulates in fp32.  ``a`` and ``bias``
are applied to the fp32 tile after the K loop, as the reference applies them after the product.
Columns past ``K`` are masked (``x = 0``), so the padding bits of the last byte never count.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import onebit as op
from ._common import check_launch, bf16_via_fp32, config, grouped_tile, store_tile, tuned


@triton.jit
def _onebit_kernel(x_ptr, bits_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
                   M, N, K, C, M_BUCKET,
                   stride_xm, stride_xk, stride_ym, stride_yn,
                   HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk   # [BLOCK_M, BLOCK_K]
    row_ptrs = bits_ptr + offs_n[None, :] * C                                    # [1, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bk = tl.load(b_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
        if DOT_IN_FP32:  # interpreter only: see _common.bf16_via_fp32
            xb = x.to(tl.float32) * bk[None, :]
        else:
            xb = (x.to(tl.float32) * bk[None, :]).to(x.dtype)
        byte = tl.load(row_ptrs + (ks // 8)[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        bit = (byte.to(tl.int32) >> (ks % 8)[:, None]) & 1                        # [BLOCK_K, BLOCK_N]
        signs = (2 * bit - 1).to(xb.dtype)
        # "ieee": fp32 operands use exact fp32 products as the reference does (tf32 would keep
        # ~10 mantissa bits); 16-bit operands are unaffected.
        acc = tl.dot(xb, signs, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk

    acc = acc * tl.load(a_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The sizes follow
# the usual Triton GEMM ranges (16 is tl.dot's minimum tile side): narrow-M tiles with long K steps
# for decode (the weight tile is 1/8 of an int8 one, so decode is bound by unpacking, not bytes),
# square-ish tiles for prefill.  Every BLOCK_K is a multiple of 8: a K step covers whole bytes.
_CUDA_CONFIGS = [
    config(16, 64, 128, num_warps=4, num_stages=4),
    config(16, 128, 128, num_warps=4, num_stages=3),
    config(16, 64, 256, num_warps=4, num_stages=3),
    config(32, 64, 128, num_warps=4, num_stages=4),
    config(64, 64, 64, num_warps=4, num_stages=4),
    config(64, 128, 64, num_warps=4, num_stages=4),
    config(128, 128, 64, num_warps=8, num_stages=3),
    config(128, 256, 64, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config (autotune then never benchmarks), smallest legal tiles.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]


_onebit_tuned = tuned(_onebit_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                      key=["M_BUCKET", "N", "K"])


def _check(x2d: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
           bias: Optional[torch.Tensor]) -> None:
    check_launch("onebit_linear", "onebit", x2d, bias, {"sign_bits": sign_bits, "a": a, "b": b}, op.check)


def onebit_linear(x2d: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16; ``sign_bits`` uint8 ``[N, ceil(K/8)]``; ``a`` float ``[N]``;
    ``b`` float ``[K]``; ``bias`` float ``[N]`` or None -> ``y2d`` ``[M, N]`` in ``x2d.dtype``,
    accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes or devices do not fit.
    """
    _check(x2d, sign_bits, a, b, bias)
    m, k = x2d.shape
    n = sign_bits.shape[0]
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, n), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or n == 0:
        return y.to(x2d.dtype)
    sign_bits, a, b = sign_bits.contiguous(), a.contiguous(), b.contiguous()
    bias_arg = bias.contiguous() if bias is not None else a  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _onebit_tuned[grid](x2d, sign_bits, a, b, bias_arg, y,
                        m, n, k, sign_bits.shape[1], triton.next_power_of_2(m),
                        x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
                        HAS_BIAS=bias is not None, DOT_IN_FP32=via_fp32)
    return y.to(x2d.dtype)
