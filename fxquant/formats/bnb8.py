"""bitsandbytes' LLM.int8 weights as its ``Linear8bitLt`` stores them (``bnb8``).

Layout (a ``Linear8bitLt`` state dict: ``weight`` and ``SCB``):
- ``qweight`` int8 ``[N, K]`` row-major (bitsandbytes' ``CB``), codes in [-127, 127];
- ``scb`` float32 ``[N]``: the absmax of each row (bitsandbytes' ``SCB``).

The weight is what bitsandbytes' ``int8_vectorwise_dequant`` computes (and transformers'
``dequantize`` of an 8-bit model), in fp32, in this order::

    W[n, k] = fl32(fl32(qweight[n, k] * scb[n]) * fl32(1/127))

Two roundings: no single fp32 per-row scale gives these values for every code (``qweight * fl32(scb
* fl32(1/127))``, what bitsandbytes' training-mode ``MatMul8bitFp`` multiplies by, differs in the last
bit for some codes), which is why the format keeps ``scb`` itself rather than reusing ``int8dq``'s
bf16 step.  For ``scb`` with at most 17 significant bits (bitsandbytes quantizes fp16 weights: its
``SCB`` are fp16 values, 11 bits) the inner product is exact and ``W`` is ``qweight * scb / 127``
rounded once.  Error bound: ``|W - Ŵ| <= scb / 254`` (half a step) plus that rounding.

Activations are quantized per token as :mod:`fxquant.formats.int8dq` defines (fp32; bitsandbytes
rounds them to fp16 first); the integer product is rescaled by :func:`row_scale`.

Quantizing (``bnb8`` on a float weight) mirrors ``int8_vectorwise_quant`` on the weight as given
(bitsandbytes casts it to fp16 first): ``scb = max |W[n, :]|``, ``qweight = round(W * fl32(127 /
scb))``; an all-zero row stores ``scb = 0`` and codes 0.
"""
from __future__ import annotations

import torch

QMAX = 127
INV_QMAX = 1.0 / QMAX  # bitsandbytes' 7.874015718698502e-3: applied to fp32 tensors, it is fl32(1/127)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``[N, K]`` -> (``qweight`` int8 ``[N, K]``, ``scb`` fp32 ``[N]``)."""
    w = weight.detach().float()
    scb = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    inv = torch.where(scb > 0, QMAX / scb, torch.zeros_like(scb))
    q = torch.round(w * inv[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scb


def dequantize_weight(qweight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """(``qweight`` int8 ``[N, K]``, ``scb`` fp32 ``[N]``) -> fp32 ``[N, K]``, bitsandbytes' weight
    bit for bit (the module docstring's order of operations)."""
    return qweight.float().mul(scb.float()[:, None]).mul_(INV_QMAX)


def row_scale(scb: torch.Tensor) -> torch.Tensor:
    """fp32 ``[N]`` step of each row, ``scb * fl32(1/127)``: what the integer product is rescaled by
    (within one fp32 rounding of the weight's own factor)."""
    return scb.float() * INV_QMAX


def nbytes(n: int, k: int) -> int:
    """Exact stored bytes of an ``[n, k]`` weight: codes + fp32 row absmax."""
    return n * k + 4 * n
