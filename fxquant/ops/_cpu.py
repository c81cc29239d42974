"""Shared CPU dispatch policy for the weight-only ops: the ``compute_dtype`` policy (what a path may
round, :func:`numerics`) and the routing thresholds.

The packed ATen kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are GEMV-style:
they win at small M because they read fewer weight bytes, and lose to a dense GEMM at large M.
Above ``large_m_threshold()`` rows the ops dequantize the weight once and call ``F.linear`` in the
fastest dense dtype of this CPU instead.  Every path computes the op reference on the activations
:func:`numerics` says, so results do not depend on which path M selects.

``compute_dtype`` policy (the CPU side of ``LinearOpDef``; docs/design.md, "compute_dtype"):

- ``None``, fp32 activations: on a CPU whose dense path is bf16 (:func:`dense_dtype`: AVX512-BF16 /
  AMX) they are rounded to bf16 **once**, on every path and at every M; elsewhere never.  Either
  way the products are exact (bf16 values times the stored weight, or fp32 products), the sums
  fp32 and the result fp32: no path rounds the weight or the output to bf16.
- ``None``, bf16 activations: used as they are; the result is rounded to bf16 once (a bf16 GEMM's
  output), and the large-M bf16 GEMMs may multiply a weight rounded to bf16 where the format's
  values are not bf16 numbers (int4 / intx groups, NF4): within the output's own rounding.
- ``None``, fp16 activations: never rounded to bf16: fp32 arithmetic on their values (exact),
  the result rounded to fp16 once.
- ``torch.float32``: activations never rounded, fp32 everywhere.  ``torch.bfloat16``: activations
  rounded to bf16 on every path; weights and outputs may be rounded to bf16 (the bf16 reference).
  ``torch.float16``: the fp16 reference (dequantize, fp16 GEMM).
- Dynamic activation quantization (int8dq, LLM.int8, float8dq): the op quantizes x itself, so
  ``None`` adds no bf16 rounding anywhere (its float parts run in fp32 on every CPU).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch


@functools.lru_cache(maxsize=None)
def dense_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else fp32.

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not the test: it is also true on AVX-512 CPUs
    without BF16, where oneDNN emulates bf16 and is 4x slower than fp32.  Measured (2048 x 5632,
    2 threads, ms, fp32 / bf16 F.linear): Xeon AVX-512 without BF16, M=1 1.1 / 4.9, M=512 55 / 230;
    on AVX512-BF16 machines bf16 is ~2x faster than fp32."""
    try:
        fast_bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 else torch.float32


@functools.lru_cache(maxsize=None)
def amx() -> bool:
    """Whether oneDNN's bf16 GEMM runs on AMX tiles here.  Then dequantize + that GEMM beats the native
    decode-in-GEMM kernels at large M, and the ops take it.  Measured (Xeon with AMX, 2 threads,
    5632 x 2048, M = 512, bf16 x, ms): bf16 F.linear 5.7; int8wo native GEMM 53 vs blocked decode +
    dense 8.8; int4wo-128 52.7 vs 25.9 (its decode is PyTorch ops)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def large_m_threshold() -> int:
    """Rows from which dequantize + dense GEMM beats the packed kernels.

    Measured with tools/bench.py (11008x4096, 2 threads): on the AVX2 machine int8pack takes
    23.6 ms at M=16 and 377 ms at M=256 while dequantize (76 ms) + fp32 GEMM (224 ms) takes 300 ms:
    crossover near M=192.  With fast bf16 GEMM the crossover is lower: the packed kernels fall to
    0.3-0.5x bf16 F.linear from M ~ 64, hence 48 (docs/reference-numbers.md)."""
    return 48 if dense_dtype() == torch.bfloat16 else 192


#: ``torch._weight_int8pack_mm`` is only right when K is a multiple of this.  Measured (torch 2.13
#: CPU builds): AVX-512 build, K = 8, 24, 130, 136, 200: inf / NaN / garbage at M = 1 and a crash at
#: M >= 2, while K = 16, 48, 144, 176, 208, 4112 are right; AVX2 build: K % 8 != 0 misbehaves at
#: M >= 2.  16 is safe on both.
INT8PACK_K_MULTIPLE = 16


def int8pack_k_ok(k: int) -> bool:
    """Whether ``torch._weight_int8pack_mm`` computes a reduction of length ``k`` correctly."""
    return k % INT8PACK_K_MULTIPLE == 0


@dataclass(frozen=True)
class Numerics:
    """What the CPU paths of one call may round (the ``compute_dtype`` policy above).

    ``round_x``: x's values are rounded to bf16 once before any product (x is fp32 or fp16; the
    kernels that round in C take x as it is and do it there, the others take :meth:`rounded`).
    ``exact``: products of x's (rounded) values with the stored weight exact, sums and result
    fp32: no bf16 GEMM output, no weight rounded to bf16."""

    round_x: bool
    exact: bool

    def bf16_values(self, x: torch.Tensor) -> bool:
        """Whether x's values are bf16 numbers on this call (bf16 x, or rounded): what the bf16
        dot-product kernels and the native bf16 GEMMs may take."""
        return self.round_x or x.dtype == torch.bfloat16

    def bf16_gemm(self, x: torch.Tensor) -> bool:
        """Whether a bf16 GEMM (bf16 output, weight rounded to bf16) computes this call."""
        return self.bf16_values(x) and not self.exact

    def gemm_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of a dense dequantize + GEMM path: bf16 where :meth:`bf16_gemm` and this CPU's
        dense GEMM is bf16, else fp32 (on x's values: exact where bf16 would round)."""
        return torch.bfloat16 if self.bf16_gemm(x) and dense_dtype() == torch.bfloat16 else torch.float32

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        """x with the values this call computes on: bf16 when :attr:`round_x`, else x itself."""
        return x.to(torch.bfloat16) if self.round_x and x.dtype != torch.bfloat16 else x


_NUMERICS = {(r, e): Numerics(r, e) for r in (False, True) for e in (False, True)}


def numerics(x_dtype: torch.dtype, compute_dtype: torch.dtype | None, dynamic: bool = False) -> Numerics:
    """The policy for activations of ``x_dtype`` under ``compute_dtype`` (not float16, which runs the
    fp16 reference); ``dynamic``: the op quantizes its activations itself (int8dq, LLM.int8,
    float8dq), so ``None`` never rounds them to bf16.  Not cached: :func:`dense_dtype` is, and
    tests patch it."""
    if compute_dtype == torch.bfloat16:
        return _NUMERICS[True, False]
    if compute_dtype == torch.float32:
        return _NUMERICS[False, True]
    if x_dtype == torch.bfloat16:
        return _NUMERICS[False, False]
    return _NUMERICS[not dynamic and x_dtype == torch.float32 and dense_dtype() == torch.bfloat16, True]


def rows(x: torch.Tensor) -> int:
    """Number of rows of ``x`` flattened to 2-D over its last dim."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def memo_per_tensor(cache: dict, t: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
    """``compute(t)``, remembered in ``cache`` while ``t`` lives and is not modified in place (keyed
    by identity, stamped with its data pointer and version counter): what an op asks of a stored
    tensor on every call (a prepacked copy, a property of a table)."""
    key, stamp = id(t), (t.data_ptr(), t._version)
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is None:
        weakref.finalize(t, cache.pop, key, None)
    value = compute(t)
    cache[key] = (stamp, value)
    return value
