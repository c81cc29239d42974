"""int8 symmetric per-output-channel weights (``int8wo``).

Layout: ``qweight`` int8 ``[N, K]`` row-major (same as ``nn.Linear.weight``), values in
[-127, 127]; ``scale`` bfloat16 ``[N]``.  ``W[n, k] ≈ qweight[n, k] * scale[n]``.
The scale is rounded to bfloat16 *before* the codes are chosen, so the codes are optimal for the
scale actually stored, and the CPU kernel (which wants bf16 scales) sees exactly the stored value.
Error bound: ``|W - Ŵ| <= scale / 2`` elementwise.
"""
from __future__ import annotations

import torch

from ._common import round_up_to

QMAX = 127
SCALE_DTYPE = torch.bfloat16


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` float ``[N, K]`` -> (``qweight`` int8 ``[N, K]``, ``scale`` bf16 ``[N]``)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = round_up_to(amax / QMAX, SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(``qweight`` int8 ``[N, K]``, ``scale`` ``[N]``) -> float32 ``[N, K]``."""
    return qweight.float() * scale.float()[:, None]


def nbytes(n: int, k: int) -> int:
    """Exact storage bytes of an ``[n, k]`` int8wo weight (codes + scales)."""
    return n * k + n * torch.finfo(SCALE_DTYPE).bits // 8
