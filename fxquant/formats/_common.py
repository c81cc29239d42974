"""Small helpers shared by the format modules."""
from __future__ import annotations

import torch

_INT_VIEW = {2: torch.int16, 4: torch.int32}


def round_up_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast non-negative float ``t`` to ``dtype``, rounding up: ``result >= t`` elementwise.

    Used for scales so that the largest magnitude of a group still fits the code range after the
    scale is stored in a narrow dtype.
    """
    r = t.to(dtype)
    smaller = r.float() < t.float()
    # For non-negative finite floats the next representable value is the bit pattern + 1.
    bumped = (r.view(_INT_VIEW[r.element_size()]) + 1).view(dtype)
    return torch.where(smaller, bumped, r)


def rel_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative Frobenius error ``||W - Ŵ|| / ||W||`` (0.0 for an all-zero weight)."""
    w = weight.detach().float()
    denom = w.norm().item()
    return (w - approx.float()).norm().item() / denom if denom > 0 else 0.0


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def pad_last_group(weight: torch.Tensor, size: int) -> torch.Tensor:
    """``weight`` ``[N, K]`` padded to ``[N, size]`` with copies of its last column.

    Formats with groups of consecutive columns pad a partial last group this way before taking its
    statistics: the copies are a value the group already holds, so its min, max and absmax (hence
    its scale, zero and every code of the real values) are those of its real columns alone.  The
    padded columns' codes are stored, but meet only zero activations (kernels zero-pad or mask x) and
    are sliced off by the dequantization."""
    extra = size - weight.shape[1]
    if extra <= 0:
        return weight
    return torch.cat([weight, weight[:, -1:].expand(weight.shape[0], extra)], 1)
