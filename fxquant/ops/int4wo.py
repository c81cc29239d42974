"""``fxquant::linear_int4wo``: int4 asymmetric group-wise weight-only linear.

``y = x @ W.T + bias`` with ``W = (q - 8) * scale + zero`` per group; layout (tiled nibbles,
rows padded to 64, columns to whole groups ``Kp``, ``scales_and_zeros [Kp/g, Np, 2]`` bf16) in
:mod:`fxquant.formats.int4`; ``in_features`` is the true K.  Every CPU path below runs on ``x``
zero-padded to ``Kp`` columns (``LinearOpDef.stored_in_features``: one pad, only when ``K != Kp``).
CPU fast path: at M <= :func:`native_max_rows` the native GEMV (:mod:`fxquant.kernels.native_cpu`, reads
the tiles in place, fp32 accumulation; on bf16 values with AVX512-BF16 its bf16 dot-product form);
above, ``aten._weight_int4pack_mm_for_cpu`` on bf16 values where a bf16 output is allowed (bf16
activations or ``compute_dtype=bfloat16``; fp32-exact results keep the GEMV) when the stored tile
height equals this CPU's native one (weights packed on another CPU take the dequantize path, with a
warning); from ``PACKED_MAX_ROWS`` on, on bf16 values with AVX512-BF16, the native GEMM that decodes
tile chunks inside it (:func:`fxquant.kernels.native_cpu.int4_gemm`: for fp32-exact results its grouped
form, group scales applied in fp32), else blocked decode + dense GEMM.  CUDA: Triton kernel in
:mod:`fxquant.kernels.int4wo`.
"""
from __future__ import annotations

import warnings

import torch

from ..formats import int4 as fmt
from ..kernels import native_cpu, native_decode
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

#: Largest M for the native GEMV (:func:`fxquant.kernels.native_cpu.int4_tiled_gemv`, any tile
#: height that is a multiple of 32); above it ``_weight_int4pack_mm_for_cpu``.  Measured (11008x4096,
#: g128, 2 threads, AVX2, ms, through the op, native / int4pack): M=1 2.7 / 4.0, M=4 7.0 / 7.1,
#: M=8 12.6 / 14.0, M=16 23 / 27.
NATIVE_MAX_ROWS = 16


def dequantize_weight(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                      block_n: int, out_features: int, in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, in_features]``."""
    return fmt.from_storage(qweight, scales_and_zeros, group_size, block_n, out_features, in_features)


def check(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scales_and_zeros: torch.Tensor,
          group_size: int, block_n: int, out_features: int, in_features: int) -> None:
    """``qweight`` uint8 ``[Np, Kp/2]`` (``Np`` = out_features rounded up to 64, ``Kp`` = in_features
    rounded up to whole groups), ``scales_and_zeros`` bf16 ``[Kp/g, Np, 2]``, ``x`` ``[..., in_features]``,
    ``bias`` ``[out_features]``."""
    op = "linear_int4wo"
    if not (group_size in fmt.GROUP_SIZES and block_n in fmt.BLOCK_NS and v.is_size(out_features)
            and v.is_size(in_features)):
        v.size(op, "out_features", out_features)  # a SymInt passes through torch._check_is_size
        v.size(op, "in_features", in_features)
        if group_size not in fmt.GROUP_SIZES or block_n not in fmt.BLOCK_NS:
            v.scalars(op, (("group_size", group_size, group_size in fmt.GROUP_SIZES,
                            ", ".join(map(str, fmt.GROUP_SIZES))),
                           ("block_n", block_n, block_n in fmt.BLOCK_NS, f"an even divisor of {fmt.ROW_ALIGN}")))
    rows, kp = fmt.padded_rows(out_features), fmt.padded_k(in_features, group_size)
    v.stored(op, "qweight", qweight, torch.uint8, (rows, kp // 2), "[Np, Kp/2]")
    v.stored(op, "scales_and_zeros", scales_and_zeros, torch.bfloat16, (kp // group_size, rows, 2), "[Kp/g, Np, 2]")
    v.activations(op, x, in_features)
    v.bias(op, bias, out_features)


_warned_layout = False


#: Largest M for the native GEMV on bf16 activations where the CPU has AVX512-BF16 (bf16 dot
#: products: twice the MACs per instruction).  Measured (11008x4096, g128, 2 threads, Zen 4, ms,
#: median, native / int4pack / bf16 F.linear): M=1 0.76 / 1.25 / 4.9, M=16 4.8 / 10.5 / 7.1,
#: M=32 8.4 / 19.8 / 10.2, M=48 13.1 / 28.9 / 13.7 (blocked decode + bf16 GEMM 15.4), M=64
#: blocked decode 20.6, bf16 17.1.
NATIVE_MAX_ROWS_BF16DOT = 56
#: Largest M for ``_weight_int4pack_mm_for_cpu`` (below the CPU-wide large-M threshold, when lower);
#: above, blocked decode + dense GEMM.  Measured (11008x4096, g128, 2 threads, AVX2, ms, int4pack /
#: blocked decode + fp32 GEMM): M=64 97 / 128, M=96 151 / 141, M=128 209 / 152, M=192 245 / 205.
PACKED_MAX_ROWS = 96


def native_max_rows(x2: torch.Tensor, nm: _cpu.Numerics) -> int:
    """Rows up to which the native GEMV beats the other paths for these activations (bf16 values:
    the bf16 dot-product kernel where the CPU has it)."""
    if nm.bf16_values(x2) and native_cpu.has_bf16_dot():
        return NATIVE_MAX_ROWS_BF16DOT
    return NATIVE_MAX_ROWS


def native_row_limit(x2: torch.Tensor, nm: _cpu.Numerics, block_n: int | None = None) -> int:
    """Rows up to which the op runs the native GEMV: its own limit, and where the result must be
    fp32-exact also the packed kernels' rows (int4pack's output is bf16).  bf16 activations on a CPU
    without the bf16 dot-product kernel go to int4pack at every M below the packed limit (weights
    tiled for this CPU, ``block_n``): there the native GEMV runs in fp32 and is compute-bound.
    Measured (Xeon without AVX512-BF16, 1.1B Llama, ``tools/bench_e2e.py`` eager decode, one run):
    10.1 tok/s with the native GEMV, 14.2 with int4pack, torchao's int4 11.5-12.6."""
    if (not nm.exact and x2.dtype == torch.bfloat16 and not native_cpu.has_bf16_dot()
            and block_n == fmt.native_cpu_block_n()):
        return 0
    lim = native_max_rows(x2, nm)
    return max(lim, packed_max_rows() - 1) if nm.exact else lim


def packed_max_rows() -> int:
    """Rows below which the packed kernels beat blocked decode + dense GEMM (capped CPU-wide)."""
    return min(_cpu.large_m_threshold(), PACKED_MAX_ROWS)


def _cpu_fast(x2, qweight, scales_and_zeros, group_size, block_n, out_features, in_features, *,
              nm: _cpu.Numerics):
    """``x2`` ``[M, Kp]`` (zero-padded to the stored width by the op) -> ``[M, >= out_features]`` or None."""
    global _warned_layout
    m, packed = x2.shape[0], packed_max_rows()
    # the native GEMV; where the result must be fp32-exact it also takes int4pack's rows (bf16 output):
    # per row it costs what int4pack does (AVX2 numbers above: M=16 23 / 27 ms)
    if m <= native_row_limit(x2, nm, block_n):
        y = native_cpu.int4_tiled_gemv(x2, qweight, block_n=block_n, group_size=group_size,
                                       scale=scales_and_zeros.select(-1, 0), zero=scales_and_zeros.select(-1, 1),
                                       out_features=out_features, bf16_out=x2.dtype == torch.bfloat16,
                                       round_x=nm.round_x)
        if y is not None:
            return y
    if m >= packed:
        if nm.bf16_values(x2) and not _cpu.amx():  # decodes tile chunks inside the GEMM; grouped (exact) for fp32-exact results
            y = native_cpu.int4_gemm(x2, qweight, block_n=block_n, group_size=group_size,
                                     scale=scales_and_zeros.select(-1, 0), zero=scales_and_zeros.select(-1, 1),
                                     out_features=out_features, exact=nm.exact)
            if y is not None:
                return y
        return None  # blocked decode + dense GEMM
    if not nm.bf16_gemm(x2):
        return None
    if block_n != fmt.native_cpu_block_n():
        if not _warned_layout:
            _warned_layout = True
            warnings.warn(f"int4wo weights were packed with block_n={block_n} but this CPU's kernel uses "
                          f"{fmt.native_cpu_block_n()}: using the slower dequantize path. Re-run "
                          "fxquant.compile on this machine for the fast path.", stacklevel=2)
        return None
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), qweight, group_size,
                                                       scales_and_zeros)


def _block_decoder(qweight, scales_and_zeros, group_size, block_n, out_features, in_features, dtype):
    """Large-M CPU path (and weights tiled for another CPU): whole tiles unpacked per block of rows,
    ``(q - 8) * scale + zero`` in the GEMM dtype, as :func:`fxquant.formats.int4.dequantize`; all ``Kp``
    stored columns (the op zero-pads x to them)."""
    n_pad, k = qweight.shape[0], qweight.shape[1] * 2
    groups = k // group_size
    if dtype == torch.bfloat16:  # the native decoder (AVX512-BF16): the same values, at memory speed
        native = native_decode.int4_tiles_decoder_t(qweight, block_n=block_n, group_size=group_size,
                                                    scale=scales_and_zeros.select(-1, 0),
                                                    zero=scales_and_zeros.select(-1, 1), n_stored=n_pad)
        if native is not None:
            return native, None, block_n

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        end = min(n_pad, -(-r1 // block_n) * block_n)
        q = fmt.unpack(qweight[r0:end], block_n)[: r1 - r0]
        sz = scales_and_zeros[:, r0:r1].transpose(0, 1)  # [rows, Kp/g, 2]
        grouped = out.view(r1 - r0, groups, group_size)
        grouped.copy_(q.view(r1 - r0, groups, group_size))
        torch.addcmul(sz[..., 1:2], grouped.sub_(8), sz[..., 0:1], out=grouped)  # one rounding in bf16
    return decode, None, block_n


def _cuda(x2, qweight, scales_and_zeros, *, bias, group_size, block_n, out_features, in_features):
    from ..kernels.int4wo import int4wo_linear

    return int4wo_linear(x2, qweight, scales_and_zeros, bias, group_size=group_size, block_n=block_n,
                         out_features=out_features, in_features=in_features)


OP = LinearOpDef(
    name="linear_int4wo", tensors=("qweight", "scales_and_zeros"),
    scalars=(("group_size", "int"), ("block_n", "int"), ("out_features", "int"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda out_features, **_: out_features, check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, block_decoder=_block_decoder,
    cpu_fast_any_m=True,  # _cpu_fast picks by M (native GEMV, int4pack) and returns None above
    stored_in_features=lambda in_features, group_size, **_: fmt.padded_k(in_features, group_size),
    doc="x [..., in_features]; qweight uint8 [Np, Kp/2] tiled by block_n (Kp = in_features rounded up to "
        "whole groups); scales_and_zeros bf16 [Kp/g, Np, 2]; bias [out_features] -> [..., out_features]",
)
linear_int4wo = define(OP)
reference = OP.reference
