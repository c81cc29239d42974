"""``fxquant::linear_intx``: group-wise b-bit (b in 1..8) integer weight-only linear.

``y = x @ W.T + bias`` with ``W = (q - 2**(bits-1)) * scale + offset`` per group (``offset`` empty
when ``symmetric``); bit-packed layout (two planes, int4 tile order, rows padded to 64) and the
grouping of ``axis`` 0 / 1 in :mod:`fxquant.formats.intx`.

CPU fast path (small M, ``compute_dtype`` None or bf16): ``aten._weight_int4pack_mm_for_cpu`` with
bf16 activations, once per 4-bit plane, for axis 1, ``group_size`` in {32, 64, 128, 256}, weights
packed with this CPU's tile height, and ``bits`` in :data:`INT4_KERNEL_BITS`.  b = 4 and b = 8 read
the stored bytes directly; the other widths would have to widen their planes to nibbles on every
call, which measured slower than dequantize + dense GEMM (see :data:`INT4_KERNEL_BITS`), so they take
the dequantize path.  CUDA: Triton kernel in :mod:`fxquant.kernels.intx`.
"""
from __future__ import annotations

import warnings

import torch

from ..formats import int4
from ..formats import intx as fmt
from ._linear import LinearOpDef, define

#: Widths whose planes the int4 kernel reads as stored (4: one plane, 8: two planes).  b = 5..7
#: keep a 1..3-bit high plane and b = 1..3 a 1..3-bit low plane: widening those to nibbles per call
#: (fmt.widen_to_nibbles) is measured in tools/bench_cases/intx.py ("uintNwo ... widen+int4pack").
INT4_KERNEL_BITS = frozenset({4, 8})


def dequantize_weight(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      bits: int, group_size: int, symmetric: bool, axis: int, block_n: int,
                      out_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, K]``."""
    if symmetric != (offset.numel() == 0):
        raise ValueError(f"linear_intx: symmetric={symmetric} but offset has {offset.numel()} elements "
                         "(symmetric weights store no offset, asymmetric ones one per group)")
    return fmt.from_storage(codes_lo, codes_hi, scale, offset, bits, group_size, axis, block_n, out_features)


def int4_kernel_applies(bits: int, group_size: int, axis: int, block_n: int, widen: bool = False) -> bool:
    """Whether the int4 CPU kernel can compute this layout (``widen``: also for widths that need
    their planes widened per call)."""
    return (axis == 1 and group_size in fmt.KERNEL_GROUP_SIZES and block_n == int4.native_cpu_block_n()
            and (widen or bits in INT4_KERNEL_BITS))


def int4_kernel_linear(x2: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor, bits: int, group_size: int, out_features: int) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``[M, Np]`` via ``aten._weight_int4pack_mm_for_cpu`` (bf16, or fp16 for
    fp16 ``x2``), one call per plane."""
    kd = torch.float16 if x2.dtype == torch.float16 else torch.bfloat16
    xk = x2.to(kd).contiguous()
    y = None
    for qweight, sz in fmt.int4_kernel_operands(codes_lo, codes_hi, scale, offset, bits, out_features, kd):
        part = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, qweight, group_size, sz)
        y = part if y is None else y.float() + part
    return y


_warned_layout = False


def _cpu_fast(x2, codes_lo, codes_hi, scale, offset, bits, group_size, symmetric, axis, block_n, out_features):
    global _warned_layout
    if not int4_kernel_applies(bits, group_size, axis, block_n):
        native = int4.native_cpu_block_n()
        if not _warned_layout and native is not None and int4_kernel_applies(bits, group_size, axis, native):
            _warned_layout = True
            warnings.warn(f"intx weights were packed with block_n={block_n} but this CPU's int4 kernel uses "
                          f"{native}: using the slower dequantize path. Re-run "
                          "fxquant.compile on this machine for the fast path.", stacklevel=2)
        return None
    return int4_kernel_linear(x2, codes_lo, codes_hi, scale, offset, bits, group_size, out_features)


def _cuda(x2, codes_lo, codes_hi, scale, offset, *, bias, bits, group_size, symmetric, axis, block_n, out_features):
    from ..kernels.intx import intx_linear

    return intx_linear(x2, codes_lo, codes_hi, scale, offset, bias, bits=bits, group_size=group_size,
                       symmetric=symmetric, axis=axis, block_n=block_n, out_features=out_features)


OP = LinearOpDef(
    name="linear_intx", tensors=("codes_lo", "codes_hi", "scale", "offset"),
    scalars=(("bits", "int"), ("group_size", "int"), ("symmetric", "bool"), ("axis", "int"),
             ("block_n", "int"), ("out_features", "int")),
    dequantize=dequantize_weight, out_features=lambda out_features, **_: out_features,
    cpu_fast=_cpu_fast, cuda=_cuda,
    doc="x [..., K]; codes_lo uint8 [ceil(Np*K*min(bits,4)/8)], codes_hi uint8 [ceil(Np*K*(bits-4)/8)] "
        "(int4 tile order, rows padded to Np); scale/offset bf16 [K/g, N] (axis 1) or [N/g, K] (axis 0), "
        "offset empty if symmetric; bias [out_features] -> [..., out_features]",
)
linear_intx = define(OP)
reference = OP.reference
