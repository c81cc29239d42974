"""Benchmark rows for ``int8wo`` and ``int4wo-128`` (the pipeline's formats) and their peers.

Same interface as :mod:`tools.bench_cases.float8` (``CASES``, ``TARGETS``), e.g.
``python tools/bench.py --shapes 11008x4096 --formats int8wo int4wo-128``.

Rows: the ops (``torch.ops.fxquant.linear_int8wo`` / ``linear_int4wo``: fxquant's native GEMV up
to ``NATIVE_MAX_ROWS`` rows (int4wo with bf16 activations on AVX512-BF16: ``NATIVE_MAX_ROWS_BF16DOT``),
then the ATen packed kernels on bf16 activations below int8wo's ``packed_max_rows()`` (12 rows
with bf16 GEMM, 64 with fp32) / int4wo's ``PACKED_MAX_ROWS`` (96; both capped by the CPU-wide
threshold), blocked dequantize + dense GEMM above), their
references, and the peers that have the format: torchao ``Int8WeightOnlyConfig`` (eager and
``torch.compile``), ``Int4WeightOnlyConfig`` (CPU layout) and ``IntxWeightOnlyConfig`` int4,
optimum-quanto ``qint8`` / ``qint4`` (group 128), bitsandbytes ``Linear8bitLt`` (threshold 0: pure
int8 weights).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from fxquant.formats import int4 as int4_fmt
from fxquant.formats import int8 as int8_fmt
from fxquant.ops import int4wo, int8wo
from tools.bench_cases._common import call as _call, need as _need, row as _row

FP32, BF16 = torch.float32, torch.bfloat16
INT4_GROUP = 128
I8, I4 = "int8wo", f"int4wo-{INT4_GROUP}"
BF16_LINEAR = "bf16 F.linear"


def _prep_int8wo(w):
    return int8_fmt.quantize(w)


def _prep_int4wo(w):
    block_n = int4_fmt.native_cpu_block_n() or 64  # non-native tiles: the op takes its slow path
    st = int4_fmt.to_storage(w, INT4_GROUP, block_n)
    return (st["qweight"], st["scales_and_zeros"], None, INT4_GROUP, block_n, *w.shape)


def _int8wo(st, x):
    return torch.ops.fxquant.linear_int8wo(x, *st, None)


def _int8wo_ref(st, x):
    return int8wo.reference(x, *st, None)


def _int4wo(st, x):
    return torch.ops.fxquant.linear_int4wo(x, *st)


def _int4wo_ref(st, x):
    return int4wo.reference(x, *st)


def _linear(w: torch.Tensor, dtype: torch.dtype) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
    lin.weight.data.copy_(w)
    return lin


def _torchao(config_fn: Callable[[Any], Any], compile_: bool = False) -> Callable:
    def prepare(w):
        tq = _need("torchao.quantization")
        m = _linear(w, BF16)
        tq.quantize_(m, config_fn(tq))
        return torch.compile(m, dynamic=False) if compile_ else m
    return prepare


def _torchao_int4_config(tq):
    """Int4CPULayout (torchao < 0.15) when present, else the version-2 default packing."""
    try:
        from torchao.dtypes import Int4CPULayout
    except ImportError:
        return tq.Int4WeightOnlyConfig(group_size=INT4_GROUP)
    return tq.Int4WeightOnlyConfig(group_size=INT4_GROUP, layout=Int4CPULayout(), version=1)


def _torchao_intx4_config(tq):
    from torchao.quantization.granularity import PerGroup
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def _quanto(qtype: str) -> Callable:
    def prepare(w):
        oq = _need("optimum.quanto")
        m = torch.nn.Sequential(_linear(w, BF16))
        oq.quantize(m, weights=getattr(oq, qtype))
        oq.freeze(m)
        return m
    return prepare


def _bnb_int8(w):
    bnb = _need("bitsandbytes")
    m = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=0.0)
    m.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return m.to("cpu").eval()  # .to quantizes; eval: inference path (no training-state bookkeeping)



CASES: list[dict[str, Any]] = [
    _row(f"fxquant {I8}", I8, "fxquant", FP32, _prep_int8wo, _int8wo),
    _row(f"fxquant {I8}", I8, "fxquant", BF16, _prep_int8wo, _int8wo),
    _row(f"{I8} reference", I8, "reference", FP32, _prep_int8wo, _int8wo_ref),
    _row(f"fxquant {I4}", I4, "fxquant", FP32, _prep_int4wo, _int4wo),
    _row(f"fxquant {I4}", I4, "fxquant", BF16, _prep_int4wo, _int4wo),
    _row(f"{I4} reference", I4, "reference", FP32, _prep_int4wo, _int4wo_ref),
    _row("torchao int8wo (eager)", I8, "peer", BF16, _torchao(lambda tq: tq.Int8WeightOnlyConfig()), _call),
    _row("torchao int8wo (compile)", I8, "peer", BF16, _torchao(lambda tq: tq.Int8WeightOnlyConfig(), True), _call),
    _row("quanto qint8", I8, "peer", BF16, _quanto("qint8"), _call),
    *(_row("bnb int8 Linear8bitLt", I8, "peer", dt, _bnb_int8, _call) for dt in (BF16, FP32)),
    _row(f"torchao int4wo-{INT4_GROUP}", I4, "peer", BF16, _torchao(_torchao_int4_config), _call),
    _row(f"torchao intx int4 g{INT4_GROUP} sym (eager)", I4, "peer", BF16, _torchao(_torchao_intx4_config), _call),
    _row(f"quanto qint4 g{INT4_GROUP}", I4, "peer", BF16, _quanto("qint4"), _call),
]

TARGETS: list[dict[str, Any]] = [
    # issue 2, CPU, 2 threads, M=1: int8wo >= 3x and int4wo-128 >= 4x bf16 F.linear, neither slower
    # than the fastest peer of its format; at M=256 neither slower than bf16 F.linear
    dict(case=f"fxquant {I8}", m=1, vs=BF16_LINEAR, min_ratio=3.0),
    dict(case=f"fxquant {I4}", m=1, vs=BF16_LINEAR, min_ratio=4.0),
    *(dict(case=f"fxquant {f}", m=1, vs="peers", min_ratio=1.0) for f in (I8, I4)),
    *(dict(case=f"fxquant {f}", m=256, vs=BF16_LINEAR, min_ratio=1.0) for f in (I8, I4)),
    # no format slower than its own dequantize-then-matmul reference at any M (issue 3)
    *(dict(case=f"fxquant {f}", m=m, vs=f"{f} reference", min_ratio=1.0) for f in (I8, I4) for m in (1, 16, 256)),
]
