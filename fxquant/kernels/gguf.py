"""Triton kernel for ``fxquant::linear_gguf``: ``y = x @ W.T + bias`` with ``W`` a GGUF block-quantized
weight (:mod:`fxquant.formats.gguf`), read from the stored row bytes.

Element ``(n, k)`` of ``W`` lies in block ``k // QK`` of row ``n`` (``n * row_bytes + (k // QK) *
type_size`` bytes in), at index ``i = k % QK`` of that block.  Each ``[BLOCK_K, BLOCK_N]`` tile of
``W`` is decoded in registers by :func:`_value`, one branch per type (a compile-time constant), with
the byte gathers and the formulas of the format module: the fp16 scales are two byte loads bitcast
to fp16, and every product is exact in fp32, so each tile holds the reference's values.  The tile
enters ``tl.dot`` with fp32 accumulation: exact fp32 products for fp32 activations (as the
reference), the activation's dtype for bf16 / fp16 on GPU (``W`` rounded to it).  Every type runs
here; the tests run q4_0, q4_1, q5_0, q5_1, q8_0 and all k-quants under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import gguf as fmt
from ..ops import gguf as op
from ._common import bf16_via_fp32, check_launch, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _u8(p, off, mask):
    """The bytes at ``p + off`` as int32 (0 where masked)."""
    return tl.load(p + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, off, mask):
    """The little-endian fp16 at ``p + off`` as fp32."""
    bits = _u8(p, off, mask) | (_u8(p, off + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_min_k4(p, s, j, mask):
    """q4_k / q5_k: the 6-bit scale and minimum of sub-block ``j`` from the 12 bytes at ``p + s``."""
    jj = j % 4
    a = _u8(p, s + jj, mask)
    b = _u8(p, s + jj + 4, mask)
    c = _u8(p, s + jj + 8, mask)
    hi = j >= 4
    sc = tl.where(hi, (c & 15) | ((a >> 6) << 4), a & 63)
    mn = tl.where(hi, (c >> 4) | ((b >> 6) << 4), b & 63)
    return sc, mn


@triton.jit
def _value(p, base, i, mask, QTYPE: tl.constexpr):
    """fp32 value of element ``i`` of the block at byte ``base`` (tensors of one shape)."""
    if QTYPE == 2:  # q4_0
        byte = _u8(p, base + 2 + i % 16, mask)
        q = tl.where(i < 16, byte & 15, byte >> 4)
        w = _f16(p, base, mask) * (q - 8).to(tl.float32)
    elif QTYPE == 3:  # q4_1
        byte = _u8(p, base + 4 + i % 16, mask)
        q = tl.where(i < 16, byte & 15, byte >> 4)
        w = _f16(p, base, mask) * q.to(tl.float32) + _f16(p, base + 2, mask)
    elif QTYPE == 6:  # q5_0
        byte = _u8(p, base + 6 + i % 16, mask)
        hb = (_u8(p, base + 2 + i // 8, mask) >> (i % 8)) & 1
        q = tl.where(i < 16, byte & 15, byte >> 4) | (hb << 4)
        w = _f16(p, base, mask) * (q - 16).to(tl.float32)
    elif QTYPE == 7:  # q5_1
        byte = _u8(p, base + 8 + i % 16, mask)
        hb = (_u8(p, base + 4 + i // 8, mask) >> (i % 8)) & 1
        q = tl.where(i < 16, byte & 15, byte >> 4) | (hb << 4)
        w = _f16(p, base, mask) * q.to(tl.float32) + _f16(p, base + 2, mask)
    elif QTYPE == 8:  # q8_0
        q = _u8(p, base + 2 + i, mask)
        q = tl.where(q >= 128, q - 256, q)
        w = _f16(p, base, mask) * q.to(tl.float32)
    elif QTYPE == 10:  # q2_k
        sc = _u8(p, base + i // 16, mask)
        byte = _u8(p, base + 16 + 32 * (i // 128) + i % 32, mask)
        q = (byte >> (2 * ((i % 128) // 32))) & 3
        dl = _f16(p, base + 80, mask) * (sc & 15).to(tl.float32)
        ml = _f16(p, base + 82, mask) * (sc >> 4).to(tl.float32)
        w = dl * q.to(tl.float32) - ml
    elif QTYPE == 11:  # q3_k
        j = i // 16
        low = (_u8(p, base + 96 + j % 8, mask) >> (4 * (j // 8))) & 15
        high = (_u8(p, base + 104 + j % 4, mask) >> (2 * (j // 4))) & 3
        dl = _f16(p, base + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        ql = (_u8(p, base + 32 + 32 * (i // 128) + i % 32, mask) >> (2 * ((i % 128) // 32))) & 3
        hb = (_u8(p, base + i % 32, mask) >> (i // 32)) & 1
        w = dl * (ql - 4 + 4 * hb).to(tl.float32)
    elif QTYPE == 12:  # q4_k
        sc, mn = _scale_min_k4(p, base + 4, i // 32, mask)
        byte = _u8(p, base + 16 + 32 * (i // 64) + i % 32, mask)
        q = tl.where((i // 32) % 2 == 0, byte & 15, byte >> 4)
        dl = _f16(p, base, mask) * sc.to(tl.float32)
        ml = _f16(p, base + 2, mask) * mn.to(tl.float32)
        w = dl * q.to(tl.float32) - ml
    elif QTYPE == 13:  # q5_k
        sc, mn = _scale_min_k4(p, base + 4, i // 32, mask)
        byte = _u8(p, base + 48 + 32 * (i // 64) + i % 32, mask)
        hb = (_u8(p, base + 16 + i % 32, mask) >> (i // 32)) & 1
        q = tl.where((i // 32) % 2 == 0, byte & 15, byte >> 4) | (hb << 4)
        dl = _f16(p, base, mask) * sc.to(tl.float32)
        ml = _f16(p, base + 2, mask) * mn.to(tl.float32)
        w = dl * q.to(tl.float32) - ml
    else:  # q6_k (14)
        h = i // 128
        s = (i % 128) // 32
        byte = _u8(p, base + 64 * h + 32 * (s % 2) + i % 32, mask)
        ql = (byte >> (4 * (s // 2))) & 15
        qh = (_u8(p, base + 128 + 32 * h + i % 32, mask) >> (2 * s)) & 3
        sc = _u8(p, base + 192 + i // 16, mask)
        sc = tl.where(sc >= 128, sc - 256, sc)
        dl = _f16(p, base + 208, mask) * sc.to(tl.float32)
        w = dl * ((ql | (qh << 4)) - 32).to(tl.float32)
    return w


@triton.jit
def _gguf_kernel(x_ptr, blocks_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_xk, stride_ym, stride_yn,
                 row_bytes, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        base = offs_n[None, :] * row_bytes + (offs_k[:, None] // QK) * TS  # [BLOCK_K, BLOCK_N] block starts
        i = (offs_k[:, None] % QK + 0 * offs_n[None, :]).to(tl.int32)
        w = tl.where(w_mask, _value(blocks_ptr, base, i, w_mask, QTYPE), 0.0)
        acc = dot(x, w, acc, DOT_IN_FP32)  # fp32: fp32 activations, or bf16 under the interpreter

    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  Usual Triton GEMM
# ranges (16 is tl.dot's minimum tile side): narrow-M tiles with long K steps for decode.
_CUDA_CONFIGS = [
    config(16, 64, 64, num_warps=4, num_stages=4),
    config(16, 128, 64, num_warps=4, num_stages=3),
    config(32, 64, 64, num_warps=4, num_stages=4),
    config(64, 128, 32, num_warps=4, num_stages=4),
    config(128, 128, 32, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config, so autotune never benchmarks there.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]

_gguf_tuned = tuned(_gguf_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                    key=["M_BUCKET", "N", "K", "QTYPE"])


def gguf_linear(x2d: torch.Tensor, blocks: torch.Tensor, bias: Optional[torch.Tensor], *, qtype: str,
                out_features: int, in_features: int) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 (``K = in_features``); ``blocks`` uint8 ``[N, K / QK * type_size]``
    (GGUF rows of ``qtype``); ``bias`` ``[N]`` or None -> ``y2d`` ``[M, N]`` in ``x2d.dtype`` (``N =
    out_features``), accumulated in fp32.  ValueError naming the argument when shapes, dtypes, devices
    or the type do not fit (:func:`fxquant.ops.gguf.check`)."""
    check_launch("gguf_linear", "gguf", x2d, bias, {"blocks": blocks}, op.check, qtype=qtype,
                 out_features=out_features, in_features=in_features)
    q = fmt.QTYPES[qtype]
    m, k = x2d.shape
    via_fp32 = bf16_via_fp32(x2d.dtype)
    y = torch.empty((m, out_features), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or out_features == 0 or k == 0:
        y.zero_()
        return (y if bias is None else y + bias).to(x2d.dtype)
    w = blocks.contiguous()
    bias_arg = bias.contiguous() if bias is not None else w  # unread without bias

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_features, meta["BLOCK_N"]),)

    _gguf_tuned[grid](x2d, w, bias_arg, y, m, out_features, k, triton.next_power_of_2(m),
                      x2d.stride(0), x2d.stride(1), y.stride(0), y.stride(1), w.shape[1],
                      QTYPE=q.ggml_type, QK=q.block_size, TS=q.type_size, HAS_BIAS=bias is not None,
                      DOT_IN_FP32=via_fp32 or x2d.dtype == torch.float32)
    return y.to(x2d.dtype)
