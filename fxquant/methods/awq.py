"""AWQ (Lin et al. 2023): protect the weights of salient input channels by scaling them up before
rounding, then search each group's clipping range.

For the linears that read the same input ``x`` (q/k/v after one norm, gate/up after another), one
per-input-channel scale ``s = mean|x|^α`` (normalised to ``sqrt(max s · min s) = 1``) multiplies
their weights' columns, ``W' = W · diag(s)``, and the input is divided by it, ``x' = x / s``: the
product is unchanged, but a channel with large activations gets finer steps.  ``α`` is searched
on a grid of ``n_grid`` points in ``[0, 1]`` against the output error on the calibration data,
``sum_sites tr(D H Dᵀ)`` with ``D = W - Q(W')·diag(1/s)`` and ``H = XᵀX`` (all calibration tokens,
exactly, instead of a sample of them).  Then each group's range is clipped to the ratio in
``1 .. 1 - max_shrink`` (``n_grid`` steps) that minimises the group's partial output error
``d H_gg dᵀ``, as AutoAWQ's clip search does.

Where ``1/s`` goes is the pass's business (:mod:`fxquant.passes.calibrate`): folded into the
preceding norm's weight (or a linear's output rows) when that op feeds only these sites, else
applied to ``x`` just before the op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Method, MethodResult, Stats, check_number, column_grid_reason, quadratic_error

__all__ = ["AWQ"]


@dataclass(frozen=True, kw_only=True)
class AWQ(Method):
    """``@awq``: ``n_grid`` (points of the α grid and of the clip grid, 20), ``max_shrink`` (clip
    ratios down to ``1 - max_shrink``, 0.5), ``clip`` (run the clip search, True)."""

    name: ClassVar[str] = "awq"
    needs_data: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True
    needs_channel_stats: ClassVar[bool] = True
    n_grid: int = 20
    max_shrink: float = 0.5
    clip: bool = True

    def __post_init__(self):
        check_number("AWQ", "n_grid", self.n_grid, kind=int, lo=1)
        check_number("AWQ", "max_shrink", self.max_shrink, lo=0, hi=1, valid="a number in [0, 1)")
        if self.max_shrink >= 1:
            raise ValueError(f"AWQ.max_shrink={self.max_shrink!r} is not valid; valid: a number in [0, 1)")
        if not isinstance(self.clip, bool):
            raise ValueError(f"AWQ.clip={self.clip!r} is not valid; valid: True, False")

    def unsupported_reason(self, scheme) -> str | None:
        return column_grid_reason("AWQ", scheme)

    def quantize(self, scheme, weight: torch.Tensor, stats: Stats | None) -> MethodResult:
        return self.quantize_group([scheme], [weight], stats)[0]

    def quantize_group(self, schemes, weights, stats: Stats | None, scale_search: bool = True) -> list[MethodResult]:
        """One input scale for every weight reading the same input; each weight's clip search.
        ``scale_search=False``: no input scale (where it could go nowhere), the clip search only."""
        if stats is None or stats.hessian is None:
            raise ValueError(f"AWQ needs calibration statistics with a Hessian for {', '.join(map(str, schemes))}")
        h = stats.hessian.float()
        xmean = stats.mean_abs.float().clamp(min=1e-8)
        ws = [w.detach().float() for w in weights]
        total = sum(quadratic_error(w - _rtn(s, w), h) for s, w in zip(schemes, ws))
        best = (total, 0.0, torch.ones_like(xmean))  # alpha 0 is RTN
        for i in range(1, self.n_grid + 1 if scale_search else 1):
            alpha = i / self.n_grid
            s = xmean.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = sum(quadratic_error(w - _rtn(sc, w * s) / s, h) for sc, w in zip(schemes, ws))
            if err < best[0]:
                best = (err, alpha, s)
        _, alpha, s = best
        out = []
        for sc, w in zip(schemes, ws):
            n, k = w.shape
            grid = sc.grid(n, k)
            ws_ = w * s
            wg = grid.groups(ws_)
            ratios = torch.ones(wg.shape[0])
            if self.clip:
                ratios = self._clip_search(grid, wg, h / s[:, None] / s[None, :], n, k)
            amax = wg.abs().amax(dim=-1) * ratios
            lo, hi = wg.amin(dim=-1).clamp(min=-amax), wg.amax(dim=-1).clamp(max=amax)
            scale, offset = grid.fit(wg, lo, hi)
            q = grid.encode(wg, scale, offset)
            info = {"alpha": alpha, "mean_clip_ratio": float(ratios.mean())}
            out.append(MethodResult(sc.pack_grid(q, scale, offset, n, k), input_scale=None if alpha == 0 else s,
                                    info=info))
        return out

    def _clip_search(self, grid, wg: torch.Tensor, h: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Per group, the clip ratio minimising its partial output error ``d H_gg dᵀ`` (``h`` the
        Hessian of the scaled input)."""
        g = grid.group_size
        kp = wg.shape[0] // n * g
        hp = torch.zeros(kp, kp)
        hp[:k, :k] = h  # padded columns meet zero activations
        blocks = torch.stack([hp[j:j + g, j:j + g] for j in range(0, kp, g)])  # [G, g, g]
        ngroups = kp // g
        amax, lo0, hi0 = wg.abs().amax(dim=-1), wg.amin(dim=-1), wg.amax(dim=-1)
        best_err = torch.full((wg.shape[0],), float("inf"))
        best = torch.ones(wg.shape[0])
        steps = max(1, round(self.n_grid * self.max_shrink))
        for i in range(steps + 1):
            r = 1 - self.max_shrink * i / steps
            m = amax * r
            scale, offset = grid.fit(wg, lo0.clamp(min=-m), hi0.clamp(max=m))
            d = (wg - grid.decode(grid.encode(wg, scale, offset), scale, offset)).reshape(n, ngroups, g)
            err = torch.einsum("njg,jgh,njh->nj", d, blocks, d).reshape(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
        return best


def _rtn(scheme, w: torch.Tensor) -> torch.Tensor:
    """The float value of ``w`` after the format's round-to-nearest."""
    grid = scheme.grid(*w.shape)
    wg = grid.groups(w)
    q, scale, offset = grid.rtn(wg)
    return grid.ungroup(grid.decode(q, scale, offset), *w.shape)
