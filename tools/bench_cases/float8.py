"""Benchmark rows for ``float8wo[-e5m2]`` and ``float8dq[-row]`` (and their peers), in tools/bench.py's terms.

Each entry of ``CASES`` has the fields of ``tools.bench.Case``: ``name``, ``fmt``, ``kind``
("fxquant" | "reference" | "alternative" | "peer"), ``act_dtype``, ``prepare(weight fp32 [N, K])
-> state`` and ``forward(state, x [M, K]) -> y [M, N]``.  ``TARGETS`` has the fields of
``tools.bench.Target``.  tools/bench.py loads this module (``tools.bench_cases.MODULES``); pick its rows with
``python tools/bench.py --formats ...``.

Rows: the op (``torch.ops.fxquant.*``: blocked fp16-bit decode + GEMM at every M), its CPU fast
path called directly, the reference, alternatives (``torch._scaled_mm``, an unblocked dequantize) and peers:
torchao ``Float8WeightOnlyConfig`` (runs on CPU), torchao ``Float8Tensor`` with dynamic float8
activations (``Float8DynamicActivationFloat8WeightConfig`` itself refuses the CPU - it asserts a
CUDA sm89+ / MI300 / XPU device - so the tensor is built directly with ``Float8Tensor.from_hp``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from tools.bench_cases._common import need as _need, call as _call, row as _row
from fxquant.formats import float8 as fmt
from fxquant.ops import float8 as op

FP32, BF16 = torch.float32, torch.bfloat16
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
UB = fmt.DEFAULT_ACTIVATION_SCALE_UB


# ---- float8wo ------------------------------------------------------------------------------------
def _prep_wo(dtype: torch.dtype) -> Callable[[torch.Tensor], Any]:
    return lambda w: fmt.quantize_weight(w, dtype, "row")


def _wo(st, x):
    return torch.ops.fxquant.linear_float8wo(x, *st, None)


def _wo_fast(st, x):
    return op.OP_WO.cpu_fast(x, *st).to(x.dtype)


def _wo_ref(st, x):
    return op.reference_wo(x, *st, None)


def _wo_unblocked(st, x):
    """Decode the whole weight with the same fp16 bit moves, then one GEMM."""
    q, scale = st
    t, e = fmt.decode_fp16_scaled(q)
    return F.linear(x, t.float()) * (scale * 2.0**e)


def _torchao_wo(w):
    tq = _need("torchao.quantization")
    m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=BF16)
    m.weight.data.copy_(w)
    tq.quantize_(m, tq.Float8WeightOnlyConfig())
    return m


# ---- float8dq ------------------------------------------------------------------------------------
def _prep_dq(granularity: str) -> Callable[[torch.Tensor], Any]:
    return lambda w: (*fmt.quantize_weight(w, E4, granularity), granularity)


def _dq(st, x):
    q, scale, gran = st
    return torch.ops.fxquant.linear_float8dq(x, q, scale, None, gran, UB)


def _dq_fast(st, x):
    q, scale, gran = st
    return op.OP_DQ.cpu_fast(x, q, scale, gran, UB).to(x.dtype)


def _dq_ref(st, x):
    q, scale, gran = st
    return op.reference_dq(x, q, scale, None, gran, UB)


def _dq_scaled_mm(st, x):
    """The same function through ``torch._scaled_mm`` (float8 x float8 on the CPU)."""
    q, scale, gran = st
    xq, xs = fmt.quantize_activation(x, E4, gran, UB)
    sb = scale[None, :] if gran == "row" else scale.reshape(())
    sa = xs if gran == "row" else xs.reshape(())
    return torch._scaled_mm(xq, q.t(), scale_a=sa, scale_b=sb, out_dtype=x.dtype)


def _torchao_dq(granularity: str) -> Callable[[torch.Tensor], Any]:
    def prepare(w):
        _need("torchao.quantization")
        f8 = _need("torchao.quantization.quantize_.workflows.float8.float8_tensor")
        gran = _need("torchao.quantization.granularity")
        inference = _need("torchao.float8.inference")
        g = gran.PerRow() if granularity == "row" else gran.PerTensor()
        kwargs = f8.QuantizeTensorToFloat8Kwargs(E4, g)
        t = f8.Float8Tensor.from_hp(w.to(BF16), granularity=g, act_quant_kwargs=kwargs,
                                    mm_config=inference.Float8MMConfig(use_fast_accum=True))  # the config's default
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=BF16)
        m.weight = torch.nn.Parameter(t, requires_grad=False)
        return m
    return prepare



CASES: list[dict[str, Any]] = [
    _row("fxquant float8wo", "float8wo", "fxquant", FP32, _prep_wo(E4), _wo),
    _row("fxquant float8wo fast path, all M", "float8wo", "fxquant", FP32, _prep_wo(E4), _wo_fast),
    _row("float8wo reference", "float8wo", "reference", FP32, _prep_wo(E4), _wo_ref),
    _row("float8wo unblocked decode + GEMM", "float8wo", "alternative", FP32, _prep_wo(E4), _wo_unblocked),
    _row("torchao float8wo (eager)", "float8wo", "peer", BF16, _torchao_wo, _call),
    _row("fxquant float8wo-e5m2", "float8wo-e5m2", "fxquant", FP32, _prep_wo(E5), _wo),
    _row("float8wo-e5m2 reference", "float8wo-e5m2", "reference", FP32, _prep_wo(E5), _wo_ref),
]
for _g, _f in (("tensor", "float8dq"), ("row", "float8dq-row")):
    CASES += [
        _row(f"fxquant {_f}", _f, "fxquant", FP32, _prep_dq(_g), _dq),
        _row(f"fxquant {_f} fast path, all M", _f, "fxquant", FP32, _prep_dq(_g), _dq_fast),
        _row(f"{_f} reference", _f, "reference", FP32, _prep_dq(_g), _dq_ref),
        _row(f"{_f} via torch._scaled_mm", _f, "alternative", FP32, _prep_dq(_g), _dq_scaled_mm),
        _row(f"torchao {_f} Float8Tensor (eager)", _f, "peer", BF16, _torchao_dq(_g), _call),
    ]

BF16_LINEAR = "bf16 F.linear"
TARGETS: list[dict[str, Any]] = [
    *(dict(case=f"fxquant {f}", m=m, vs=f"{f} reference", min_ratio=1.0)  # "no format slower than its reference"
      for f in ("float8wo", "float8wo-e5m2", "float8dq", "float8dq-row") for m in (1, 16, 256)),
    *(dict(case=f"fxquant {f}", m=m, vs="peers", min_ratio=1.0)
      for f in ("float8wo", "float8dq", "float8dq-row") for m in (1, 16, 256)),
]
