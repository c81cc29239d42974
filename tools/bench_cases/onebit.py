"""Benchmark rows for ``onebit`` (OneBit: sign bits ⊙ rank-1 magnitudes), in tools/bench.py's terms.

Each entry of ``CASES`` has the fields of ``tools.bench.Case``: ``name``, ``fmt``, ``kind``
("fxquant" | "reference" | "alternative" | "peer"), ``act_dtype``, ``prepare(weight fp32 [N, K])
-> state`` and ``forward(state, x [M, K]) -> y [M, N]``.  ``TARGETS`` has the fields of
``tools.bench.Target``.  tools/bench.py loads this module (``tools.bench_cases.MODULES``); pick its rows with
``python tools/bench.py --formats ...``.

Rows: the op (bit-plane int8pack path below ``_cpu.large_m_threshold()`` rows, the reference above
it), its CPU fast path called at every M, the reference, and the alternatives weighed for the CPU
path (docs/formats/onebit.md): table-unpack to int8 per call + ``_weight_int8pack_mm``; the paper's
inference layer (unpack to float per call + ``F.linear``); an int8 ±1 copy kept next to the bits
(8x the memory) + ``_weight_int8pack_mm``; an int4 copy with codes 7/9 (4x the memory) +
``_weight_int4pack_mm_for_cpu``; dequantize + ``F.linear``.  No peer library implements OneBit;
HQQ's 1-bit mode (a different 1-bit format: per-group scale and zero, dequantized every call by its
torch backend) is listed as an alternative for scale.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from tools.bench_cases._common import Unavailable, need as _need, call as _call, row
from fxquant.formats import int4 as int4_fmt
from fxquant.formats import onebit as fmt
from fxquant.ops import onebit as op

FP32, BF16 = torch.float32, torch.bfloat16
FMT = "onebit"


def _prep(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = fmt.quantize(w)
    return s["sign_bits"], s["a"], s["b"]


def _op(st, x):
    return torch.ops.fxquant.linear_onebit(x, *st, None)


def _fast(st, x):
    return op._cpu_fast(x, *st).to(x.dtype)


def _ref(st, x):
    return op.reference(x, *st, None)


def _dequant_linear(st, x):
    return F.linear(x, fmt.dequantize(*st).to(x.dtype))


def _table_unpack_int8pack(st, x):
    """Unpack the whole weight to int8 ±1 (table gather) every call, then the int8 GEMV."""
    bits, a, b = st
    xb = F.pad(x.float() * b.float(), (0, 8 * bits.shape[1] - b.shape[0])).to(BF16)
    return torch._weight_int8pack_mm(xb, fmt.unpack_signs(bits), a.to(BF16))


def _paper_layer(st, x):
    """The paper's BitLinearInf forward (without its LayerNorm): unpack to float, F.linear, * a."""
    bits, a, b = st
    signs = fmt.unpack_signs(bits, b.shape[0]).to(x.dtype)
    return F.linear(x * b.to(x.dtype), signs) * a.to(x.dtype)


def _prep_cached_int8(w):
    bits, a, b = _prep(w)
    return fmt.unpack_signs(bits).contiguous(), a.to(BF16), b, bits.shape[1]


def _cached_int8(st, x):
    signs, a, b, c = st
    xb = F.pad(x.float() * b.float(), (0, 8 * c - b.shape[0])).to(BF16)
    return torch._weight_int8pack_mm(xb, signs, a)


def _prep_int4pack(w):
    """Signs as int4 codes 9 (+1) / 7 (-1) in the CPU kernel's layout, scale a, zero 0 per group."""
    n, k = w.shape
    group = next((g for g in (256, 128, 64, 32) if k % g == 0), None)
    if group is None or n % 16:
        raise Unavailable(f"int4pack needs K % 32 == 0 and N % 16 == 0, got {n}x{k}")
    bits, a, b = _prep(w)
    codes = fmt.unpack_signs(bits, k).to(torch.int32) + 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([a.float().expand(k // group, n), torch.zeros(k // group, n)], dim=-1)
    return packed, sz.to(BF16).contiguous(), b, group, int4_fmt.native_cpu_block_n()


def _int4pack(st, x):
    packed, sz, b, group, _ = st
    return torch.ops.aten._weight_int4pack_mm_for_cpu((x.float() * b.float()).to(BF16), packed, group, sz)


def _prep_hqq_1bit(w):
    hq = _need("hqq.core.quantize")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return hq.HQQLinear(lin, quant_config=hq.BaseQuantizeConfig(nbits=1, group_size=64),
                        compute_dtype=BF16, device="cpu")


def _row(name, kind, act_dtype, prepare, forward) -> dict[str, Any]:
    return row(name, FMT, kind, act_dtype, prepare, forward)


CASES: list[dict[str, Any]] = [
    _row("fxquant onebit", "fxquant", FP32, _prep, _op),
    _row("fxquant onebit", "fxquant", BF16, _prep, _op),
    _row("fxquant onebit fast path, all M", "fxquant", FP32, _prep, _fast),
    _row("onebit reference", "reference", FP32, _prep, _ref),
    _row("onebit dequantize + F.linear", "alternative", FP32, _prep, _dequant_linear),
    _row("onebit table unpack + int8pack, per call", "alternative", FP32, _prep, _table_unpack_int8pack),
    _row("onebit paper layer: unpack to float + F.linear", "alternative", BF16, _prep, _paper_layer),
    _row("onebit cached int8 signs + int8pack (8x memory)", "alternative", FP32, _prep_cached_int8, _cached_int8),
    _row("onebit int4pack codes 7/9 (4x memory)", "alternative", FP32, _prep_int4pack, _int4pack),
    _row("hqq 1-bit g64 (other 1-bit format)", "alternative", BF16, _prep_hqq_1bit, _call),
]

BF16_LINEAR = "bf16 F.linear"
TARGETS: list[dict[str, Any]] = [
    dict(case="fxquant onebit", m=1, vs=BF16_LINEAR, min_ratio=2.0),  # "every format of <= 4 bits >= 2x bf16"
    *(dict(case="fxquant onebit", m=m, vs="onebit reference", min_ratio=1.0)  # "never slower than its reference"
      for m in (1, 16, 256)),
]
