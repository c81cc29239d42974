"""``fxquant::linear_int8dq`` and ``fxquant::linear_llm_int8``: dynamic int8 activations x int8 weights.

Both ops take ``qweight`` int8 ``[N, K]`` and ``scale`` bf16 ``[N]`` (:mod:`fxquant.formats.int8`)
and quantize ``x`` per token at run time (:mod:`fxquant.formats.int8dq` holds every rounding rule).
They are not "dequantize W, then a float GEMM", so each gives its own definition
(``LinearOpDef.reference_fn``)::

    linear_int8dq:   y = (acc * sx) * scale + bias,  acc = qx @ qweight.T exactly (int32)
    linear_llm_int8: the same on the non-outlier columns
                     + where(outlier_col, x, 0) @ (qweight * scale).T    (float)

The float parts (rescale, outlier matmul, bias) run in ``compute_dtype`` (fp32 when ``None``).  The
ops quantize their activations themselves, so ``compute_dtype=None`` rounds nothing to bf16 on any CPU
(:func:`._cpu.numerics`): integer products exact, everything else fp32.

CPU fast path (``compute_dtype`` None, fp32 or bf16; at every M: ``cpu_fast_any_m``): the integer product,
see :func:`cpu_int8_matmul`: at small M the native int8 GEMV / GEMM on the codes (exact, fp32 result)
or, where a bf16 result is allowed, ``torch._weight_int8pack_mm`` fed the codes as bf16; at larger M
oneDNN's int8 GEMM (``onednn::qlinear_pointwise``, the kernel Inductor's x86 int8 path uses);
LLM.int8 gathers the outlier columns (eager, inside the op: the graph still sees a static output
shape) and multiplies only those in fp32.
CUDA: :mod:`fxquant.kernels.int8dq`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..formats import int8dq as fmt
from ..kernels import native_cpu
from . import _cpu, int8wo
from . import _validate as v
from ._linear import LinearOpDef, define
from .int8wo import check as _check_int8

# -- the definitions -----------------------------------------------------------------------------


def _rescale(acc: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``(acc * sx) * scale`` in ``cd``: int32/fp32 ``acc [M, N]``, fp32 ``sx [M, 1]``, ``scale [N]``."""
    return acc.to(cd) * sx.to(cd) * scale.to(cd)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def reference_int8dq(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
                     bias: torch.Tensor | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Definition of ``linear_int8dq``: ``x [..., K]`` float -> ``[..., N]`` in ``x.dtype``."""
    cd = compute_dtype or torch.float32
    qx, sx = fmt.quantize_activations(x.reshape(-1, x.shape[-1]))
    return _finish(_rescale(fmt.int8_matmul(qx, qweight), sx, scale, cd), x, bias, cd)


def reference_llm_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
                       bias: torch.Tensor | None, threshold: float,
                       compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Definition of ``linear_llm_int8`` with static shapes (masks, no data-dependent sizes)."""
    cd = compute_dtype or torch.float32
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx, cols = fmt.quantize_activations_llm(x2, threshold)
    y = _rescale(fmt.int8_matmul(qx, qweight), sx, scale, cd)
    x_out = torch.where(cols, x2.to(cd), 0)
    y = y + F.linear(x_out, fmt.dequantize_weight(qweight, scale).to(cd))
    return _finish(y, x, bias, cd)


# -- CPU: the integer product -----------------------------------------------------------------------
#: Rows up to which ``_weight_int8pack_mm`` (reads the plain int8 weight, GEMV-style) is used.
#: Measured (11008x4096, 2 threads, AVX2 EPYC, medians of 30 under load): int8pack / oneDNN-split
#: 18.6 / 32.1 ms at M=1, 81 / 87 ms at M=16, 225 / 190 ms at M=32, 318 / 213 ms at M=64.
INT8PACK_MAX_M = 16
_PACKED: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(qweight) -> ((data_ptr, version), packed)


def cpu_int8_matmul(qx: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor | None = None,
                    exact: bool = True) -> torch.Tensor:
    """``(qx @ qweight.T) * scale`` for int8 ``[M, K]`` x ``[N, K]`` -> fp32 ``[M, N]`` on the CPU
    (``scale`` ``[N]``: the weight scale, or ``None`` for the bare integer product).

    - ``M <= INT8PACK_MAX_M`` with the native kernels: int8wo's native GEMV up to its rows, then its
      native GEMM (AVX512-BF16), on the codes (exact in fp32 and bf16): exact products, fp32 sums,
      times the weight scale in fp32.
    - else, ``M <= INT8PACK_MAX_M`` and not ``exact``: ``_weight_int8pack_mm`` on the codes as bf16 (exact), fp32
      accumulation, times the bf16 weight ``scale``, rounded to bf16 by the kernel: relative error
      ``<= 2^-9`` per output, well below the int8 error (~1e-2).  (fp16 codes would be exact to ``2^-12``
      but that kernel is 30x slower here: 110 ms vs 3.2 ms at M=1, 11008x4096.)  Needs
      :func:`._cpu.int8pack_k_ok` (the kernel is wrong otherwise).
    - otherwise oneDNN's u8 x s8 -> s32 GEMM when :func:`onednn_mode` says it is exact here:
      results are the exact integers while ``|acc| < 2^24``, except that with AMX oneDNN converts the
      shifted sum ``sum((q + 128) * w)`` to fp32 before subtracting its zero-point compensation:
      off by one ulp of that sum (1 in ~8.7e6 at K=1040 on +-127 codes), far below the int8 error.
    - else :func:`fxquant.formats.int8dq.int8_matmul` (exact, fp32 GEMMs over K-chunks).
    """
    if scale is not None and qx.shape[0] <= INT8PACK_MAX_M:
        y = None
        if qx.shape[0] <= int8wo.native_max_rows():
            y = native_cpu.int8_gemv(qx, qweight, scale)
        if y is None:
            y = native_cpu.int8_gemm(qx, qweight, scale, fp32_out=True)
        if y is not None:
            return y
        if not exact and _int8pack_applies(*qx.shape):
            return torch._weight_int8pack_mm(qx.to(torch.bfloat16), qweight, scale.to(torch.bfloat16)).float()
    mode = onednn_mode()
    acc = _onednn_matmul(qx, _packed(qweight), mode) if mode else fmt.int8_matmul(qx, qweight).float()
    return acc if scale is None else acc.mul_(scale.float())


def _int8pack_applies(m: int, k: int) -> bool:
    return m <= INT8PACK_MAX_M and _cpu.int8pack_k_ok(k)


def _onednn_matmul(qx: torch.Tensor, packed: torch.Tensor, mode: str) -> torch.Tensor:
    n = packed.shape[1]
    ones, zeros = _unit_scales(n)
    if mode == "shifted":  # u8 = q + 128 with zero point 128: one GEMM (VNNI / AMX)
        u8, zp = (qx.to(torch.int16) + 128).to(torch.uint8), 128
    else:  # "split": q = p - n with p, n in [0, 127], so no u8 x s8 pair sum saturates int16
        u8, zp = torch.cat([qx.clamp(min=0), qx.clamp(max=0).neg_()]).view(torch.uint8), 0
    out = torch.ops.onednn.qlinear_pointwise(u8, 1.0, zp, packed, ones, zeros, None, 1.0, 0,
                                             torch.float32, "none", [], "")
    m = qx.shape[0]
    return out if mode == "shifted" else out[:m].sub_(out[m:])


@functools.lru_cache(maxsize=8)
def _unit_scales(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n), torch.zeros(n, dtype=torch.long)


def _packed(qweight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of ``qweight``, made once per weight tensor (~0.25 s for 11008x4096
    here) and kept while the tensor lives: +1 byte per parameter of RAM for the layers that ran
    at large M.  A weight modified in place (version bump) is repacked."""
    return _cpu.memo_per_tensor(_PACKED, qweight, _prepack)


def _prepack(qweight: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(qweight, None)


def clear_packed_cache() -> None:
    """Drop every oneDNN-packed weight copy (they are rebuilt on the next large-M call)."""
    _PACKED.clear()


@functools.lru_cache(maxsize=None)
def onednn_mode() -> str | None:
    """How oneDNN's int8 GEMM computes exact int8 x int8 products on this CPU, by probing it once.

    ``"shifted"``: the codes shifted to u8 (one GEMM) are exact: VNNI / AMX accumulate u8 x s8 in
    int32.  ``"split"``: only u8 inputs <= 127 are exact (AVX2's ``vpmaddubsw`` saturates pairs of
    products in int16; measured on this AMD EPYC AVX2 machine: wrong by up to 4e6 on +-127 codes),
    so ``q = p - n`` runs as two half-range row blocks of one GEMM.  ``None``: no oneDNN int8.
    """
    try:
        g = torch.Generator().manual_seed(0)
        qw = torch.randint(-127, 128, (64, 256), dtype=torch.int8, generator=g)
        qw[:, :64] = 127  # pair sums of 255 * 127 * 2 overflow int16
        qx = torch.randint(-127, 128, (24, 256), dtype=torch.int8, generator=g)
        qx[:, :64] = 127
        exact = fmt.int8_matmul(qx, qw).float()
        packed = torch.ops.onednn.qlinear_prepack(qw, None)
        for mode in ("shifted", "split"):
            if torch.equal(_onednn_matmul(qx, packed, mode), exact):
                return mode
    except (RuntimeError, AttributeError):
        pass
    return None


# -- CPU fast paths ---------------------------------------------------------------------------------
def _cpu_int8dq(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *, nm: _cpu.Numerics) -> torch.Tensor:
    qx, sx = fmt.quantize_activations(x2)
    return cpu_int8_matmul(qx, qweight, scale, exact=nm.exact).mul_(sx)


def _cpu_llm_int8(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  threshold: float, *, nm: _cpu.Numerics) -> torch.Tensor:
    qx, sx, cols = fmt.quantize_activations_llm(x2, threshold)
    y = cpu_int8_matmul(qx, qweight, scale, exact=nm.exact).mul_(sx)
    if not cols.any():
        return y
    # The outlier columns only: data-dependent sizes, but inside this eager kernel.  Rows of W.T
    # gather ~4x faster than columns of W (1 ms vs 4 ms for 8 of 11008x4096).  Feeding them as M
    # extra bf16 rows of the int8 GEMV instead was slower from M=2 (measured 25 vs 18 ms).
    idx = cols.nonzero().squeeze(1)
    w_sub_t = qweight.t()[idx].float().mul_(scale.float())  # [outliers, N]
    return y.addmm_(nm.rounded(x2[:, idx]).float(), w_sub_t)  # rounded only with compute_dtype=bf16


# -- CUDA ---------------------------------------------------------------------------------------------
def _cuda_int8dq(x2, qweight, scale, *, bias):
    from ..kernels.int8dq import int8dq_linear

    return int8dq_linear(x2, qweight, scale, bias)


def _cuda_llm_int8(x2, qweight, scale, *, bias, threshold):
    from ..kernels.int8dq import int8dq_linear

    return int8dq_linear(x2, qweight, scale, bias, threshold=threshold)


def check_int8dq(x, bias, qweight, scale):
    """``linear_int8dq``: the int8wo weight (:func:`fxquant.ops.int8wo.check`)."""
    _check_int8(x, bias, qweight, scale, op="linear_int8dq")


def check_llm_int8(x, bias, qweight, scale, threshold):
    """``linear_llm_int8``: the int8wo weight (:func:`fxquant.ops.int8wo.check`), ``threshold`` > 0."""
    if not threshold > 0:
        v.fail("linear_llm_int8", f"threshold={threshold!r} is not supported; valid: a float > 0")
    _check_int8(x, bias, qweight, scale, op="linear_llm_int8")


def _n_out(qweight, **_):
    return qweight.shape[0]


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, **_) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]`` (the autograd's weight; scalars such as the threshold
    do not enter it)."""
    return fmt.dequantize_weight(qweight, scale)


OP_INT8DQ = LinearOpDef(
    name="linear_int8dq", tensors=("qweight", "scale"), scalars=(),
    dequantize=dequantize_weight, out_features=_n_out, check=check_int8dq, reference_fn=reference_int8dq,
    cpu_fast=_cpu_int8dq, cpu_fast_any_m=True, cuda=_cuda_int8dq, dynamic_activations=True,
    doc="x [..., K] quantized per token to int8; qweight int8 [N, K]; scale bf16 [N]; bias [N] -> [..., N]",
)
OP_LLM_INT8 = LinearOpDef(
    name="linear_llm_int8", tensors=("qweight", "scale"), scalars=(("threshold", "float"),),
    dequantize=dequantize_weight, out_features=_n_out, check=check_llm_int8, reference_fn=reference_llm_int8,
    cpu_fast=_cpu_llm_int8, cpu_fast_any_m=True, cuda=_cuda_llm_int8, dynamic_activations=True,
    doc="LLM.int8: columns of x with |x| >= threshold in float, the rest as linear_int8dq; "
        "qweight int8 [N, K]; scale bf16 [N]; bias [N] -> [..., N]",
)
linear_int8dq = define(OP_INT8DQ)
linear_llm_int8 = define(OP_LLM_INT8)
