"""Triton kernel for ``fxquant::linear_fpx``: ``y = x @ (decode(codes) * scale[:, None]).T + bias``.

Layout (:mod:`fxquant.formats.fpx`), read as stored: ``qweight`` uint8 ``[N, Kp * X / 8]``, the
``X``-bit codes split into bit planes of widths 4 / 2 / 1 (high bits first), one block of
columns per plane; in the plane of width ``p`` (``cols = Kp * p / 8`` bytes per row, starting at
column ``off``), code ``k``'s bits are bits ``[(k // cols) * p, ...+p)`` of byte ``off + k % cols``.
The kernel gathers each plane's byte for every code of a ``[BLOCK_K, BLOCK_N]`` tile, shifts and
ors the planes into codes, and decodes them:

- ``ebits <= 4`` (``FP16_BITS``): bit moves into a float16 (the code's exponent field *is* an
  fp16 exponent field, subnormals included), exact, no memory access; the missing factor
  ``2^(15 - bias)`` joins the per-row scale (:func:`fxquant.formats.fpx.fp16_scaled`);
- otherwise: a gather from the ``2^X``-entry fp32 table (:func:`fxquant.formats.fpx.decode_table`).

The decoded tile (exact in fp32 / bf16; fp16 when the format's range fits, else fp32) feeds
``tl.dot`` with fp32 accumulation; the per-row scale is applied once after the K loop.  The result
equals :func:`fxquant.ops.fpx.reference` up to fp32 summation order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..formats import fpx as fmt
from ..ops import fpx as op
from ._common import check_launch, bf16_via_fp32, config, dot, grouped_tile, store_tile, tuned


@triton.jit
def _plane_bits(qw_ptr, row_off, offs_k, mask, start, cols, WIDTH: tl.constexpr, SHIFT: tl.constexpr):
    """This plane's bits of the codes at ``offs_k`` (``[BLOCK_K, 1]``) in rows ``row_off``
    (``[1, BLOCK_N]``), moved to bit ``SHIFT``; the plane occupies columns ``start .. start + cols``."""
    b = tl.load(qw_ptr + row_off + start + offs_k % cols, mask=mask, other=0).to(tl.int32)
    return ((b >> ((offs_k // cols) * WIDTH).to(tl.int32)) & ((1 << WIDTH) - 1)) << SHIFT


@triton.jit
def _fpx_kernel(x_ptr, qw_ptr, scale_ptr, lut_ptr, bias_ptr, y_ptr,
                M, N, K, KP8, M_BUCKET,
                stride_xm, stride_xk, stride_qn, stride_ym, stride_yn,
                BITS: tl.constexpr, EBITS: tl.constexpr,
                W0: tl.constexpr, S0: tl.constexpr, W1: tl.constexpr, S1: tl.constexpr,
                W2: tl.constexpr, S2: tl.constexpr,
                FP16_BITS: tl.constexpr, SCALE_FACTOR: tl.constexpr,
                HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    # Planes: (W_i, S_i) = (width, shift within the code), W_i = 0 when absent; plane i starts at
    # column (Kp / 8) * (W_0 + ... + W_{i-1}) and has (Kp / 8) * W_i columns (KP8 = Kp / 8).
    # M_BUCKET only feeds the autotune key (so a new M does not re-tune); the kernel ignores it.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row_off = offs_n[None, :] * stride_qn  # [1, BLOCK_N]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k)[:, None]  # [BLOCK_K, 1]
        k_mask = kk < K
        w_mask = k_mask & n_mask[None, :]
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask.reshape(1, BLOCK_K), other=0.0)
        code = _plane_bits(qw_ptr, row_off, kk, w_mask, 0, KP8 * W0, W0, S0)
        if W1 > 0:
            code |= _plane_bits(qw_ptr, row_off, kk, w_mask, KP8 * W0, KP8 * W1, W1, S1)
        if W2 > 0:
            code |= _plane_bits(qw_ptr, row_off, kk, w_mask, KP8 * (W0 + W1), KP8 * W2, W2, S2)
        if FP16_BITS:
            # code at the top of a byte (sign in bit 7), sign-extended to 16 bits, exponent field
            # moved onto fp16's; bits 10 + EBITS .. 14 hold sign copies and are cleared
            top = (code << (8 - BITS)).to(tl.int8).to(tl.int16)
            h = (top << (3 + EBITS)) & (-0x8000 | ((1 << (10 + EBITS)) - 1))
            w = h.to(tl.float16, bitcast=True)
        else:
            w = tl.load(lut_ptr + code)  # masked codes are 0 -> +0.0
        # fp32 with DOT_IN_FP32 (exact upcast): bf16 under the interpreter, or fp16 x with values past fp16's range
        acc = dot(x, w, acc, DOT_IN_FP32)
        x_ptrs += BLOCK_K * stride_xk

    acc = acc * (tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) * SCALE_FACTOR)[None, :]
    store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn, HAS_BIAS)


# GPU search space.  Not measured: the machine this was written on has no GPU.  The usual Triton
# GEMM ranges, narrow-M tiles for decode, square-ish ones for prefill.
_CUDA_CONFIGS = [
    config(16, 64, 64, num_warps=4, num_stages=4),
    config(16, 128, 64, num_warps=4, num_stages=3),
    config(32, 64, 64, num_warps=4, num_stages=4),
    config(64, 64, 64, num_warps=4, num_stages=4),
    config(64, 128, 32, num_warps=4, num_stages=4),
    config(128, 128, 32, num_warps=8, num_stages=3),
]
# The CPU interpreter: one config (autotune then never benchmarks), smallest legal tiles.
_INTERPRETER_CONFIGS = [config(16, 32, 32, num_warps=1, num_stages=1)]


_fpx_tuned = tuned(_fpx_kernel, cuda=_CUDA_CONFIGS, interpreter=_INTERPRETER_CONFIGS,
                   key=["M_BUCKET", "N", "K", "BITS", "EBITS"])


def _check(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
           ebits: int, mbits: int, in_features: int) -> None:
    check_launch("fpx_linear", "fpx", x2d, bias, {"qweight": qweight, "scale": scale}, op.check, ebits=ebits,
                 mbits=mbits, in_features=in_features)


def fpx_linear(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               *, ebits: int, mbits: int, in_features: int, fp16_bits: bool | None = None) -> torch.Tensor:
    """``x2d`` ``[M, K]`` fp32/bf16/fp16 (``K = in_features``); ``qweight`` uint8 ``[N, Kp * X / 8]`` (plane layout);
    ``scale`` float ``[N]``; ``bias`` float ``[N]`` or None -> ``[M, N]`` in ``x2d.dtype`` (fp32
    accumulation).  ``fp16_bits``: decode by float16 bit moves (default: when ``ebits <= 4``, the
    only formats it is exact for) or by table.

    Raises ValueError naming the argument when shapes, dtypes, devices or the format do not fit."""
    _check(x2d, qweight, scale, bias, ebits, mbits, in_features)
    bits = 1 + ebits + mbits
    use_bits = ebits <= 4 if fp16_bits is None else fp16_bits
    if use_bits and ebits > 4:
        raise ValueError(f"fpx_linear: fp16_bits=True needs ebits <= 4 (fp16's exponent range), got ebits={ebits}")
    m, k = x2d.shape
    n = qweight.shape[0]
    via_fp32 = bf16_via_fp32(x2d.dtype)
    # fp16 x: the decoded tile must fit fp16 too; table values of e5m1 / e5m0 / e6m0 do not
    fp16_too_narrow = x2d.dtype == torch.float16 and not use_bits and fmt.max_normal(ebits, mbits) > 65504
    y = torch.empty((m, n), dtype=torch.float32 if via_fp32 else x2d.dtype, device=x2d.device)
    if m == 0 or n == 0:
        return y.to(x2d.dtype)
    planes = list(fmt.planes(bits)) + [(0, 0)] * (3 - len(fmt.planes(bits)))
    lut = fmt.decode_table(ebits, mbits, x2d.device)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _fpx_tuned[grid](x2d, qweight, scale, lut, bias_arg, y,
                     m, n, k, fmt.padded_k(k) // 8, triton.next_power_of_2(m),
                     x2d.stride(0), x2d.stride(1), qweight.stride(0), y.stride(0), y.stride(1),
                     BITS=bits, EBITS=ebits, W0=planes[0][0], S0=planes[0][1], W1=planes[1][0], S1=planes[1][1],
                     W2=planes[2][0], S2=planes[2][1], FP16_BITS=use_bits,
                     SCALE_FACTOR=2.0 ** fmt.fp16_exponent_offset(ebits) if use_bits else 1.0,
                     HAS_BIAS=bias is not None, DOT_IN_FP32=via_fp32 or fp16_too_narrow)
    return y.to(x2d.dtype)
