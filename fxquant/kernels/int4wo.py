"""Triton kernel for ``fxquant::linear_int4wo``: ``y = x @ W.T + bias`` with int4 group-wise ``W``.

Layout (:mod:`fxquant.formats.int4`), read as stored, with no repacking: ``qweight`` uint8
``[Np, Kp/2]`` in tiles of ``block_n`` rows, where row ``n``, column ``k`` is the nibble of byte
``((n // block_n) * Kp + k) * (block_n / 2) + (n % block_n) % (block_n / 2)`` (low nibble for the
first half of the tile, high for the second); ``scales_and_zeros`` ``[Kp/g, Np, 2]`` (scale, zero),
``W[n, k] = (q - 8) * scale[k // g, n] + zero[k // g, n]``.  ``Kp`` is K rounded up to whole
groups: the loads of x are masked to its K columns, so the padded columns meet zeros.

Per group ``j`` of ``g`` columns the sum factors as
``sum_k x[m, k] W[n, k] = scale[j, n] * sum_k x[m, k] (q[n, k] - 8) + zero[j, n] * sum_k x[m, k]``,
so the kernel feeds the centred codes ``q - 8`` (exact in bf16/fp16/fp32) to ``tl.dot`` with fp32
accumulation, and applies scale and zero to fp32 per-group partials.  ``BLOCK_K`` divides ``g``,
so each K step lies inside one group.  The result equals :func:`fxquant.ops.int4wo.reference` up
to fp32 summation order.  Only the first ``out_features`` rows are computed and stored.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops import int4wo as op
from ._common import INTERPRETED, check_launch, bf16_via_fp32, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _int4wo_kernel(x_ptr, qw_ptr, sz_ptr, bias_ptr, y_ptr,
                   M, N, NP, K, KP, M_BUCKET,
                   stride_xm, stride_xk, stride_ym, stride_yn,
                   GROUP_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                   HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_load = offs_n < NP  # padded rows exist in storage; only rows < N are stored
    # Tiled nibble addressing of row n: byte (tile * K + k) * HALF + d, nibble `half`.
    HALF: tl.constexpr = TILE_N // 2
    in_tile = offs_n % TILE_N
    byte_n = (offs_n // TILE_N) * KP * HALF + in_tile % HALF  # [BLOCK_N], + k * HALF per column
    shift = (in_tile // HALF).to(tl.int32) * 4                # 0: low nibble, 4: high nibble
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk   # [BLOCK_M, BLOCK_K]
    q_ptrs = qw_ptr + byte_n[None, :] + offs_k[:, None] * HALF                   # [BLOCK_K, BLOCK_N]
    sz_ptrs = sz_ptr + offs_n * 2                                                # group 0, scale

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for grp in range(0, KP // GROUP_SIZE):
        dot_q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # sum_k x * (q - 8) over the group
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)          # sum_k x over the group
        for kk in range(0, GROUP_SIZE, BLOCK_K):  # K steps inside the group; x is 0 past K (padding)
            k_mask = grp * GROUP_SIZE + kk + offs_k < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(q_ptrs, mask=n_load[None, :], other=0).to(tl.int32)
            q = ((b >> shift[None, :]) & 0xF) - 8
            dot_q = dot(x, q, dot_q, DOT_IN_FP32)  # fp32: interpreter only, see _common.bf16_via_fp32
            x_sum += tl.sum(x.to(tl.float32), axis=1)
            x_ptrs += BLOCK_K * stride_xk
            q_ptrs += BLOCK_K * HALF
        scale = tl.load(sz_ptrs, mask=n_load, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptrs + 1, mask=n_load, other=0.0).to(tl.float32)
        acc += dot_q * scale[None, :] + x_sum[:, None] * zero[None, :]
        sz_ptrs += NP * 2

    n_mask = offs_n < N
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The sizes follow
# the usual Triton GEMM ranges (16 is tl.dot's minimum tile side): narrow-M tiles with long K
# steps for decode, square-ish tiles for prefill.  BLOCK_K must divide group_size (>= 32), so
# _prune drops the K steps that do not fit the group.
_CUDA_CONFIGS = [
    config(16, 64, 128, num_warps=4, num_stages=4),
    config(16, 64, 64, num_warps=4, num_stages=4),
    config(16, 128, 64, num_warps=4, num_stages=3),
    config(16, 64, 32, num_warps=2, num_stages=4),
    config(32, 64, 64, num_warps=4, num_stages=4),
    config(64, 128, 64, num_warps=4, num_stages=4),
    config(64, 64, 32, num_warps=4, num_stages=4),
    config(128, 128, 64, num_warps=8, num_stages=3),
    config(128, 128, 32, num_warps=8, num_stages=3),
]
# The CPU interpreter: _prune keeps exactly one of these (the longest K step the group allows),
# so autotune never benchmarks there.
_INTERPRETER_CONFIGS = [config(16, 64, 64, num_warps=1, num_stages=1),
                        config(16, 64, 32, num_warps=1, num_stages=1)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep configs whose K step divides the group and whose M tile is at most one step taller
    than the (bucketed) rows; under the interpreter keep only the first survivor."""
    group_size = {**named_args, **kwargs}["GROUP_SIZE"]
    max_m = max(16, named_args["M_BUCKET"])
    fits = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0]
    kept = [c for c in fits if c.kwargs["BLOCK_M"] <= max_m] or fits
    return kept[:1] if INTERPRETED else kept


_int4wo_tuned = tuned(_int4wo_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                      key=["M_BUCKET", "N", "K", "KP", "GROUP_SIZE"], prune=_prune)


def _check(x2d: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
           bias: Optional[torch.Tensor], group_size: int, block_n: int, out_features: int, in_features: int) -> None:
    check_launch("int4wo_linear", "int4wo", x2d, bias, {"qweight": qweight, "scales_and_zeros": scales_and_zeros},
                 op.check, group_size=group_size, block_n=block_n, out_features=out_features, in_features=in_features)


def int4wo_linear(x2d: torch.Tensor, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
                  bias: Optional[torch.Tensor], *, group_size: int, block_n: int,
                  out_features: int, in_features: int) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 (``K = in_features``); ``qweight`` uint8 ``[Np, Kp/2]`` tiled by
    ``block_n``; ``scales_and_zeros`` bf16 ``[Kp/group_size, Np, 2]``; ``bias`` float ``[out_features]``
    or None -> ``y2d`` ``[M, out_features]`` in ``x2d.dtype``, accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes, devices or layout parameters do not fit
    (:func:`fxquant.ops.int4wo.check`).
    """
    _check(x2d, qweight, scales_and_zeros, bias, group_size, block_n, out_features, in_features)
    m, k = x2d.shape
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, out_features), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or out_features == 0:
        return y.to(x2d.dtype)
    qweight = qweight.contiguous()
    scales_and_zeros = scales_and_zeros.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scales_and_zeros  # unread without bias

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _int4wo_tuned[grid](x2d, qweight, scales_and_zeros, bias_arg, y,
                        m, out_features, qweight.shape[0], k, 2 * qweight.shape[1], triton.next_power_of_2(m),
                        x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
                        GROUP_SIZE=group_size, TILE_N=block_n,
                        HAS_BIAS=bias is not None, DOT_IN_FP32=via_fp32)
    return y.to(x2d.dtype)
