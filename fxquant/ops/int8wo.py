"""``fxquant::linear_int8wo``: int8 per-channel weight-only linear.

``y = x @ (qweight * scale[:, None]).T + bias``; layout in :mod:`fxquant.formats.int8`.
CPU fast path: at M <= :func:`native_max_rows` the native GEMV (:mod:`fxquant.kernels.native_cpu`, fp32
products and sums, x rounded to bf16 in C when the ``compute_dtype`` policy rounds it); up to
:func:`packed_max_rows` ``torch._weight_int8pack_mm`` on bf16 values where a bf16 output is allowed
(bf16 activations or ``compute_dtype=bfloat16``; for fp32 / fp16 ones the native GEMV instead); above,
on bf16 values with AVX512-BF16, the native GEMM that decodes weight panels inside it
(:func:`fxquant.kernels.native_cpu.int8_gemm`: exact products, fp32 sums and an fp32 result for fp32
x), else blocked dequantize + dense GEMM (:func:`._cpu.Numerics.gemm_dtype`).  Every path: the codes
are exact in bf16 and the scale multiplies the fp32 sums, so only x's rounding (the policy's) and the
summation order separate them.  CUDA: the Triton kernel in :mod:`fxquant.kernels.int8wo`.
"""
from __future__ import annotations

import torch

from ..formats import int8 as fmt
from ..kernels import native_cpu
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

#: Largest M for the native GEMV (:func:`fxquant.kernels.native_cpu.int8_gemv`) with the AVX2
#: kernels; above it ``_weight_int8pack_mm``.  Measured (11008x4096, 2 threads, AVX2, ms, native /
#: int8pack): M=1 1.89 / 2.81, M=2 2.75 / 2.98, M=4 5.68 / 4.40; through the op (native library on /
#: off): M=1 2.5 / 3.8, M=2 3.8 / 4.3, M=4 7.9 / 7.1.
NATIVE_MAX_ROWS = 2
#: The same with the AVX-512 kernel (prefetching, 46 GB/s at M=1), which routes before the
#: int8pack / blocked paths.  Measured (Zen 4, 11008x4096, 2 threads, medians, ms, native / op
#: without it / bf16 F.linear): M=4 2.76 / 3.68 / 6.3, M=8 5.01 / 6.78 / 6.85, M=12 7.53 / 9.31 /
#: 7.84, M=16 9.27 / 9.03 / 8.16, M=24 15.2 / 12.9 / 10.7.
NATIVE_MAX_ROWS_AVX512 = 12


def native_max_rows() -> int:
    """Rows up to which the native GEMV runs with the kernels loaded here."""
    return NATIVE_MAX_ROWS_AVX512 if native_cpu.isa() == "avx512" else NATIVE_MAX_ROWS


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]``."""
    return fmt.dequantize(qweight, scale)


def check(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scale: torch.Tensor,
          op: str = "linear_int8wo") -> None:
    """The int8 weight's arguments (also ``linear_int8dq`` / ``linear_llm_int8``'s): ``qweight`` int8
    ``[N, K]``, ``scale`` bf16 ``[N]``, ``x`` ``[..., K]``, ``bias`` ``[N]``."""
    n, k = v.matrix(op, "qweight", qweight, (torch.int8,))
    v.stored(op, "scale", scale, torch.bfloat16, (n,), "[N]")
    v.activations(op, x, k)
    v.bias(op, bias, n)


def packed_max_rows() -> int:
    """Rows below which ``_weight_int8pack_mm`` beats blocked dequantize + dense GEMM here.

    Measured (11008x4096, 2 threads, ms): AVX2 Zen 3, fp32 GEMM (int8pack / blocked): M=32 36 / 62,
    M=64 94 / 91, M=96 137 / 86, M=128 151 / 104, M=192 273 / 137 -> 64.  Zen 4, bf16 GEMM
    (int8pack / blocked / bf16 F.linear, median): M=8 6.1 / 12.7 / 7.7, M=12 8.9 / 9.2 / 7.4,
    M=16 11.7 / 10.2 / 7.7, M=32 23.1 / 14.6 / 11.5 -> 12."""
    return min(_cpu.large_m_threshold(), 12 if _cpu.dense_dtype() == torch.bfloat16 else 64)


def native_row_limit(nm: _cpu.Numerics) -> int:
    """Rows up to which the op runs the native GEMV: its own limit, and where the result must be
    fp32-exact also the packed kernel's rows (int8pack's output is bf16)."""
    return max(native_max_rows(), packed_max_rows() - 1) if nm.exact else native_max_rows()


def _cpu_fast(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *, nm: _cpu.Numerics) -> torch.Tensor | None:
    m, packed = x2.shape[0], packed_max_rows()
    # the native GEMV; where the result must be fp32-exact it also takes int8pack's rows (int8pack's
    # output is bf16).  Cost there, from the AVX2 numbers above (not measured again): the GEMV is linear
    # in M, ~1.4 ms per row against int8pack's ~1.1 and the blocked path's 62 ms at M=32
    if m <= native_row_limit(nm):
        y = native_cpu.int8_gemv(x2, qweight, scale, round_x=nm.round_x)
        if y is not None:
            return y
    if m >= packed:
        if nm.bf16_values(x2) and not _cpu.amx():  # with AMX, dequantize + oneDNN's GEMM wins
            y = native_cpu.int8_gemm(x2, qweight, scale)  # decodes panels inside the GEMM (AVX512-BF16)
            if y is not None:
                return y
        return None  # blocked dequantize + dense GEMM
    # int8pack: fp32 input is 10-50x slower, and its bf16 output is allowed only where nm says so
    if not nm.bf16_gemm(x2) or not _cpu.int8pack_k_ok(x2.shape[1]):  # (wrong there: test_weight_only_ops.py)
        return None
    return torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), qweight, scale.to(torch.bfloat16))


def _block_decoder(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """Large-M CPU path: rows of codes converted into the GEMM buffer (exact in bf16 and fp32); the
    scale goes on the output.  bf16: the native converter (:func:`native_cpu.int8_decoder`)."""
    if dtype == torch.bfloat16:
        native = native_cpu.int8_decoder(qweight)
        if native is not None:
            return native, scale, 1

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        out.copy_(qweight[r0:r1])
    return decode, scale, 1


def _cuda(x2, qweight, scale, *, bias):
    from ..kernels.int8wo import int8wo_linear

    return int8wo_linear(x2, qweight, scale, bias)


OP = LinearOpDef(
    name="linear_int8wo", tensors=("qweight", "scale"), scalars=(),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, block_decoder=_block_decoder,
    cpu_fast_any_m=True,  # _cpu_fast routes by M (packed_max_rows()) and returns None above
    doc="x [..., K]; qweight int8 [N, K]; scale bf16 [N]; bias [N] -> [..., N]",
)
linear_int8wo = define(OP)
reference = OP.reference
