"""Triton kernel for ``fxquant::linear_intx``: ``y = x @ W.T + bias`` with b-bit group-wise ``W``.

Layout (:mod:`fxquant.formats.intx`), read as stored: the codes of the ``Np x Kp`` padded weight in
the int4 tile order (tile height ``TILE_N``), seen as nibble-pair bytes: row ``n``, column ``k`` is
nibble ``(n % TILE_N) // (TILE_N/2)`` of pair ``j = ((n // TILE_N) * Kp + k) * (TILE_N/2) + n % (TILE_N/2)``
(``Kp``: K rounded up to whole groups on axis 1; the loads are masked to the K real columns).
The low plane (``min(BITS, 4)`` bits) and the high plane (``BITS - 4`` bits) are stored as folded
shards of 4, 2 or 1 bits: in a ``W``-bit shard whose chunks are ``C`` bytes, pair ``j`` is byte
``j % C``, bits ``W * (j // C)`` of each nibble; a 3-bit plane is a 2-bit shard then a 1-bit one.

``W[n, k] = q * scale + (offset - 2**(BITS-1) * scale)`` with the group's ``scale``/``offset`` at
``[k // GROUP_SIZE, n]`` (``AXIS`` 1, params ``[Kp/g, N]``) or ``[n % R, k]`` (``AXIS`` 0,
params ``[R, K]``, ``R = ceil(N/g)``), as the reference dequantizes.  Each ``[BLOCK_K, BLOCK_N]`` tile is unpacked;
then, when ``BLOCK_K`` divides the group (axis 1), the centred codes ``q - 2**(BITS-1)`` (exact in
any float dtype) go to ``tl.dot`` and scale / offset are applied to the fp32 per-group partial, as
in the int4wo kernel; otherwise (axis 0, or groups that do not tile ``BLOCK_K``) the tile is
dequantized in fp32 with per-element params, cast to the activation dtype and fed to ``tl.dot``.
Both accumulate in fp32.  The result equals :func:`fxquant.ops.intx.reference` up to fp32
summation order, plus, on the second path with 16-bit activations, the rounding of the
dequantized tile to that dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import int4
from ..formats import intx as fmt
from ..ops import intx as op
from ._common import check_launch, bf16_via_fp32, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _shard(ptr, j, nib_shift, W: tl.constexpr, chunk, valid):
    """W-bit values of nibble-pair byte ``j`` (nibble at bit ``nib_shift``) in a folded shard whose
    chunks are ``chunk`` bytes: chunk ``j // chunk`` sits at bit ``W * (j // chunk)`` of each nibble."""
    ci = j // chunk
    b = tl.load(ptr + (j - ci * chunk), mask=valid, other=0).to(tl.int32)
    return (b >> (nib_shift + W * ci).to(tl.int32)) & ((1 << W) - 1)


@triton.jit
def _plane(ptr, j, nib_shift, P: tl.constexpr, half_len, valid):
    """Values of a P-bit plane (shards 4 | 2 + 1 | 2 | 1) of ``2 * half_len`` codes."""
    if P == 4:
        v = _shard(ptr, j, nib_shift, 4, half_len, valid)
    elif P == 3:
        v = _shard(ptr, j, nib_shift, 2, half_len // 2, valid)
        v = v | (_shard(ptr + half_len // 2, j, nib_shift, 1, half_len // 4, valid) << 2)
    elif P == 2:
        v = _shard(ptr, j, nib_shift, 2, half_len // 2, valid)
    else:
        v = _shard(ptr, j, nib_shift, 1, half_len // 4, valid)
    return v


@triton.jit
def _intx_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, o_ptr, bias_ptr, y_ptr,
                 M, N, NP, K, KP, M_BUCKET, ROWS_PER_STRIDE,
                 stride_xm, stride_xk, stride_ym, stride_yn,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, AXIS: tl.constexpr, TILE_N: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    HALF: tl.constexpr = TILE_N // 2
    in_tile = offs_n % TILE_N
    byte_n = (offs_n // TILE_N) * KP * HALF + in_tile % HALF  # nibble-pair byte, + k * HALF per column
    nib_shift = ((in_tile // HALF) * 4).to(tl.int32)        # 0: low nibble, 4: high nibble
    half_len = NP * KP // 2                                  # nibble-pair bytes of one plane
    if AXIS == 1:
        param_n = offs_n                          # + (k // GROUP_SIZE) * N
    else:
        param_n = (offs_n % ROWS_PER_STRIDE) * KP  # + k (KP == K on axis 0)
    LO_BITS: tl.constexpr = 4 if BITS > 4 else BITS
    FACTORED: tl.constexpr = AXIS == 1 and GROUP_SIZE % BLOCK_K == 0
    MID: tl.constexpr = 1 << (BITS - 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        valid = k_mask[:, None] & n_mask[None, :]                       # [BLOCK_K, BLOCK_N]
        j = byte_n[None, :] + offs_k[:, None] * HALF
        q = _plane(lo_ptr, j, nib_shift[None, :], LO_BITS, half_len, valid)
        if BITS > 4:
            q = q | (_plane(hi_ptr, j, nib_shift[None, :], BITS - 4, half_len, valid) << 4)
        # the dots in fp32 with DOT_IN_FP32: interpreter only, see _common.bf16_via_fp32
        if FACTORED:
            # The K step lies in one group: sum_k x (c s + o) = s * sum_k x c + o * sum_k x, with the
            # centred codes c = q - MID (|c| <= 128: exact in every x dtype) fed to the dot.
            p_idx = param_n + (k0 // GROUP_SIZE) * N
            scale = tl.load(s_ptr + p_idx, mask=n_mask, other=0.0).to(tl.float32)
            part = dot(x, q - MID, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_IN_FP32) * scale[None, :]
            if HAS_OFFSET:
                x_sum = tl.sum(x.to(tl.float32), axis=1)
                part += x_sum[:, None] * tl.load(o_ptr + p_idx, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            acc += part
        else:
            if AXIS == 1:
                p_idx = param_n[None, :] + (offs_k[:, None] // GROUP_SIZE) * N
            else:
                p_idx = param_n[None, :] + offs_k[:, None]
            scale = tl.load(s_ptr + p_idx, mask=valid, other=0.0).to(tl.float32)
            base = -MID * scale
            if HAS_OFFSET:
                base += tl.load(o_ptr + p_idx, mask=valid, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * scale + base  # rounded to x's dtype below (16-bit x on a GPU)
            acc = dot(x, w, acc, DOT_IN_FP32)

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
# The CPU interpreter: one config, so autotune never benchmarks there.  Small tiles keep the
# numpy-backed interpreter fast on the test shapes.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]


_intx_tuned = tuned(_intx_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                    key=["M_BUCKET", "N", "K", "KP", "BITS", "GROUP_SIZE", "AXIS"])


def _check(x2d, codes_lo, codes_hi, scale, offset, bias, bits, group_size, symmetric, axis, block_n,
           out_features, in_features) -> None:
    tensors = {"codes_lo": codes_lo, "codes_hi": codes_hi, "scale": scale, "offset": offset}
    check_launch("intx_linear", "intx", x2d, bias, tensors, op.check, bits=bits, group_size=group_size,
                 symmetric=symmetric, axis=axis, block_n=block_n, out_features=out_features, in_features=in_features)


def intx_linear(x2d: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor, bias: Optional[torch.Tensor], *, bits: int, group_size: int,
                symmetric: bool, axis: int, block_n: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 (``K = in_features``) and the stored buffers of
    :func:`fxquant.formats.intx.to_storage` -> ``y2d`` ``[M, out_features]`` in ``x2d.dtype``,
    accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes, devices or layout parameters do not fit
    (:func:`fxquant.ops.intx.check`).
    """
    _check(x2d, codes_lo, codes_hi, scale, offset, bias, bits, group_size, symmetric, axis, block_n,
           out_features, in_features)
    m, k = x2d.shape
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, out_features), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or out_features == 0:
        return y.to(x2d.dtype)
    codes_hi = codes_hi if codes_hi.numel() else codes_lo  # unread when bits <= 4
    offset = offset.contiguous() if offset.numel() else scale  # unread when symmetric
    bias_arg = bias.contiguous() if bias is not None else scale  # unread without bias

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _intx_tuned[grid](x2d, codes_lo.contiguous(), codes_hi.contiguous(), scale.contiguous(), offset, bias_arg, y,
                      m, out_features, int4.padded_rows(out_features), k,
                      fmt.stored_in_features(k, group_size, axis), triton.next_power_of_2(m), scale.shape[0],
                      x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1),
                      BITS=bits, GROUP_SIZE=group_size, AXIS=axis, TILE_N=block_n,
                      HAS_OFFSET=not symmetric, HAS_BIAS=bias is not None, DOT_IN_FP32=via_fp32)
    return y.to(x2d.dtype)
