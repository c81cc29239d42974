"""Weighted k-means (Lloyd) on CPU tensors, deterministic for a seed, with bounded work: the codebook
fit of vector quantization (:mod:`fxquant.methods.vptq`).

``kmeans(points [P, d], k, weights [P])`` minimises ``Σ_i w_i ||p_i - c_{a(i)}||²``: k-means++ seeding
(D² sampling times the weights) for ``k <= PLUSPLUS_MAX``, else ``k`` distinct points drawn with
probability proportional to the weights; then Lloyd steps (nearest centroid, weighted means) until the
objective improves by less than ``tol`` (relative) or ``iters`` steps.  At most ``max_points`` points
take part (the heaviest quarter, then a uniform sample of the rest drawn with the seed, their weights scaled to
stand for the rest: :func:`_sample`); a cluster that empties is
re-seeded at the point with the largest weighted error.  Nearest-centroid search runs in chunks of
points (``||c||² - 2 p·c`` by one GEMM each) of ``CHUNK_ELEMENTS`` distances, so memory stays bounded.
"""
from __future__ import annotations

import torch

#: distances per GEMM of :func:`nearest` (fp32, 1 MB: in cache for the argmin that reads them).  Measured
#: (110592 points x 256 centroids of 8 dims, one thread, loaded 2-core machine, ms, min / median):
#: 128 K distances 118 / 133, 512 K 120 / 157, 1 M 151 / 161, 4 M 210 / 280, 16 M 406 / 423.
CHUNK_ELEMENTS = 1 << 18
#: largest ``k`` seeded by k-means++ (its seeding costs ``k`` passes over the points)
PLUSPLUS_MAX = 4096


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (int64 ``[P]``) of the nearest centroid (Euclidean; ties: the lowest index) of each point."""
    c = centroids.float()
    cn = c.square().sum(1)
    out = torch.empty(points.shape[0], dtype=torch.int64)
    chunk = max(64, CHUNK_ELEMENTS // max(c.shape[0], 1))
    for i in range(0, points.shape[0], chunk):
        p = points[i:i + chunk].float()
        out[i:i + chunk] = torch.addmm(cn[None, :], p, c.t(), alpha=-2).argmin(1)
    return out


def _seed(points: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    p = points.shape[0]
    w = weights.double().clamp(min=0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    if k > PLUSPLUS_MAX or k >= p:
        n = min(k, p)
        first = torch.multinomial(w, n, replacement=False, generator=gen)
        return points[first].clone()
    chosen = [int(torch.multinomial(w, 1, generator=gen))]
    d2 = (points - points[chosen[0]]).square().sum(1).double()
    for _ in range(1, k):
        prob = d2 * w
        total = float(prob.sum())
        nxt = int(torch.multinomial(prob if total > 0 else w, 1, generator=gen))
        chosen.append(nxt)
        torch.minimum(d2, (points - points[nxt]).square().sum(1).double(), out=d2)
    return points[torch.tensor(chosen)].clone()


def _sample(pts: torch.Tensor, w: torch.Tensor, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` of the points: the ``count // 4`` heaviest ones, then a uniform sample of the others with their
    weights scaled up by the fraction left out (an unbiased estimate of their part of the objective), so a few
    heavy points (a column that meets outlier activations) are never sampled away.  Equal weights: uniform.
    Measured (SmolLM2 layer 11 down_proj, vptq-v4-c256@vptq, relative output error): uniform sampling 0.56,
    this 0.0002 (its few columns that meet the model's outlier activations were sampled away)."""
    uniform = bool((w == w[0]).all())  # no weights: a uniform sample (a "heaviest" quarter would be arbitrary)
    heavy = torch.topk(w, 0 if uniform else count // 4).indices
    rest = torch.ones(pts.shape[0], dtype=torch.bool)
    rest[heavy] = False
    others = rest.nonzero().flatten()
    pick = others[torch.randperm(others.numel(), generator=gen)[:count - heavy.numel()]]
    scale = others.numel() / max(pick.numel(), 1)
    return torch.cat([pts[heavy], pts[pick]]), torch.cat([w[heavy], w[pick] * scale])


def kmeans(points: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, iters: int = 50,
           tol: float = 1e-5, seed: int = 0, max_points: int = 1 << 15) -> tuple[torch.Tensor, dict]:
    """``(centroids fp32 [k, d], info)`` of ``points`` ``[P, d]`` (module docstring).  Fewer distinct points
    than ``k``: the extra centroids repeat points (never chosen over an equal one: ties take the lowest
    index).  ``info``: ``iterations``, ``inertia`` (the weighted objective on the points used), ``points``."""
    pts = points.float()
    w = torch.ones(pts.shape[0]) if weights is None else weights.float().clamp(min=0)
    gen = torch.Generator().manual_seed(int(seed))
    if pts.shape[0] > max_points:
        pts, w = _sample(pts, w, max_points, gen)
    c = _seed(pts, w, k, gen)
    if c.shape[0] < k:  # fewer points than centroids
        c = torch.cat([c, c[:1].expand(k - c.shape[0], -1)], 0)
    prev, it, inertia = float("inf"), 0, float("inf")
    for it in range(1, iters + 1):
        a = nearest(pts, c)
        err = (pts - c[a]).square().sum(1) * w
        inertia = float(err.sum(dtype=torch.float64))
        mass = torch.zeros(k).index_add_(0, a, w)
        total = torch.zeros_like(c).index_add_(0, a, pts * w[:, None])
        live = mass > 0
        c = torch.where(live[:, None], total / mass.clamp(min=1e-30)[:, None], c)
        dead = (~live).nonzero().flatten()
        if dead.numel() and pts.shape[0] > k:  # re-seed empty clusters at the worst-fitted points
            worst = err.topk(min(dead.numel(), pts.shape[0])).indices
            c[dead[:worst.numel()]] = pts[worst]
        if prev < float("inf") and prev - inertia <= tol * max(prev, 1e-30) and not dead.numel():
            break
        prev = inertia
    return c, {"iterations": it, "inertia": inertia, "points": pts.shape[0]}
