"""``fxquant::linear_intx``: group-wise b-bit (b in 1..8) integer weight-only linear.

``y = x @ W.T + bias`` with ``W = (q - 2**(bits-1)) * scale + offset`` per group (``offset`` empty
when ``symmetric``); bit-packed layout (planes of folded shards, int4 tile order, rows padded to 64)
and the grouping of ``axis`` 0 / 1 in :mod:`fxquant.formats.intx`; any shape (a partial group is
padded; ``in_features`` is the true K, and on axis 1 every CPU path runs on x zero-padded to the
stored ``Kp`` columns by ``LinearOpDef.stored_in_features``).

CPU (``compute_dtype`` None, fp32 or bf16, under the policy of :func:`._cpu.numerics`; float16: the
reference in fp16):

- native GEMV (:func:`native_linear`): axis 1, any b, ``M <= NATIVE_MAX_ROWS``: the stored planes
  and shards read in place by :func:`fxquant.kernels.native_cpu.int4_tiled_gemv` (any group size,
  any tile height that is a multiple of 32), fp32 products and sums (x rounded to bf16 in C when the
  policy rounds it; b = 4, 8 on bf16 values: the bf16 dot-product form).  Axis 0 (AVX-512),
  ``M <= native_max_rows_axis0``: :func:`fxquant.kernels.native_cpu.int4_tiled_axis0_gemv`, the
  per-column scales folded into the activations (``A = scale * x`` per row class ``n % ceil(N/g)``;
  its bf16 form rounds A, so fp32-exact results take the fp32 form).
- b <= 4, axis 1, large M, bf16 values: int4wo's native GEMM (grouped form for fp32-exact results);
  a 1..3-bit plane is widened to nibble-pair bytes once per call first; b > 4 (fp32-exact policy) runs it
  once per plane, ``(lo - mid) s + offset`` and ``16 hi s`` (:func:`native_gemm`).
- int4 kernel: ``aten._weight_int4pack_mm_for_cpu`` on bf16 activations, once per 4-bit plane, for
  axis 1, ``group_size`` in {32, 64, 128, 256}, weights packed with this CPU's tile height and
  ``M <= INT4_KERNEL_MAX_ROWS``, where a bf16 output is allowed (bf16 activations or
  ``compute_dtype=bfloat16``).  b = 4 and b = 8 read the stored planes as they are; other widths
  widen their 1..3-bit planes to nibbles per call, a piece of rows at a time (transient, never
  kept).  The rounding of the kernel's zeros is added back in fp32 (``x`` group sums times the
  residual), so only the bf16 activations and outputs differ from the reference.
- otherwise, at any M: :func:`tiled_dequant_linear` (axis 1, ``M <= TILED_MAX_ROWS``: dequantize a
  few tiles in tile order and multiply at once) or :func:`rows_dequant_linear` (row blocks), in
  :meth:`._cpu.Numerics.gemm_dtype` (bf16 only where a bf16 output is allowed).
CUDA: Triton kernel in :mod:`fxquant.kernels.intx`.  Measurements: docs/formats/intx.md.
"""
from __future__ import annotations

import warnings

import torch

from ..formats import int4
from ..formats import intx as fmt
from ..kernels import native_cpu
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

#: Widths whose planes the int4 kernel reads as stored (4: one plane, 8: two planes); the other
#: widths widen their 1..3-bit planes to nibbles piece by piece on every call.
AS_STORED_BITS = frozenset({4, 8})
#: Nibble-pair bytes widened per piece (then one kernel call per plane on those rows).  Measured
#: (1 thread, CPU time, 11008x4096, M=1, uint2 g128): 256 KiB 25 ms, 1 MiB 16 ms, 4 MiB 14 ms,
#: whole plane 13.6 ms: every kernel call costs ~0.25 ms, so pieces only bound the transient memory.
PIECE_BYTES = 8 << 20
#: Largest M that takes the int4 kernel, by widths with one plane (b <= 4) / two planes (b > 4).
#: Measured (1 thread, CPU time, 11008x4096, g128, tiled_dequant_linear / int4 kernel):
#: b=4 M=32 108/91 ms, M=64 162/145, M=96 244/232, M=160 355/438; b=2 M=32 129/99, M=96 244/256;
#: b=8 M=16 73/72, M=32 132/157, M=64 207/365.
INT4_KERNEL_MAX_ROWS = {False: 64, True: 16}
#: Largest M for :func:`tiled_dequant_linear` (axis 1); above it, :func:`rows_dequant_linear`, whose
#: one GEMM per block beats the batched skinny GEMMs.  Measured (1 thread, CPU time, 11008x4096,
#: g128, tiled / rows ms): uint3 M=16 77/98, M=64 152/150, M=128 282/254, M=256 517/455;
#: uint8 M=64 173/210, M=128 245/272, M=256 558/470.
TILED_MAX_ROWS = 96
#: Largest M for :func:`native_linear`.  Measured (11008x4096, g128, 2 threads, ms, through the op,
#: native / previous path): uint4 M=1 2.0 / 4.4, M=8 12.0 / 14.3, M=16 24.2 / 23.9; uint2 M=1
#: 2.6 / 9.3, M=8 15.9 / 18.4; uint3 M=1 3.3 / 14.9, M=8 21.5 / 25.5, M=16 46 / 37.
NATIVE_MAX_ROWS = 8
#: Largest M for :func:`native_linear` on axis-0 weights (one pass over the weight per row of x).
NATIVE_MAX_ROWS_AXIS0 = 8
#: The same when the axis-0 GEMV runs as bf16 dot products (AVX512-BF16, 64-row tiles, even K), for
#: one plane (b <= 4; two planes run it twice: half the rows, derived).  Measured (uint3 g128
#: 11008x4096, 2 threads, through the op, ms, native / dequantize path): M=4 6.3 / 81, M=8 22 / 104,
#: M=16 44 / 95, M=24 68 / 86, M=32 91 / 96, M=48 143 / 119.
NATIVE_MAX_ROWS_AXIS0_BF16DOT = 24
#: Largest M for :func:`native_linear` on bf16 activations with the bf16 dot-product kernel
#: (AVX512-BF16), by planes that are 4-bit: b = 4 (one plane) is int4wo's kernel and crossover
#: (:data:`fxquant.ops.int4wo.NATIVE_MAX_ROWS_BF16DOT`); b = 8 runs it twice, so half the rows
#: (derived, not measured separately).
NATIVE_MAX_ROWS_BF16DOT = {4: 56, 8: 28}


def native_max_rows(x2: torch.Tensor, bits: int, nm: _cpu.Numerics) -> int:
    """Rows up to which the native GEMV is used for these activations and this width (bf16 values,
    b = 4 or 8: the bf16 dot-product kernel where the CPU has it)."""
    if nm.bf16_values(x2) and bits in NATIVE_MAX_ROWS_BF16DOT and native_cpu.has_bf16_dot():
        return NATIVE_MAX_ROWS_BF16DOT[bits]
    return NATIVE_MAX_ROWS


def native_max_rows_axis0(x2: torch.Tensor, block_n: int, bits: int, nm: _cpu.Numerics) -> int:
    """Rows up to which the native axis-0 GEMV is used for these activations, tiles and width (its bf16
    form, which rounds ``A = scale * x``, only where the result need not be fp32-exact)."""
    if not nm.exact and block_n == 64 and x2.shape[-1] % 2 == 0 and native_cpu.has_bf16_dot():
        return NATIVE_MAX_ROWS_AXIS0_BF16DOT // (2 if bits > 4 else 1)
    return NATIVE_MAX_ROWS_AXIS0


def dequantize_weight(codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      bits: int, group_size: int, symmetric: bool, axis: int, block_n: int,
                      out_features: int, in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, in_features]``."""
    if symmetric != (offset.numel() == 0):
        raise ValueError(f"linear_intx: symmetric={symmetric} but offset has {offset.numel()} elements "
                         "(symmetric weights store no offset, asymmetric ones one per group)")
    return fmt.from_storage(codes_lo, codes_hi, scale, offset, bits, group_size, axis, block_n, out_features,
                            in_features)


def check(x: torch.Tensor, bias: torch.Tensor | None, codes_lo: torch.Tensor, codes_hi: torch.Tensor,
          scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int, symmetric: bool, axis: int,
          block_n: int, out_features: int, in_features: int) -> None:
    """Planes of ``Np * Kp`` codes (``Np`` = out_features rounded up to 64, ``Kp`` = in_features rounded
    up to whole groups on axis 1): ``codes_lo`` uint8 ``[Np*Kp*min(bits,4)/8]``, ``codes_hi`` uint8
    ``[Np*Kp*(bits-4)/8]`` (empty for bits <= 4); ``scale`` bf16 ``[Kp/g, N]`` (axis 1) or
    ``[ceil(N/g), K]`` (axis 0); ``offset`` like ``scale``, empty when symmetric; ``x``
    ``[..., in_features]``; ``bias`` ``[out_features]``."""
    op = "linear_intx"
    if not (bits in fmt.BITS and axis in fmt.AXES and type(group_size) is int and group_size >= 1
            and block_n in int4.BLOCK_NS and v.is_size(out_features) and v.is_size(in_features)):
        _bad_scalars(op, bits, group_size, axis, block_n, out_features, in_features)
    params = fmt.param_shape(out_features, in_features, group_size, axis)
    layout = _PARAM_LAYOUT[axis]
    v.stored(op, "scale", scale, torch.bfloat16, params, layout)
    v.stored(op, "offset", offset, torch.bfloat16, (0,) if symmetric else params,
             "(empty: symmetric=True)" if symmetric else layout)
    length = int4.padded_rows(out_features) * fmt.stored_in_features(in_features, group_size, axis)
    lo = bits if bits < 4 else 4
    v.stored(op, "codes_lo", codes_lo, torch.uint8, (length * lo // 8,), "[Np*Kp*min(bits,4)/8]")
    v.stored(op, "codes_hi", codes_hi, torch.uint8, (length * (bits - lo) // 8,), "[Np*Kp*max(bits-4,0)/8]")
    v.activations(op, x, in_features)
    v.bias(op, bias, out_features)


def _bad_scalars(op, bits, group_size, axis, block_n, out_features, in_features) -> None:
    for name, value in (("out_features", out_features), ("in_features", in_features)):
        v.size(op, name, value)  # a SymInt passes through torch._check_is_size
    if (bits in fmt.BITS and axis in fmt.AXES and type(group_size) is int and group_size >= 1
            and block_n in int4.BLOCK_NS):
        return
    v.scalars(op, (("bits", bits, bits in fmt.BITS, "1..8"), ("axis", axis, axis in fmt.AXES, "0, 1"),
                   ("group_size", group_size, type(group_size) is int and group_size >= 1, "an integer >= 1"),
                   ("block_n", block_n, block_n in int4.BLOCK_NS, f"an even divisor of {int4.ROW_ALIGN}")))


_PARAM_LAYOUT = {1: "[Kp/g, N]", 0: "[ceil(N/g), K]"}


def int4_kernel_applies(bits: int, group_size: int, axis: int, block_n: int) -> bool:
    """Whether the int4 CPU kernel can compute this layout."""
    return axis == 1 and group_size in fmt.KERNEL_GROUP_SIZES and block_n == int4.native_cpu_block_n()


def int4_kernel_linear(x2: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor, bits: int, group_size: int, block_n: int, out_features: int,
                       piece_bytes: int = PIECE_BYTES) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``[M, Np]`` via ``aten._weight_int4pack_mm_for_cpu`` in bf16 (fp16 for fp16
    ``x2``): one call per plane, per piece of rows when a plane has to be widened."""
    kd = torch.float16 if x2.dtype == torch.float16 else torch.bfloat16
    xk = x2.to(kd).contiguous()
    rows, k = int4.padded_rows(out_features), x2.shape[1]
    planes = [(codes_lo, min(bits, 4))] + ([(codes_hi, bits - 4)] if bits > 4 else [])
    step = rows if bits in AS_STORED_BITS else max(block_n, piece_bytes // (k // 2) // block_n * block_n)
    buf = None if bits in AS_STORED_BITS else torch.empty(min(step, rows) * k // 2, dtype=torch.uint8)
    y = None if step >= rows and bits <= 4 else torch.empty(x2.shape[0], rows, dtype=torch.float32)
    x_sums = None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        params, residual = fmt.int4_kernel_params(scale, offset, bits, r0, r1, kd)
        acc = None
        for (codes, p), sz in zip(planes, params):
            nib = fmt.plane_nibbles(codes, p, rows * k, r0 * k // 2, r1 * k // 2,
                                    out=None if p == 4 else buf[:(r1 - r0) * k // 2])
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, nib.view(r1 - r0, k // 2), group_size, sz)
            acc = part if acc is None else acc.float() + part
        if residual is not None:  # the zeros' rounding, in fp32: sum_k x_k * residual[k // g, n]
            if x_sums is None:
                x_sums = x2.float().view(x2.shape[0], -1, group_size).sum(-1)
            acc = torch.addmm(acc.float(), x_sums, residual)
        if y is None:
            return acc
        y[:, r0:r1] = acc
    return y


def native_linear(x2: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                  offset: torch.Tensor, bits: int, group_size: int, block_n: int,
                  out_features: int, axis: int = 1, nm: _cpu.Numerics = _cpu.Numerics(False, True)) -> torch.Tensor | None:
    """``x2`` ``[M, K]`` -> fp32 ``[M, out_features]`` with the native GEMV (axis 1:
    :func:`native_cpu.int4_tiled_gemv`; axis 0: :func:`native_cpu.int4_tiled_axis0_gemv`), or None
    when it does not apply.  The low plane (``min(b, 4)`` bits) is read in place, shards and all; b > 4 adds
    a pass over the high plane, ``q = lo + 16 hi``:
    ``(q - mid) s + offset = [(lo - mid) s + offset] + 16 [hi s]``.  ``nm``: the call's rounding
    policy (default: fp32, exact)."""
    lo_bits, hi_bits = fmt.plane_bits(bits)
    if axis == 1:
        kernel, kw = native_cpu.int4_tiled_gemv, dict(group_size=group_size)
    else:
        kernel, kw = native_cpu.int4_tiled_axis0_gemv, dict(exact=nm.exact)
    kw.update(block_n=block_n, scale=scale, out_features=out_features, round_x=nm.round_x)
    y = kernel(x2, codes_lo, zero=offset if offset.numel() else None, mid=2.0 ** (bits - 1), plane_bits=lo_bits,
               **kw)
    if y is None or not hi_bits:
        return y
    hi = kernel(x2, codes_hi, zero=None, mid=0.0, plane_bits=hi_bits, **kw)
    return None if hi is None else y.add_(hi, alpha=16)


def tiled_dequant_linear(x2: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                         offset: torch.Tensor, bits: int, group_size: int, axis: int, block_n: int,
                         out_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``[M, Np]`` in ``dtype``: a few tiles at a time, dequantize them in tile order
    into one reused buffer (:func:`fmt.decode_tiles`, no transpose) and multiply right away with one
    batched GEMM (``[M, K] @ [K, block_n/2]`` per half tile), so the decoded weight stays in cache."""
    k, half = x2.shape[1], block_n // 2
    tiles = int4.padded_rows(out_features) // block_n
    step = max(1, fmt.DECODE_BLOCK_BYTES // (block_n * k * torch.finfo(dtype).bits // 8))
    xd = x2.to(dtype)
    y = torch.empty(x2.shape[0], tiles * block_n, dtype=dtype)
    buf = torch.empty(min(step, tiles), 2, k, half, dtype=dtype)
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        w = fmt.decode_tiles(codes_lo, codes_hi, scale, offset, bits, group_size, axis, block_n, out_features,
                             t0, t1, buf[:t1 - t0])
        part = torch.matmul(xd, w.view(-1, k, half))  # [2 * tiles, M, half], rows in order
        y[:, t0 * block_n:t1 * block_n].view(-1, 2 * (t1 - t0), half).copy_(part.transpose(0, 1))
    return y


def rows_dequant_linear(x2: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                        offset: torch.Tensor, bits: int, group_size: int, axis: int, block_n: int,
                        out_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``[M, N]`` in ``dtype``: dequantize a block of rows (row-major,
    :func:`fmt.decode_rows`) into one reused buffer and multiply it right away."""
    k = x2.shape[1]
    step = fmt.block_rows(k, block_n, torch.finfo(dtype).bits // 8)
    xd = x2.to(dtype)
    y = torch.empty(x2.shape[0], out_features, dtype=dtype)
    buf = torch.empty(min(step, out_features), k, dtype=dtype)
    params = fmt.dequant_params(scale, offset, bits)
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        w = fmt.decode_rows(codes_lo, codes_hi, scale, offset, bits, group_size, axis, block_n, out_features,
                            r0, r1, buf[:r1 - r0], params)
        torch.mm(xd, w.t(), out=y[:, r0:r1])
    return y


_warned_layout = False


def _cpu_fast(x2, codes_lo, codes_hi, scale, offset, bits, group_size, symmetric, axis, block_n, out_features,
              in_features, *, nm: _cpu.Numerics):
    """``x2`` ``[M, Kp]`` (zero-padded to the stored columns by the op) -> ``[M, >= out_features]``."""
    global _warned_layout
    if x2.shape[0] <= (native_max_rows(x2, bits, nm) if axis == 1 else native_max_rows_axis0(x2, block_n, bits, nm)):
        y = native_linear(x2, codes_lo, codes_hi, scale, offset, bits, group_size, block_n, out_features, axis, nm)
        if y is not None:
            return y
    elif axis == 1 and nm.bf16_values(x2) and not _cpu.amx():  # AMX: dequantize + oneDNN wins
        y = native_gemm(x2, codes_lo, codes_hi, scale, offset, bits, group_size, block_n, out_features, nm)
        if y is not None:
            return y
    if x2.shape[0] <= INT4_KERNEL_MAX_ROWS[bits > 4] and nm.bf16_gemm(x2):
        if int4_kernel_applies(bits, group_size, axis, block_n):
            return int4_kernel_linear(nm.rounded(x2), codes_lo, codes_hi, scale, offset, bits, group_size, block_n,
                                      out_features)
        native = int4.native_cpu_block_n()
        if not _warned_layout and native is not None and int4_kernel_applies(bits, group_size, axis, native):
            _warned_layout = True
            warnings.warn(f"intx weights were packed with block_n={block_n} but this CPU's int4 kernel uses "
                          f"{native}: using the slower dequantize path. Re-run "
                          "fxquant.compile on this machine for the fast path.", stacklevel=2)
    path = tiled_dequant_linear if axis == 1 and x2.shape[0] <= TILED_MAX_ROWS else rows_dequant_linear
    return path(nm.rounded(x2), codes_lo, codes_hi, scale, offset, bits, group_size, axis, block_n, out_features,
                nm.gemm_dtype(x2))


def native_gemm(x2: torch.Tensor, codes_lo: torch.Tensor, codes_hi: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor, bits: int, group_size: int, block_n: int, out_features: int,
                nm: _cpu.Numerics) -> torch.Tensor | None:
    """``x2`` ``[M, K]`` (bf16 values) -> ``[M, out_features]`` at large M with int4wo's native GEMM
    (axis 1; it decodes the tiles inside it), or None when it does not apply.  A 4-bit plane is its
    tile layout as stored; a 1..3-bit plane is widened to nibble-pair bytes once per call (N * K / 2
    transient bytes, small against an M-row GEMM).  b > 4 (fp32-exact policy only) adds a pass over
    the high plane as :func:`native_linear` does, ``[(lo - mid) s + offset] + 16 [hi s]``, each part on
    fp32 x so that each is an fp32 result (bf16 x is exact in fp32)."""
    lo_bits, hi_bits = fmt.plane_bits(bits)
    if hi_bits and not nm.exact:
        return None
    length, xk = int4.padded_rows(out_features) * x2.shape[1], x2.float() if hi_bits else x2
    kw = dict(block_n=block_n, group_size=group_size, scale=scale, out_features=out_features, exact=nm.exact)
    y = native_cpu.int4_gemm(xk, fmt.plane_nibbles(codes_lo, lo_bits, length),
                             zero=offset if offset.numel() else None, mid=2.0 ** (bits - 1), **kw)
    if y is None or not hi_bits:
        return y
    hi = native_cpu.int4_gemm(xk, fmt.plane_nibbles(codes_hi, hi_bits, length), zero=None, mid=0.0, **kw)
    return None if hi is None else y.add_(hi, alpha=16)


def _cuda(x2, codes_lo, codes_hi, scale, offset, *, bias, bits, group_size, symmetric, axis, block_n, out_features,
          in_features):
    from ..kernels.intx import intx_linear

    return intx_linear(x2, codes_lo, codes_hi, scale, offset, bias, bits=bits, group_size=group_size,
                       symmetric=symmetric, axis=axis, block_n=block_n, out_features=out_features,
                       in_features=in_features)


OP = LinearOpDef(
    name="linear_intx", tensors=("codes_lo", "codes_hi", "scale", "offset"),
    scalars=(("bits", "int"), ("group_size", "int"), ("symmetric", "bool"), ("axis", "int"),
             ("block_n", "int"), ("out_features", "int"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda out_features, **_: out_features, check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, cpu_fast_any_m=True,
    stored_in_features=lambda in_features, group_size, axis, **_: fmt.stored_in_features(in_features, group_size,
                                                                                         axis),
    doc="x [..., in_features]; codes_lo uint8 [Np*Kp*min(bits,4)/8], codes_hi uint8 [Np*Kp*(bits-4)/8] "
        "(int4 tile order, rows padded to Np, columns to whole groups Kp on axis 1); scale/offset bf16 [Kp/g, N] "
        "(axis 1) or [ceil(N/g), K] (axis 0), offset empty if symmetric; bias [out_features] -> [..., out_features]",
)
linear_intx = define(OP)
reference = OP.reference
