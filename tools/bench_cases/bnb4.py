"""Benchmark rows for the bitsandbytes 4-bit formats (``nf4-64``, ``fp4-64``, with and without
``+dq``) and their bitsandbytes peers, in tools/bench.py's terms.

Each entry of ``CASES`` has the fields of ``tools.bench.Case``: ``name``, ``fmt``, ``kind``
("fxquant" | "reference" | "peer"), ``act_dtype``, ``prepare(weight fp32 [N, K]) -> state`` and
``forward(state, x [M, K]) -> y [M, N]``.  ``TARGETS`` has the fields of ``tools.bench.Target``.
tools/bench.py loads this module (``tools.bench_cases.MODULES``); pick its rows with
``python tools/bench.py --formats ...``.

Peers are ``bnb.nn.Linear4bit`` with ``compress_statistics`` set to match the format.  The "fast
path, all M" row calls the op's CPU fast path directly (the op runs it at every M:
``cpu_fast_any_m``; the row checks that the dispatch adds nothing).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from tools.bench_cases._common import need as _need, call as _call, row as _row
from fxquant.ops import bnb4 as op
from fxquant.schemes import FP4, NF4

FP32, BF16 = torch.float32, torch.bfloat16
BLOCKSIZE = 64


def _prep(scheme) -> Callable[[torch.Tensor], Any]:
    def prepare(w):
        qw = scheme.quantize(w)
        return getattr(torch.ops.fxquant, qw.op), getattr(op, "OP_DQ" if scheme.double_quant else "OP"), qw
    return prepare


def _fxquant(st, x):
    packet, _, qw = st
    return packet(x, *qw.tensors.values(), None, **qw.attrs)


def _reference(st, x):
    _, opdef, qw = st
    return opdef.reference(x, *qw.tensors.values(), None, **qw.attrs)


def _fast_all_m(st, x):
    _, opdef, qw = st
    scalars = {k: v for k, v in qw.attrs.items() if k != "compute_dtype"}
    return opdef.cpu_fast(x, *qw.tensors.values(), **scalars).to(x.dtype)


def _bnb_linear4bit(quant_type: str, double_quant: bool, dtype: torch.dtype) -> Callable[[torch.Tensor], Any]:
    def prepare(w):
        bnb = _need("bitsandbytes")
        m = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=double_quant)
        m.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type, blocksize=BLOCKSIZE,
                                     compress_statistics=double_quant)
        return m.to("cpu").eval()  # .to quantizes
    return prepare



SCHEMES = [NF4(blocksize=BLOCKSIZE), FP4(blocksize=BLOCKSIZE), NF4(blocksize=BLOCKSIZE, double_quant=True),
           FP4(blocksize=BLOCKSIZE, double_quant=True)]
CASES: list[dict[str, Any]] = []
for _s in SCHEMES:
    _f = str(_s)
    CASES += [_row(f"fxquant {_f}", _f, "fxquant", FP32, _prep(_s), _fxquant),
              _row(f"{_f} reference", _f, "reference", FP32, _prep(_s), _reference)]
    CASES += [_row(f"bnb Linear4bit {_f}", _f, "peer", dt, _bnb_linear4bit(_s.quant_type, _s.double_quant, dt),
                   _call) for dt in (BF16, FP32)]
_NF4 = f"nf4-{BLOCKSIZE}"
CASES += [_row(f"fxquant {_NF4}", _NF4, "fxquant", BF16, _prep(SCHEMES[0]), _fxquant),
          _row(f"fxquant {_NF4} fast path, all M", _NF4, "fxquant", FP32, _prep(SCHEMES[0]), _fast_all_m)]

BF16_LINEAR = "bf16 F.linear"
TARGETS: list[dict[str, Any]] = [
    # the targets: nf4 / fp4 at M=1 >= 3x bf16 and no slower than bitsandbytes; every format
    # of <= 4 bits >= 2x bf16 (at M=1, where weight-only formats are meant to win)
    *(dict(case=f"fxquant {f}", m=1, vs=BF16_LINEAR, min_ratio=3.0) for f in (_NF4, f"fp4-{BLOCKSIZE}")),
    *(dict(case=f"fxquant {s}", m=1, vs="peers", min_ratio=1.0) for s in SCHEMES),
    *(dict(case=f"fxquant {s}", m=1, vs=BF16_LINEAR, min_ratio=2.0) for s in SCHEMES[2:]),
    # no format slower than its own dequantize-then-matmul reference at any M
    *(dict(case=f"fxquant {s}", m=m, vs=f"{s} reference", min_ratio=1.0) for s in SCHEMES for m in (1, 16, 256)),
]
