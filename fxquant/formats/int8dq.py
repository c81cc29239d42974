"""Dynamic int8 activations x int8 weights: ``int8dq`` (w8a8) and ``llm.int8`` (w8a8 + float outliers).

Weights are stored exactly as :mod:`fxquant.formats.int8` stores them (reused, not rewritten):
``qweight`` int8 ``[N, K]`` row-major in [-127, 127], ``scale`` bfloat16 ``[N]`` (rounded up so
the row maximum never clips), ``W[n, k] ≈ qweight[n, k] * scale[n]``; ``1 + 2 / K`` bytes per
parameter.  bf16 scales are enough: the codes are chosen for the stored scale (the error bound is
the same half step as with fp32 scales), and the CPU kernels want bf16 scales anyway.

Activations are quantized at run time, per token (row of ``x`` flattened to ``[M, K]``),
symmetric, in fp32 (bf16 / fp16 inputs are widened exactly first)::

    absmax[m] = max_k |x[m, k]|
    sx[m]     = max(absmax[m] / 127, FLT_MIN)                  (fp32 division, round to nearest)
    qx[m, k]  = clamp(round_half_to_even(x[m, k] / sx[m]), -127, 127)     (fp32 division)

The clamp never binds (``absmax / fl(absmax / 127) < 127.5``); ``FLT_MIN`` only keeps all-zero
rows finite (their codes are 0).  The product of codes is exact in int32
(``|acc| <= 127^2 K < 2^31`` for ``K <= 133,143``), and the output is rescaled:
``y[m, n] = acc[m, n] * sx[m] * scale[n]``.

``llm.int8`` (Dettmers et al. 2022, bitsandbytes ``MatMul8bitLt``): an *outlier column* is an input
column with ``|x[m, k]| >= threshold`` in any row of the call; those columns are computed in float
against the dequantized weight columns, all other columns as above.  As in bitsandbytes'
``int8_vectorwise_quant``, ``absmax`` of a row skips the outlier *elements* (not whole outlier
columns), and codes in outlier columns are 0.  Everything here is expressed with masks, so shapes
never depend on the data (``torch.export`` sees no unbacked sizes).
"""
from __future__ import annotations

import torch

from . import int8

__all__ = ["QMAX", "DEFAULT_THRESHOLD", "quantize_weight", "dequantize_weight", "nbytes",
           "activation_scale", "quantize_activations", "outlier_columns", "quantize_activations_llm",
           "round_half_even", "int8_matmul", "EXACT_FP32_K"]

QMAX = 127
DEFAULT_THRESHOLD = 6.0  # LLM.int8 paper and bitsandbytes' Linear8bitLt(threshold=6.0)
#: Longest K run whose int8 x int8 dot product is exact in fp32: every partial sum of
#: ``<= 1024`` products of magnitude ``<= 127^2`` is an integer below ``2^24``.
EXACT_FP32_K = 1024
_FLT_MIN = torch.finfo(torch.float32).tiny

quantize_weight = int8.quantize      # float [N, K] -> (int8 [N, K], bf16 [N])
dequantize_weight = int8.dequantize  # -> float32 [N, K]
nbytes = int8.nbytes                 # codes + bf16 scales: N * K + 2 * N


def activation_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Per-row fp32 scale from the fp32 row ``absmax``: ``max(absmax / 127, FLT_MIN)``."""
    return (absmax.float() / QMAX).clamp_(min=_FLT_MIN)


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties to even (``torch.round``), as a named step of the format."""
    return torch.round(v)


def _codes(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return round_half_even(xf / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2d`` float ``[M, K]`` -> (codes int8 ``[M, K]``, scale fp32 ``[M, 1]``), per token."""
    xf = x2d.float()
    scale = activation_scale(xf.abs().amax(dim=-1, keepdim=True)) if xf.shape[-1] else \
        xf.new_ones(xf.shape[0], 1)
    return _codes(xf, scale), scale


def outlier_columns(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool ``[K]``: columns of ``x2d`` ``[M, K]`` with ``|x| >= threshold`` in any row."""
    return (x2d.float().abs() >= threshold).any(dim=0)


def quantize_activations_llm(x2d: torch.Tensor, threshold: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8 split of ``x2d`` float ``[M, K]`` -> (codes int8 ``[M, K]`` with 0 in outlier
    columns, scale fp32 ``[M, 1]`` from the non-outlier elements, outlier column mask bool ``[K]``).

    The float part of the product is ``where(mask, x, 0) @ W.T``; static shapes throughout.
    """
    xf = x2d.float()
    ax = xf.abs()
    outlier = ax >= threshold
    cols = outlier.any(dim=0)
    inliers = torch.where(outlier, 0.0, ax)
    scale = activation_scale(inliers.amax(dim=-1, keepdim=True)) if xf.shape[-1] else \
        xf.new_ones(xf.shape[0], 1)
    codes = _codes(torch.where(cols, 0.0, xf), scale)
    return codes, scale, cols


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` ``[M, K]`` and ``b`` ``[N, K]`` -> int32 ``[M, N]``.

    Plain torch, any device: float GEMMs over K-chunks short enough that every partial sum is an
    exactly representable integer (fp32 with ``EXACT_FP32_K`` columns; fp64 off the CPU, where a
    user's TF32 setting could otherwise reach an fp32 GEMM), summed in int32.  Equal to
    ``torch._int_mm(a, b.T)`` bit for bit (tests/formats/test_int8dq.py checks it), and far faster
    than it on CPUs without VNNI (``_int_mm`` took ~5 s for 256x4096x11008 on the AVX2 machine).
    Assumes ``K <= 133,143`` so that the int32 result cannot overflow.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"int8_matmul: expected int8 [M, K] and int8 [N, K], got {a.dtype} "
                         f"{tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    k = a.shape[-1]
    dtype, step = (torch.float32, EXACT_FP32_K) if a.device.type == "cpu" else (torch.float64, max(k, 1))
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for k0 in range(0, k, step):
        part = torch.mm(a[:, k0:k0 + step].to(dtype), b[:, k0:k0 + step].to(dtype).t())
        out += part.to(torch.int32)
    return out

