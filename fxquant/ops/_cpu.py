"""Shared CPU dispatch policy for the weight-only ops.

The packed ATen kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are GEMV-style:
they win at small M because they read fewer weight bytes, and lose to a dense GEMM at large M.
Above ``large_m_threshold()`` rows the ops dequantize the weight once and call ``F.linear`` in the
fastest dense dtype of this CPU instead.  Both paths compute the same function (the op reference)
up to the rounding of the compute dtype.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def dense_dtype() -> torch.dtype:
    """bf16 when oneDNN has native bf16 GEMM on this CPU (AVX512-BF16/AMX), else fp32.

    Measured (tools/bench.py, 11008x4096, 2 threads, AMD EPYC AVX2 build): bf16 F.linear at M=256
    takes 1109 ms, fp32 224 ms; on AVX512-BF16 machines bf16 is ~2x faster than fp32."""
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 else torch.float32


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


def native_gemm_applies(x2: torch.Tensor) -> bool:
    """Whether a large-M op may take a native bf16 GEMM (:func:`fxquant.kernels.native_cpu.int8_gemm`,
    ``int4_gemm``): activations other than fp16 on a CPU whose dense large-M path is bf16 anyway."""
    return x2.dtype != torch.float16 and dense_dtype() == torch.bfloat16


def rows(x: torch.Tensor) -> int:
    """Number of rows of ``x`` flattened to 2-D over its last dim."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0
