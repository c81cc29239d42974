"""Benchmark rows for the sub-byte float formats ``fp<X>_e<A>m<B>``, in tools/bench.py's terms.

Same interface as :mod:`tools.bench_cases.float8` (``CASES``, ``TARGETS``), e.g.
``python tools/bench.py --shapes 11008x4096 --formats fp6_e3m2 fp4_e2m1``.

Rows: the op (``torch.ops.fxquant.linear_fpx``: blocked unpack + fp16-bit decode + GEMM at every
M), its CPU fast path called directly, the reference, and the only peer left: torchao removed ``fpx_weight_only`` (its
FP6-LLM CUDA kernels), so the peer row is what it did off the GPU - decode with torchao's
``_floatx_unpacked_to_f32`` and ``F.linear`` - on our unpacked codes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from tools.bench_cases._common import need as _need, row as _row
from fxquant.formats import fpx as fmt
from fxquant.ops import fpx as op

FP32, BF16 = torch.float32, torch.bfloat16
FORMATS = ("fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1", "fp3_e1m1")
FAST_ALL_M = ("fp6_e3m2", "fp4_e2m1")


def _prep(name: str) -> Callable[[torch.Tensor], Any]:
    ebits, mbits = fmt.parse_format(name)

    def prepare(w):
        st = fmt.to_storage(w, ebits, mbits)
        return st["qweight"], st["scale"], ebits, mbits, w.shape[1]
    return prepare


def _op(st, x):
    q, s, e, m, k = st
    return torch.ops.fxquant.linear_fpx(x, q, s, None, e, m, k)


def _fast(st, x):
    return op.OP.cpu_fast(x, *st).to(x.dtype)


def _ref(st, x):
    q, s, e, m, k = st
    return op.reference(x, q, s, None, e, m, k)


def _torchao_decode(name: str) -> Callable[[torch.Tensor], Any]:
    def prepare(w):
        utils = _need("torchao.prototype.custom_fp_utils")
        st = _prep(name)(w)
        return utils, st
    return prepare


def _torchao_forward(state, x):
    utils, (q, s, e, m, k) = state
    w = utils._floatx_unpacked_to_f32(fmt.unpack(q, 1 + e + m, k), e, m) * s.float()[:, None]
    return F.linear(x, w.to(x.dtype))



CASES: list[dict[str, Any]] = []
for _f in FORMATS:
    CASES += [_row(f"fxquant {_f}", _f, "fxquant", FP32, _prep(_f), _op),
              _row(f"{_f} reference", _f, "reference", FP32, _prep(_f), _ref)]
    if _f in FAST_ALL_M:
        CASES.append(_row(f"fxquant {_f} fast path, all M", _f, "fxquant", FP32, _prep(_f), _fast))
CASES.append(_row("torchao floatx decode + F.linear", "fp6_e3m2", "peer", FP32, _torchao_decode("fp6_e3m2"),
                  _torchao_forward))

BF16_LINEAR = "bf16 F.linear"
TARGETS: list[dict[str, Any]] = [
    *(dict(case=f"fxquant {f}", m=m, vs=f"{f} reference", min_ratio=1.0)  # "no format slower than its reference"
      for f in FORMATS for m in (1, 16, 256)),
    # the issue: "every format of <= 4 bits >= 2x faster than bf16" (at M=1, where weight bytes rule)
    *(dict(case=f"fxquant {f}", m=1, vs=BF16_LINEAR, min_ratio=2.0) for f in ("fp4_e2m1", "fp3_e1m1")),
    dict(case="fxquant fp6_e3m2", m=1, vs="peers", min_ratio=1.0),
]
