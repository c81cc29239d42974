"""``fxquant::linear_fpx``: sub-byte floating point (``fp<X>_e<A>m<B>``) weight-only linear.

``y = x @ (decode(unpack(qweight)) * scale[:, None]).T + bias``; format, bit-plane layout and
scales in :mod:`fxquant.formats.fpx`.  CPU: no PyTorch kernel reads these codes, so at every M
the op unpacks and decodes the weight a block of rows at a time (byte ops, then exact float16 bit
moves for ``A <= 4`` or the ``2^X``-entry table) and multiplies each block while it is in cache
(:func:`._dequant_gemm.blocked_linear`, in :meth:`._cpu.Numerics.gemm_dtype`); fp6_e3m2, 11008x4096,
2 threads, M=256: 228 ms vs 654 ms for the reference.  3- and 4-bit formats at M <= ``NATIVE_MAX_ROWS``:
the native GEMV (:func:`fxquant.kernels.native_cpu.fpx_gemv`) reads the planes in place (every fpX value
is a bf16 number, so its bf16 dot-product form is exact on bf16 values).  CUDA: Triton kernel in
:mod:`fxquant.kernels.fpx`.
"""
from __future__ import annotations

import torch

from ..formats import fpx as fmt
from ..kernels import native_cpu
from . import _cpu
from . import _validate as v
from ._dequant_gemm import blocked_linear, plan_rows

#: Largest M for the native GEMV of 3- and 4-bit formats (:func:`fxquant.kernels.native_cpu.fpx_gemv`).
#: Measured (fp4_e2m1, 11008x4096, 2 threads, ms, native / blocked decode + GEMM): M=1 4.6 / 23,
#: M=8 19 / 66, M=16 44 / 78, M=32 80 / 68.
NATIVE_MAX_ROWS = 16
from ._linear import LinearOpDef, define


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, ebits: int, mbits: int,
                      in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, in_features]``."""
    return fmt.from_storage(qweight, scale, ebits, mbits, in_features)


def check(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scale: torch.Tensor, ebits: int,
          mbits: int, in_features: int) -> None:
    """``qweight`` uint8 ``[N, ceil(K/8) * X]`` (``X = 1 + ebits + mbits`` in 3..7), ``scale`` bf16
    ``[N]``, ``x`` ``[..., in_features]``, ``bias`` ``[N]``."""
    op = "linear_fpx"
    bits = 1 + ebits + mbits
    if type(ebits) is not int or type(mbits) is not int or ebits < 1 or mbits < 0 or not 3 <= bits <= 7:
        v.fail(op, f"ebits={ebits!r}, mbits={mbits!r} is not supported; valid: ebits >= 1, mbits >= 0, "
                   f"1 + ebits + mbits in 3..7")
    v.size(op, "in_features", in_features)
    n, _ = v.matrix(op, "qweight", qweight, (torch.uint8,))
    v.stored(op, "qweight", qweight, torch.uint8, (n, fmt.packed_cols(in_features, bits)), "[N, ceil(K/8) * X]")
    v.stored(op, "scale", scale, torch.bfloat16, (n,), "[N]")
    v.activations(op, x, in_features)
    v.bias(op, bias, n)


def _native(x2, qweight, scale, ebits, mbits, in_features, bits, nm):
    """3- and 4-bit codes read in place by a native GEMV (fp32), or None.  4 bits: one plane of
    nibbles through the exact 16-entry table lookup (:func:`native_cpu.lut4_gemv`: the low nibble
    of byte ``j`` is code ``j``, the high one code ``Kp/2 + j``), measured 10% faster here than the
    integer-table kernel; 3 bits: :func:`native_cpu.fpx_gemv` on the 2-bit and 1-bit planes."""
    table = fmt.decode_table(ebits, mbits)
    if bits == 3:
        return native_cpu.fpx_gemv(x2, qweight, scale, table, bits, in_features, round_x=nm.round_x)
    cols = fmt.packed_cols(in_features, bits)
    xp = torch.nn.functional.pad(x2, (0, 2 * cols - in_features))
    return native_cpu.lut4_gemv(xp[:, cols:], xp[:, :cols], qweight, rows=qweight.shape[0], row_bytes=cols,
                                table=table, block_bytes=cols, scale=scale, round_x=nm.round_x)


def _cpu_fast(x2, qweight, scale, ebits, mbits, in_features, *, nm: _cpu.Numerics):
    """Blocked unpack + decode + GEMM.  Decode: exact float16 bit moves for ``ebits <= 4``, else the
    table gather; the float16 path's power-of-two factor joins the per-row scale."""
    dt, bits, n = nm.gemm_dtype(x2), 1 + ebits + mbits, qweight.shape[0]
    if bits <= 4 and x2.shape[0] <= NATIVE_MAX_ROWS:
        y = _native(x2, qweight, scale, ebits, mbits, in_features, bits, nm)
        if y is not None:
            return y
    x2 = nm.rounded(x2)
    rows = min(n, plan_rows(x2, in_features, dt, exact_in_bf16=True))
    codes = torch.empty(rows, fmt.padded_k(in_features), dtype=torch.uint8)
    scratch = torch.empty(rows, in_features, dtype=torch.int16)
    via_fp16 = ebits <= 4

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        c = fmt.unpack(qweight[r0:r1], bits, in_features, top_aligned=via_fp16, out=codes[: r1 - r0])
        if via_fp16:
            out.copy_(fmt.fp16_scaled(c, ebits, scratch=scratch[: r1 - r0]))
        else:
            out.copy_(fmt.decode(c, ebits, mbits, out.dtype))

    factor = 2.0 ** fmt.fp16_exponent_offset(ebits) if via_fp16 else 1.0
    return blocked_linear(x2, n, in_features, decode, scale.float() * factor, dt, rows,
                          exact_in_bf16=True)  # fpX values (at most 5 mantissa bits) are bf16 numbers


def _cuda(x2, qweight, scale, *, bias, ebits, mbits, in_features):
    from ..kernels.fpx import fpx_linear

    return fpx_linear(x2, qweight, scale, bias, ebits=ebits, mbits=mbits, in_features=in_features)


OP = LinearOpDef(
    name="linear_fpx", tensors=("qweight", "scale"),
    scalars=(("ebits", "int"), ("mbits", "int"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, cpu_fast_any_m=True,
    doc="x [..., K]; qweight uint8 [N, ceil(K/8) * X] (X = 1 + ebits + mbits, little-endian bit stream per "
        "row); scale bf16 [N]; bias [N] -> [..., N]",
)
linear_fpx = define(OP)
reference = OP.reference
