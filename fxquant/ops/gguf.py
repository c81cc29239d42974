"""``fxquant::linear_gguf``: a linear on a GGUF block-quantized weight, read as the file stores it.

``y = x @ W.T + bias`` with ``W`` = :func:`fxquant.formats.gguf.dequantize` of ``blocks`` uint8
``[N, K // QK * type_size]`` (``qtype`` one of ``q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k``, a
string argument); ``out_features`` = N, ``in_features`` = K (a multiple of the type's block size).

CPU, under the ``compute_dtype`` policy (:func:`._cpu.numerics`): at M <= :data:`NATIVE_MAX_ROWS` the
native GEMV (:func:`fxquant.kernels.native_gguf.gguf_gemv`, every type) reads the blocks in place: on
bf16 values of x with AVX512-BF16, for the 4/5/6-bit types, per block ``A * sum(c x) + B * sum(x)``
with the integer codes looked up as bf16 (exact products, fp32 sums); otherwise the reference's weight
values decoded in registers times x in fp32.  Either way only the order of fp32 sums differs from the
reference.  Above, and without the native library, rows of ``W`` are decoded a block at a time into one reused
buffer (the native row decoder, else the torch decoders of the format) and multiplied while in cache
(:func:`._dequant_gemm.blocked_linear`): fp32 GEMM on x's values where the result must be fp32-exact,
bf16 (``W`` rounded once to bf16) where a bf16 result is allowed, fp16 for ``compute_dtype=float16``.
CUDA: the Triton kernel (:mod:`fxquant.kernels.gguf`) for every type, decoding in registers.
"""
from __future__ import annotations

import torch

from ..formats import gguf as fmt
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

OP_NAME = "linear_gguf"

#: Largest M for the native GEMV: it decodes every row per call (per 4 rows of x up to 4, then into L1
#: once for all rows) and multiplies in fp32, so its cost grows with M from the weight read upwards,
#: while the decode + GEMM path pays one decode and multiplies at GEMM speed.  Measured (5632x2048,
#: bf16 x, 1 thread, minimum of 15 calls, ms, native / decode + GEMM; the 2-core machine shared with
#: other jobs, load ~9): q4_k M=1 1.5 / 7.1, M=4 2.7 / 13, M=8 13 / 9.9, M=16 24 / 9.4; q8_0 M=1 0.7 / 3.2,
#: M=4 2.3 / 7.6, M=8 7.2 / 8.7, M=16 23 / 9.4.
NATIVE_MAX_ROWS = 8


def dequantize_weight(blocks: torch.Tensor, qtype: str, out_features: int, in_features: int) -> torch.Tensor:
    """Stored blocks -> float32 ``[out_features, in_features]`` (``gguf.quants.dequantize`` bit for bit)."""
    return fmt.dequantize(blocks, qtype, in_features)


def check(x: torch.Tensor, bias: torch.Tensor | None, blocks: torch.Tensor, qtype: str, out_features: int,
          in_features: int) -> None:
    """``blocks`` uint8 ``[N, K // QK * type_size]``; ``qtype`` a supported type name; ``x`` ``[..., K]``;
    ``bias`` ``[N]``."""
    op = OP_NAME
    q = fmt.QTYPES.get(qtype) if type(qtype) is str else None
    if q is None:
        v.fail(op, f"qtype={qtype!r} is not supported; valid: {', '.join(fmt.QTYPES)}")
    v.size(op, "out_features", out_features)
    v.size(op, "in_features", in_features)
    if type(in_features) is int and in_features % q.block_size:
        v.fail(op, f"in_features={in_features} is not a multiple of the {qtype} block size {q.block_size}")
    v.stored(op, "blocks", blocks, torch.uint8, (out_features, in_features // q.block_size * q.type_size),
             f"[N, K / {q.block_size} * {q.type_size}] ({qtype} blocks of {q.block_size} values in "
             f"{q.type_size} bytes)")
    v.activations(op, x, in_features)
    v.bias(op, bias, out_features)


def _cpu_fast(x2: torch.Tensor, blocks: torch.Tensor, qtype: str, out_features: int, in_features: int, *,
              nm: _cpu.Numerics) -> torch.Tensor | None:
    """The native GEMV at small M (None above, or without the library: the blocked decode path)."""
    if x2.shape[0] > NATIVE_MAX_ROWS:
        return None
    from ..kernels.native_gguf import gguf_gemv

    return gguf_gemv(x2, blocks, qtype, round_x=nm.round_x)


def _block_decoder(blocks, qtype, out_features, in_features, dtype):
    """Rows of ``W`` decoded into the GEMM's buffer (native decoder, else the format's torch one)."""
    from ..kernels.native_gguf import gguf_decoder

    decode = gguf_decoder(blocks, qtype, in_features)
    if decode is None:
        def decode(r0: int, r1: int, out: torch.Tensor) -> None:
            fmt.decode_rows(blocks, qtype, r0, r1, out)
    return decode, None, 1


def _cuda(x2, blocks, *, bias, qtype, out_features, in_features):
    from ..kernels.gguf import gguf_linear

    return gguf_linear(x2, blocks, bias, qtype=qtype, out_features=out_features, in_features=in_features)


OP = LinearOpDef(
    name=OP_NAME, tensors=("blocks",),
    scalars=(("qtype", "str"), ("out_features", "int"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda out_features, **_: out_features, check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, block_decoder=_block_decoder, cpu_fast_any_m=True,
    doc="x [..., K]; blocks uint8 [N, K/QK*type_size] (GGUF rows as stored in the file); qtype in q4_0, q4_1, "
        "q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k; bias [N] -> [..., N]; W = gguf.quants.dequantize(blocks)",
)
linear_gguf = define(OP)
reference = OP.reference
