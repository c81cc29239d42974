"""``fxquant::linear_float8wo`` and ``fxquant::linear_float8dq``: float8 weights.

``linear_float8wo``: ``y = x @ (decode(qweight) * scale[:, None]).T + bias`` (float activations).
``linear_float8dq``: ``y = x̂ @ Ŵ.T + bias`` where ``x̂ = dequant(quant_float8(x))`` is the
activation after dynamic float8 quantization (per tensor or per row, amax clamped to
``activation_scale_ub``) and ``Ŵ = decode(qweight) * scale``; the weight uses the same granularity.
Layouts and math: :mod:`fxquant.formats.float8`.

CPU: no PyTorch CPU kernel reads float8 weights faster than dequantizing them (``torch._scaled_mm``
works on the CPU but is slower than decoding: docs/formats/float8.md), so at every M both ops
decode the weight a block of rows at a time (exact float16 bit moves) and multiply each block while
it is in cache (:func:`._dequant_gemm.blocked_linear`, in :meth:`._cpu.Numerics.gemm_dtype`: bf16
where a bf16 output is allowed, else fp32 on x's values, rounded to bf16 first where the policy says);
measured 11008x4096, 2 threads: M=128 131 ms vs 486 ms for the reference's whole-weight dequantize,
M=256 185 vs 558.  ``linear_float8dq`` quantizes its activations itself: under ``compute_dtype=None``
they are never rounded to bf16: the GEMM takes their float8 codes (bf16 numbers: exact products) and
the activation scale multiplies its fp32 result.  CUDA: Triton kernels in
:mod:`fxquant.kernels.float8`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import float8 as fmt
from . import _cpu
from . import _validate as v
from ._dequant_gemm import blocked_linear, plan_rows
from ._linear import LinearOpDef, define


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, **_) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]``."""
    return fmt.dequantize_weight(qweight, scale)


_FLOAT8 = tuple(fmt.DTYPES.values())


def _check_weight(op: str, x, bias, qweight, scale, granularity: str | None, dtypes: tuple) -> None:
    """``granularity`` "row" / "tensor" fixes the scale's shape; ``None`` takes either."""
    n, k = v.matrix(op, "qweight", qweight, dtypes)
    shapes = ((n,), (1,)) if granularity is None else ((n,),) if granularity == "row" else ((1,),)
    v.stored_any(op, "scale", scale, (torch.float32,), shapes, "([N] per row, [1] per tensor)")
    v.activations(op, x, k)
    v.bias(op, bias, n)


def check_wo(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """``qweight`` float8 (e4m3fn / e5m2) ``[N, K]``, ``scale`` fp32 ``[N]`` or ``[1]``, ``x``
    ``[..., K]``, ``bias`` ``[N]``."""
    _check_weight("linear_float8wo", x, bias, qweight, scale, None, _FLOAT8)


def check_dq(x: torch.Tensor, bias: torch.Tensor | None, qweight: torch.Tensor, scale: torch.Tensor,
             granularity: str, activation_scale_ub: float) -> None:
    """As :func:`check_wo` with ``qweight`` float8_e4m3fn (the activations are quantized to it), ``scale``
    ``[N]`` for granularity "row", ``[1]`` for "tensor"."""
    op = "linear_float8dq"
    if granularity not in fmt.GRANULARITIES:
        v.fail(op, f"granularity={granularity!r} is not supported; valid: {', '.join(fmt.GRANULARITIES)}")
    if not activation_scale_ub > 0:
        v.fail(op, f"activation_scale_ub={activation_scale_ub!r} is not supported; valid: a float > 0")
    _check_weight(op, x, bias, qweight, scale, granularity, (torch.float8_e4m3fn,))


def _cpu_fast_wo(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *, nm: _cpu.Numerics) -> torch.Tensor:
    """``x2 @ (decode(qweight) * scale).T``, decoded block by block (exact float16 bit moves, then
    the GEMM's dtype); the float16 path's power-of-two factor joins the per-row scale."""
    dt, x2 = nm.gemm_dtype(x2), nm.rounded(x2)
    n, k = qweight.shape
    rows = min(n, plan_rows(x2, k, dt, exact_in_bf16=True))
    scratch = torch.empty(rows, k, dtype=torch.int16)
    offset = fmt.EXPONENT_OFFSET[qweight.dtype]

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        out.copy_(fmt.decode_fp16_scaled(qweight[r0:r1], scratch=scratch[: r1 - r0])[0])

    return blocked_linear(x2, n, k, decode, scale.float().expand(n) * 2.0**offset, dt, rows,
                          exact_in_bf16=True)  # float8 values are bf16 numbers


def _cuda_wo(x2, qweight, scale, *, bias):
    from ..kernels.float8 import float8wo_linear

    return float8wo_linear(x2, qweight, scale, bias)


OP_WO = LinearOpDef(
    name="linear_float8wo", tensors=("qweight", "scale"), scalars=(),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check_wo,
    cpu_fast=_cpu_fast_wo, cuda=_cuda_wo, cpu_fast_any_m=True,
    doc="x [..., K]; qweight float8_e4m3fn/e5m2 [N, K]; scale fp32 [N]; bias [N] -> [..., N]",
)
linear_float8wo = define(OP_WO)
reference_wo = OP_WO.reference


def dq_definition(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *, bias: torch.Tensor | None,
                 granularity: str, activation_scale_ub: float, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """The definition of ``linear_float8dq``: fake-quantize ``x`` to float8 (in ``qweight``'s
    dtype), dequantize the weight, ``F.linear`` in ``compute_dtype`` (fp32 when ``None``)."""
    fmt.check_granularity(granularity)
    x2 = x.reshape(-1, x.shape[-1])
    xh = fmt.fake_quantize_activation(x2, qweight.dtype, granularity, activation_scale_ub)
    w = fmt.dequantize_weight(qweight, scale)
    cd = compute_dtype or torch.float32
    y = F.linear(xh.to(cd), w.to(cd), None if bias is None else bias.to(cd))
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def _cpu_fast_dq(x2, qweight, scale, granularity, activation_scale_ub, *, nm: _cpu.Numerics):
    q, sx = fmt.quantize_activation(x2, qweight.dtype, granularity, activation_scale_ub)
    if nm.round_x:  # compute_dtype=bfloat16: the definition rounds x̂ = q * s to bf16
        return _cpu_fast_wo(fmt.decode(q) * sx, qweight, scale, nm=nm)
    # x̂ = q * s, q's values bf16 numbers: the GEMM on q (exact products), s applied in fp32 after it
    return _cpu_fast_wo(fmt.decode(q, torch.bfloat16), qweight, scale, nm=nm).float().mul_(sx)


def _cuda_dq(x2, qweight, scale, *, bias, granularity, activation_scale_ub):
    from ..kernels.float8 import float8dq_linear

    return float8dq_linear(x2, qweight, scale, bias, granularity=granularity,
                           activation_scale_ub=activation_scale_ub)


OP_DQ = LinearOpDef(
    name="linear_float8dq", tensors=("qweight", "scale"),
    scalars=(("granularity", "str"), ("activation_scale_ub", "float")),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0], check=check_dq,
    cpu_fast=_cpu_fast_dq, cuda=_cuda_dq, reference_fn=dq_definition, cpu_fast_any_m=True,
    dynamic_activations=True,
    doc="x [..., K]; qweight float8_e4m3fn [N, K]; scale fp32 [N] (granularity 'row') or [1] ('tensor'); "
        "bias [N] -> [..., N]; activations quantized to float8 per call",
)
linear_float8dq = define(OP_DQ)
reference_dq = OP_DQ.reference
