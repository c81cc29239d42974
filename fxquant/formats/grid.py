"""The affine code grid of the integer weight-only formats, opened for the algorithms.

``int8wo``, ``int4wo-<g>`` and ``[u]int<b>wo-<g>[-axis<a>]`` all store, per group of weights,
``W ≈ (q - mid) * scale + offset`` with integer codes ``q`` in ``qlo .. qhi`` and ``scale`` /
``offset`` in ``param_dtype`` (``offset`` is 0 for the symmetric formats).  A format's round-to-
nearest (RTN) quantize chooses the parameters from each group's min / max and encodes in one step;
:class:`Grid` splits that into the steps an algorithm needs:

- :meth:`Grid.groups` / :meth:`Grid.ungroup`: the weight as ``[groups, group_size]`` rows, padded
  exactly as the format pads a partial group (and back);
- :meth:`Grid.fit`: the format's own RTN parameters from each group's range (optionally a clipped
  range, as AWQ's clip search and GPTQ's group statistics use);
- :meth:`Grid.encode` / :meth:`Grid.decode`: codes for given parameters, and their values;
- :meth:`Grid.store`: free-form float parameters (HQQ's optimised scale and zero) rounded to what
  the format stores.

A scheme exposes its grid (``Scheme.grid(n, k)``) and packs codes and parameters in this group
layout into its own storage (``Scheme.pack_grid``), so an algorithm emits the same buffers as RTN
and the ops and kernels never change.  ``pack_grid(fit + encode)`` is bit-identical to the
scheme's RTN ``quantize`` (tests/formats/test_grid.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import pad_last_group, round_up, round_up_to

__all__ = ["Grid"]

MIN_SCALE = 1e-10


@dataclass(frozen=True)
class Grid:
    """Codes ``qlo .. qhi``; value ``(q - mid) * scale + offset``; groups of ``group_size`` along
    ``axis`` (1: consecutive input columns of one row; 0: one column across rows strided by
    ``ceil(N / group_size)``, as HQQ's ``axis=0``)."""

    qlo: int
    qhi: int
    mid: int
    symmetric: bool
    group_size: int
    axis: int = 1
    #: symmetric formats: ``scale = absmax / sym_den`` (``(2**b - 1) / 2`` for intx, 127 for int8wo)
    sym_den: float = 1.0
    param_dtype: torch.dtype = torch.bfloat16
    min_scale: float = MIN_SCALE  # the scale of an all-zero / all-equal group

    @property
    def levels(self) -> int:
        return self.qhi - self.qlo + 1

    # -- layout ------------------------------------------------------------------------------------
    def num_groups(self, n: int, k: int) -> int:
        g = self.group_size
        return n * (-(-k // g)) if self.axis == 1 else (-(-n // g)) * k

    def groups(self, weight: torch.Tensor) -> torch.Tensor:
        """float ``[N, K]`` -> float32 ``[groups, group_size]`` (a copy).  Axis 1: row ``n * G + j``
        is group ``j`` of row ``n``, the last partial group padded with copies of column K - 1.
        Axis 0: row ``r * K + k`` is column ``k`` of rows ``r, r + R, ...`` (``R = ceil(N / g)``),
        missing rows padded with row ``n % R``.  Padding copies real values of the group, so every
        group statistic is its real elements'."""
        w = weight.detach().float()
        n, k = w.shape
        g = self.group_size
        if self.axis == 1:
            return pad_last_group(w, round_up(k, g)).reshape(-1, g).clone()
        r = -(-n // g)
        if r * g != n:
            w = torch.cat([w, w[torch.arange(n, r * g, device=w.device) % r]])
        return w.reshape(g, r, k).permute(1, 2, 0).reshape(r * k, g).contiguous()

    def ungroup(self, wg: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Inverse of :meth:`groups` (padding dropped): ``[groups, g]`` -> ``[N, K]``."""
        g = self.group_size
        if self.axis == 1:
            return wg.reshape(n, -1)[:, :k]
        r = -(-n // g)
        return wg.reshape(r, k, g).permute(2, 0, 1).reshape(r * g, k)[:n]

    # -- parameters and codes ----------------------------------------------------------------------
    def fit(self, wg: torch.Tensor, lo: torch.Tensor | None = None,
            hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The format's RTN parameters (float32 ``[groups]`` holding stored values) for groups
        ``wg`` ``[groups, g]``, or for the ranges ``lo`` / ``hi`` ``[groups]`` when given (a clipped
        range): the scale rounded *up* to ``param_dtype`` so the range fits the codes, the offset
        (the value of code ``mid``) rounded to nearest; symmetric: ``absmax / sym_den``, offset 0."""
        lo = wg.amin(dim=-1) if lo is None else lo.float()
        hi = wg.amax(dim=-1) if hi is None else hi.float()
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = round_up_to((amax / self.sym_den).clamp(min=self.min_scale), self.param_dtype).float()
            return scale, torch.zeros_like(scale)
        scale = round_up_to(((hi - lo) / (self.qhi - self.qlo)).clamp(min=self.min_scale), self.param_dtype).float()
        offset = (lo + (self.mid - self.qlo) * scale).to(self.param_dtype).float()
        return scale, offset

    def store(self, scale: torch.Tensor, offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Free-form float parameters -> the values the format stores (rounded to nearest in
        ``param_dtype``, the scale kept positive; symmetric formats store no offset: 0)."""
        s = scale.float().abs().clamp(min=self.min_scale).to(self.param_dtype).float()
        if self.symmetric or offset is None:
            return s, torch.zeros_like(s)
        return s, offset.float().to(self.param_dtype).float()

    def encode(self, wg: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Nearest codes (float32, ``qlo .. qhi``) of ``wg`` for the parameters (``[groups]`` or
        broadcastable against ``wg``), computed as the formats do: ``round((w - offset) / scale + mid)``."""
        s, o = _col(scale, wg), _col(offset, wg)
        if self.symmetric:
            return (torch.round(wg / s) + self.mid).clamp_(self.qlo, self.qhi)
        return torch.round((wg - o) / s + self.mid).clamp_(self.qlo, self.qhi)

    def decode(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Values of codes ``q`` (float32)."""
        return (q.float() - self.mid) * _col(scale, q) + _col(offset, q)

    def rtn(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scale, offset)`` of round-to-nearest: what the format's ``quantize`` stores."""
        scale, offset = self.fit(wg)
        return self.encode(wg, scale, offset), scale, offset


def _col(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    p = p.float()
    return p[:, None] if p.dim() == 1 and like.dim() == 2 else p
