"""Benchmark rows for the group-wise integer formats ``[u]int<b>wo-<g>[-axis<a>]``, in tools/bench.py's terms.

Same interface as :mod:`tools.bench_cases.float8` (``CASES``, ``TARGETS``), e.g.
``python tools/bench.py --shapes 11008x4096 --formats uint4wo-128 uint3wo-128``.

Rows per format: the op (``torch.ops.fxquant.linear_intx``, the CPU policy of fxquant.ops.intx),
its two CPU paths called directly at every M (the int4 kernel, for axis-1 formats with a kernel
group size, and tile-order dequantize + batched GEMM), the reference (dequantize, fp32 F.linear),
and the peers that have the format: HQQ's ``HQQLinear`` (torch backend: it dequantizes every call;
quantized with ``optimize=False`` here, which does not change its forward speed) for every
``uint`` format, torchao's ``IntxWeightOnlyConfig`` (eager) for the symmetric ones.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from tools.bench_cases._common import Unavailable, need as _need, call as _call, row as _row
from fxquant.ops import intx as op
from fxquant.schemes import parse_scheme

FP32, BF16 = torch.float32, torch.bfloat16
FORMATS = ("uint1wo-128", "uint2wo-128", "uint3wo-128", "int3wo-128", "uint4wo-128", "uint5wo-128",
           "int8wo-128", "uint8wo-128", "uint3wo-128-axis0")
LOW_BITS = tuple(f for f in FORMATS if parse_scheme(f).bits <= 4)


def _prep(name: str) -> Callable[[torch.Tensor], Any]:
    def prepare(w):
        qw = parse_scheme(name).quantize(w)
        return tuple(qw.tensors.values()), qw.attrs
    return prepare


def _op(st, x):
    tensors, attrs = st
    return torch.ops.fxquant.linear_intx(x, *tensors, None, **attrs)


def _ref(st, x):
    tensors, attrs = st
    return op.reference(x, *tensors, None, **attrs)


def _int4_kernel(st, x):
    tensors, a = st
    if not op.int4_kernel_applies(a["bits"], a["group_size"], a["axis"], a["block_n"]):
        raise Unavailable("no int4 kernel for this layout")
    return op.int4_kernel_linear(x, *tensors, a["bits"], a["group_size"], a["block_n"], a["out_features"])[
        :, :a["out_features"]]


def _tiled(st, x):
    tensors, a = st
    return op.tiled_dequant_linear(x, *tensors, a["bits"], a["group_size"], a["axis"], a["block_n"],
                                   a["out_features"])[:, :a["out_features"]]


def _hqq(name: str) -> Callable[[torch.Tensor], Any]:
    s = parse_scheme(name)

    def prepare(w):
        hq = _need("hqq.core.quantize")
        cfg = hq.BaseQuantizeConfig(nbits=s.bits, group_size=s.group_size, axis=s.axis)
        cfg["weight_quant_params"]["optimize"] = False  # the forward is the same; quantizing is 30x faster
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        return hq.HQQLinear(lin, cfg, compute_dtype=BF16, device="cpu")
    return prepare


def _torchao(name: str) -> Callable[[torch.Tensor], Any]:
    s = parse_scheme(name)

    def prepare(w):
        tq = _need("torchao.quantization")
        from torchao.quantization.granularity import PerGroup
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=BF16)
        lin.weight.data.copy_(w)
        tq.quantize_(lin, tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{s.bits}"),
                                                  granularity=PerGroup(s.group_size)))
        return lin
    return prepare



CASES: list[dict[str, Any]] = []
for _f in FORMATS:
    _s = parse_scheme(_f)
    CASES += [_row(f"fxquant {_f}", _f, "fxquant", FP32, _prep(_f), _op),
              _row(f"{_f} reference", _f, "reference", FP32, _prep(_f), _ref),
              _row(f"fxquant {_f} tiled dequant+GEMM, all M", _f, "fxquant", FP32, _prep(_f), _tiled)]
    if _s.axis == 1:
        CASES.append(_row(f"fxquant {_f} int4 kernel, all M", _f, "fxquant", FP32, _prep(_f), _int4_kernel))
    if not _s.symmetric:
        CASES.append(_row(f"hqq HQQLinear {_s.bits}-bit g{_s.group_size} axis{_s.axis}", _f, "peer", BF16,
                          _hqq(_f), _call))
    else:
        CASES.append(_row(f"torchao intx int{_s.bits} g{_s.group_size} (eager)", _f, "peer", BF16, _torchao(_f),
                          _call))

BF16_LINEAR = "bf16 F.linear"
TARGETS: list[dict[str, Any]] = [
    *(dict(case=f"fxquant {f}", m=m, vs=f"{f} reference", min_ratio=1.0)  # "no format slower than its reference"
      for f in FORMATS for m in (1, 16, 256)),
    # the issue: "every format of <= 4 bits >= 2x faster than bf16" (at M=1, where weight bytes rule)
    *(dict(case=f"fxquant {f}", m=1, vs=BF16_LINEAR, min_ratio=2.0) for f in LOW_BITS),
    *(dict(case=f"fxquant {f}", m=1, vs="peers", min_ratio=1.0) for f in FORMATS),
]
