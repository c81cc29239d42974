"""``fxquant::linear_affine``: integer affine weight-only linear with integer zero points.

``y = x @ W.T + bias`` with ``W[n, k] = (q[n, k] - z[n, j]) * s[n, j]``, ``j = k // group_size``
(``z = 2**(bits-1)`` when ``symmetric``); layout, rounding and exactness in
:mod:`fxquant.formats.affine` (compressed-tensors' ``pack-quantized`` tensors as they are stored).

CPU (every ``compute_dtype``, under the policy of :func:`._cpu.numerics`): up to
:data:`NATIVE_MAX_ROWS` rows of x, the native GEMV (``fxquant/kernels/native_affine.c``) reads
``qweight`` in place: per row and group ``s * sum (q - z) x`` in fp32 (x rounded to bf16 in the kernel
where the policy rounds it; fp32 result).  Above, rows of ``W`` are decoded a block at a time
(``(q - z) * s`` in fp32, rounded once to the GEMM's dtype) into one reused buffer and multiplied while
in cache (:func:`._dequant_gemm.blocked_linear`): fp32 GEMM on x's values (rounded to bf16 where the
policy rounds them), a bf16 GEMM only where a bf16 result is allowed, fp16 for
``compute_dtype=float16``.  CUDA runs the reference (no Triton kernel).
"""
from __future__ import annotations

import torch

from ..formats import affine as fmt
from ..kernels import native_affine, native_decode
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

OP_NAME = "linear_affine"
#: rows of x up to which the native GEMV runs; above, the blocked dequantize path.  Measured (4096 x 4096
#: affine4-g128-fp16, fp32 x, 2 threads, the machine loaded by other jobs, min ms, native AVX-512 / AVX2
#: vs blocked fp32): M=1 0.7 / 2.6 vs 496; M=32 56 / 136 vs 220; M=48 82 / 165 vs 96.
NATIVE_MAX_ROWS = 32
_SCALES: dict = {}  # stored scale -> its fp32 copy (exact), what the native GEMV reads


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                      group_size: int, symmetric: bool, in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, in_features]``."""
    return fmt.dequantize(qweight, scale, zero_point, bits, group_size, in_features)


def check(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scale: torch.Tensor,
          zero_point: torch.Tensor, bits: int, group_size: int, symmetric: bool, in_features: int) -> None:
    """``qweight`` int32 ``[N, ceil(K*bits/32)]``; ``scale`` bf16 / fp16 / fp32 ``[N, ceil(K/g)]``;
    ``zero_point`` uint8 like ``scale`` (empty ``(0,)`` when symmetric); ``x`` ``[..., K]``; ``bias`` ``[N]``."""
    op = OP_NAME
    if not (bits in fmt.BITS and type(group_size) is int and group_size >= 1 and type(symmetric) is bool
            and v.is_size(in_features)):
        v.size(op, "in_features", in_features)
        v.scalars(op, (("bits", bits, bits in fmt.BITS, "1..8"),
                       ("group_size", group_size, type(group_size) is int and group_size >= 1, "an integer >= 1"),
                       ("symmetric", symmetric, type(symmetric) is bool, "True, False")))
    n = v.matrix(op, "qweight", qweight, (torch.int32,))[0]
    words = -(-in_features * bits // 32)
    v.stored(op, "qweight", qweight, torch.int32, (n, words), "[N, ceil(K*bits/32)]")
    params = (n, -(-in_features // group_size))
    v.stored_any(op, "scale", scale, fmt.SCALE_DTYPES, (params,), "[N, ceil(K/g)]")
    v.stored(op, "zero_point", zero_point, torch.uint8, (0,) if symmetric else params,
             "(empty: symmetric=True)" if symmetric else "[N, ceil(K/g)]")
    v.activations(op, x, in_features)
    v.bias(op, bias, n)


def native_linear(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                  group_size: int, symmetric: bool, nm: _cpu.Numerics) -> torch.Tensor | None:
    """fp32 ``[M, N]`` from the native GEMV for ``M <= NATIVE_MAX_ROWS`` (``None`` otherwise, or without
    the native library); ``nm``: the call's policy (whether x is rounded to bf16)."""
    if x2.shape[0] > NATIVE_MAX_ROWS:
        return None
    s = _cpu.memo_per_tensor(_SCALES, scale, lambda t: t.float().contiguous())
    return native_affine.affine_gemv(x2, qweight, s, None if symmetric else zero_point, bits=bits,
                                     group_size=group_size, round_x=nm.round_x)


def _cpu_fast(xs, qweight, scale, zero_point, bits, group_size, symmetric, in_features, nm):
    return native_linear(xs, qweight, scale, zero_point, bits, group_size, symmetric, nm)


def _block_decoder(qweight, scale, zero_point, bits, group_size, symmetric, in_features, dtype):
    """Rows of ``W`` (scaled: the scale is per group, not per row) decoded into the GEMM's buffer: the native
    decoder (AVX512-BF16; bf16 or fp32 blocks) where it applies, else :func:`fxquant.formats.affine.decode_rows`
    (the same values)."""
    s = _cpu.memo_per_tensor(_SCALES, scale, lambda t: t.float().contiguous()) if dtype != torch.float16 else None
    zero = None if symmetric else zero_point

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        if s is None or not native_decode.affine_rows_into(qweight, bits=bits, group_size=group_size,
                                                           in_features=in_features, scale=s, zero=zero, r0=r0,
                                                           r1=r1, out=out):
            fmt.decode_rows(qweight, scale, zero_point, bits, group_size, in_features, r0, r1, out)
    return decode, None, 1


OP = LinearOpDef(
    name=OP_NAME, tensors=("qweight", "scale", "zero_point"),
    scalars=(("bits", "int"), ("group_size", "int"), ("symmetric", "bool"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check,
    block_decoder=_block_decoder, cpu_fast=_cpu_fast,
    doc="x [..., K]; qweight int32 [N, ceil(K*bits/32)] (rows of little-endian bit streams); scale bf16/fp16/fp32 "
        "[N, ceil(K/g)]; zero_point uint8 [N, ceil(K/g)] (empty if symmetric: z = 2**(bits-1)); bias [N] "
        "-> [..., N]; W = (q - z) * scale",
)
linear_affine = define(OP)
reference = OP.reference
