"""Triton kernel for ``fxquant::linear_vptq``: ``y = x @ W.T + bias`` with ``W`` VPTQ's codebook weight.

Layout (:mod:`fxquant.formats.vptq`), read as stored.  The launcher moves the permutation and the norm
to the activations as the CPU path does (:func:`fxquant.ops.vptq.moved_to_activations`): ``x'`` is
``x``'s columns in the stored order (a gather: exact), ``beta = x @ weight_bias`` is added to the fp32
result, and the scale ``s[perm]`` multiplies each decoded column in the kernel.  Per ``[BLOCK_K, BLOCK_N]``
tile the kernel decodes ``Wp``: for a main column ``k >= o`` of group ``g = (k - o) // gs``, index row
``r = n // v`` and lane ``j = n % v``, the merged index of column ``c = (k - o) % gs`` is read from the
two 32-bit words holding bits ``c*tb .. c*tb + tb - 1`` of row ``(g, r)``'s stream, split into the main
and residual index, and the two codebook values at lane ``j`` are gathered and added in fp32; outlier
columns ``k < o`` read their uint16 index (in int16 bits) and their codebook.  The tile (times the
scale) enters ``tl.dot`` in fp32 (``input_precision="ieee"``) for fp32 activations, else in the
activations' dtype; accumulation is fp32.  Equal to :func:`fxquant.ops.vptq.reference` up to fp32
summation order (and, for 16-bit activations, the rounding of the decoded tile to their dtype).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import vptq as fmt
from ..ops import vptq as op
from ._common import bf16_via_fp32, check_launch, config, dot, grouped_tile, tuned


@triton.jit
def _vptq_kernel(x_ptr, idx_ptr, cent_ptr, res_ptr, oidx_ptr, ocent_ptr, sp_ptr, y_ptr,
                 M, N, K, M_BUCKET, O, GS, R, WORDS, NUM_C, NUM_RC,
                 stride_xm, stride_xk, stride_ym, stride_yn,
                 V: tl.constexpr, VO: tl.constexpr, IB: tl.constexpr, TB: tl.constexpr,
                 HAS_RES: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r = offs_n // V
    lane = offs_n % V

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        kk = tl.maximum(offs_k - O, 0)
        g = kk // GS
        bit = (kk % GS) * TB
        word = bit // 32
        shift = bit % 32
        main = ((offs_k >= O) & k_mask)[:, None] & n_mask[None, :]
        row = (g[:, None] * R + r[None, :]) * WORDS + word[:, None]           # [BLOCK_K, BLOCK_N]
        lo = tl.load(idx_ptr + row, mask=main, other=0).to(tl.int64) & 0xFFFFFFFF
        hi = tl.load(idx_ptr + row + 1, mask=main & (word + 1 < WORDS)[:, None], other=0).to(tl.int64) & 0xFFFFFFFF
        merged = (lo | (hi << 32)) >> shift[:, None]
        t = merged & ((1 << IB) - 1)
        w = tl.load(cent_ptr + (g[:, None] * NUM_C + t) * V + lane[None, :], mask=main, other=0.0).to(tl.float32)
        if HAS_RES:
            tr = (merged >> IB) & ((1 << (TB - IB)) - 1)
            w += tl.load(res_ptr + (g[:, None] * NUM_RC + tr) * V + lane[None, :], mask=main,
                         other=0.0).to(tl.float32)
        if HAS_OUTLIERS:
            out = (offs_k < O)[:, None] & n_mask[None, :]
            oi = tl.load(oidx_ptr + (offs_n // VO)[None, :] * O + offs_k[:, None], mask=out, other=0)
            oi = oi.to(tl.int32) & 0xFFFF
            wo = tl.load(ocent_ptr + oi * VO + (offs_n % VO)[None, :], mask=out, other=0.0).to(tl.float32)
            w = tl.where(out, wo, w)
        if HAS_SCALE:
            w = w * tl.load(sp_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[:, None]
        w = tl.where(k_mask[:, None] & n_mask[None, :], w, 0.0)
        acc = dot(x, w, acc, DOT_IN_FP32)  # fp32: fp32 activations, or bf16 under the interpreter

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# GPU search space.  Not measured: the machine this was written on has no GPU.  The usual Triton GEMM
# ranges (16 is tl.dot's minimum tile side); decoding costs two index words and one or two codebook
# gathers per weight, so narrow-M tiles keep the decode shared by few rows of x.
_CUDA_CONFIGS = [
    config(16, 64, 64, num_warps=4, num_stages=3),
    config(16, 128, 64, num_warps=4, num_stages=3),
    config(32, 64, 64, num_warps=4, num_stages=3),
    config(64, 64, 64, num_warps=4, num_stages=3),
    config(64, 128, 32, num_warps=4, num_stages=3),
    config(128, 128, 32, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config (autotune then never benchmarks), smallest legal tiles.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]

_vptq_tuned = tuned(_vptq_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                    key=["M_BUCKET", "N", "K", "V", "TB", "HAS_RES", "HAS_OUTLIERS"])


def vptq_linear(x2d: torch.Tensor, *, bias: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 and the op's stored tensors and scalars (names of
    :mod:`fxquant.ops.vptq`, as keywords) -> ``y2d`` ``[M, N]`` in ``x2d.dtype``, accumulated in fp32.

    Raises ValueError naming the argument when shapes, dtypes or devices do not fit."""
    t = {name: kw.pop(name) for name in op.TENSORS}
    kw.pop("compute_dtype", None)
    check_launch("vptq_linear", "vptq", x2d, bias, t, op.check, **kw)
    lay = op.layout_of(kw)
    m, k = x2d.shape
    n = lay.out_features
    y = torch.zeros((m, n), dtype=torch.float32, device=x2d.device)
    if m == 0 or n == 0:
        return y.to(x2d.dtype)
    xp, s_p, beta = x2d, None, None
    if lay.enable_norm:
        beta = x2d.float() @ t["weight_bias"].float()
        s_p = t["weight_scale"].float()
    if lay.enable_perm:
        p = fmt.perm_indices(t["perm"])
        xp = xp[:, p]
        s_p = None if s_p is None else s_p[p]
    via_fp32 = bf16_via_fp32(x2d.dtype)
    if via_fp32:
        xp = xp.float()
    c = {name: t[name].contiguous() for name in op.TENSORS}
    placeholder = c["centroids"]  # never read when its flag is off

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _vptq_tuned[grid](xp, c["indices"], c["centroids"],
                      c["res_centroids"] if lay.num_res_centroids else placeholder,
                      c["outlier_indices"] if lay.outlier_size else placeholder,
                      c["outlier_centroids"] if lay.outlier_size else placeholder,
                      s_p.contiguous() if s_p is not None else placeholder, y,
                      m, n, k, triton.next_power_of_2(m), lay.outlier_size, lay.group_size, lay.rows, lay.words,
                      lay.num_centroids, max(lay.num_res_centroids, 1),
                      xp.stride(0), xp.stride(1), y.stride(0), y.stride(1),
                      V=lay.vector_len, VO=lay.outlier_vector_len, IB=lay.index_bits, TB=lay.total_bits,
                      HAS_RES=lay.num_res_centroids > 0, HAS_OUTLIERS=lay.outlier_size > 0,
                      HAS_SCALE=s_p is not None, DOT_IN_FP32=via_fp32 or x2d.dtype == torch.float32)
    if beta is not None:
        y += beta[:, None]
    if bias is not None:
        y += bias.float()
    return y.to(x2d.dtype)
