"""Benchmark rows for ``int8dq`` and ``llm.int8`` (and their peers), in tools/bench.py's terms.

Each entry of ``CASES`` has the fields of ``tools.bench.Case``: ``name``, ``fmt``, ``kind``
("fxquant" | "reference" | "peer"), ``act_dtype``, ``prepare(weight fp32 [N, K]) -> state`` and
``forward(state, x [M, K]) -> y [M, N]``.  ``TARGETS`` has the fields of ``tools.bench.Target``.
tools/bench.py loads this module (``tools.bench_cases.MODULES``); pick its rows with
``python tools/bench.py --formats ...``.

Notes on what is measured: the bench input is ``randn``, so ``llm.int8`` sees no outlier
column at threshold 6 (its float path is skipped); the "fast path, all M" rows call the op's CPU
fast path directly (the ops use it at every M through ``LinearOpDef.cpu_fast_any_m``; the rows
check that the dispatch adds nothing).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from tools.bench_cases._common import need as _need, call as _call, row as _row
from fxquant.formats import int8dq as fmt
from fxquant.ops import int8dq as op

FP32, BF16 = torch.float32, torch.bfloat16
THRESHOLD = fmt.DEFAULT_THRESHOLD


def _prep(w: torch.Tensor):
    return fmt.quantize_weight(w)


def _int8dq(st, x):
    return torch.ops.fxquant.linear_int8dq(x, *st, None)


def _int8dq_ref(st, x):
    return op.reference_int8dq(x, *st, bias=None)


def _int8dq_fast(st, x):
    return op.OP_INT8DQ.cpu_fast(x, *st).to(x.dtype)


def _llm(st, x):
    return torch.ops.fxquant.linear_llm_int8(x, *st, None, THRESHOLD)


def _llm_ref(st, x):
    return op.reference_llm_int8(x, *st, bias=None, threshold=THRESHOLD)


def _llm_fast(st, x):
    return op.OP_LLM_INT8.cpu_fast(x, *st, threshold=THRESHOLD).to(x.dtype)


def _torchao_int8dq(compile_: bool) -> Callable[[torch.Tensor], Any]:
    def prepare(w):
        tq = _need("torchao.quantization")
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=BF16)
        m.weight.data.copy_(w)
        tq.quantize_(m, tq.Int8DynamicActivationInt8WeightConfig())
        return torch.compile(m, dynamic=False) if compile_ else m
    return prepare


def _bnb_llm_int8(w):
    bnb = _need("bitsandbytes")
    m = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=THRESHOLD)
    m.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    # eval(): in training mode Linear8bitLt on the CPU dequantizes the weight (MatMul8bitFp) instead
    # of running LLM.int8
    return m.to("cpu").eval()



LLM = "llm.int8"
CASES: list[dict[str, Any]] = [
    _row("fxquant int8dq", "int8dq", "fxquant", FP32, _prep, _int8dq),
    _row("fxquant int8dq", "int8dq", "fxquant", BF16, _prep, _int8dq),
    _row("fxquant int8dq fast path, all M", "int8dq", "fxquant", FP32, _prep, _int8dq_fast),
    _row("int8dq reference", "int8dq", "reference", FP32, _prep, _int8dq_ref),
    _row("fxquant llm.int8", LLM, "fxquant", FP32, _prep, _llm),
    _row("fxquant llm.int8 fast path, all M", LLM, "fxquant", FP32, _prep, _llm_fast),
    _row("llm.int8 reference", LLM, "reference", FP32, _prep, _llm_ref),
    _row("torchao int8dq (eager)", "int8dq", "peer", BF16, _torchao_int8dq(False), _call),
    _row("torchao int8dq (compile)", "int8dq", "peer", BF16, _torchao_int8dq(True), _call),
    _row("bnb LLM.int8 Linear8bitLt(threshold=6)", LLM, "peer", FP32, _bnb_llm_int8, _call),
]

BF16_LINEAR = "bf16 F.linear"
TARGETS: list[dict[str, Any]] = [
    dict(case="fxquant int8dq", m=256, vs=BF16_LINEAR, min_ratio=1.5),  # the target
    *(dict(case=c, m=m, vs=ref, min_ratio=1.0)  # "no format slower than its own reference"
      for c, ref in (("fxquant int8dq", "int8dq reference"), ("fxquant llm.int8", "llm.int8 reference"))
      for m in (1, 16, 256)),
    dict(case="fxquant int8dq", m=256, vs="peers", min_ratio=1.0),
    dict(case="fxquant llm.int8", m=256, vs="peers", min_ratio=1.0),
]
