"""The two searches of the AQLM quantizer (:mod:`fxquant.methods.aqlm`): k-means for the codebooks' init, and
the beam search over code tuples.

Beam search, per point (a block of weights): minimise ``Q(v) = s2 vᵀ A v - 2 vᵀ z`` over
``v = sum_c C_c[b_c]``.  Starting from the current tuple, for each codebook ``c`` in turn every kept tuple
tries all ``E`` codewords in position ``c``: with ``p`` the other codewords' sum,
``Q(p + e) = s2 pᵀAp - 2 pᵀz + s2 eᵀAe + 2 (s2 A p - z)ᵀ e``, all ``E`` scores of a kept tuple by one GEMM
(the constant terms as two more columns).  The ``beam`` best distinct tuples go on (a tuple reached from two
kept ones is kept once).  The current tuple is a candidate at the first step and every kept tuple's own code
is a candidate at each later one, so the result's ``Q`` is never above the start's.
"""
from __future__ import annotations

import torch

#: floats of the ``[points, beams, E]`` score tensor per chunk of the beam search (bounds its memory)
BEAM_CHUNK_FLOATS = 1 << 22
#: distances per chunk of the k-means assignment
KMEANS_CHUNK_FLOATS = 1 << 22


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each point (ties: the lowest index), in chunks of points."""
    cn = centroids.square().sum(1)
    out = torch.empty(points.shape[0], dtype=torch.int64)
    step = max(1, KMEANS_CHUNK_FLOATS // max(1, centroids.shape[0]))
    for i in range(0, points.shape[0], step):
        out[i:i + step] = torch.addmm(cn[None, :], points[i:i + step], centroids.t(), alpha=-2).argmin(1)
    return out


def kmeans(points: torch.Tensor, k: int, iters: int, max_points: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` centroids ``[k, d]`` of ``points`` ``[P, d]``: Lloyd steps from ``k`` distinct points drawn
    with ``gen`` (on a sample of at most ``max_points``); an emptied cluster takes the worst-fitted point.
    Fewer points than ``k``: every point is a centroid, the rest repeat them."""
    p = points.shape[0]
    if p > max_points:
        points = points[torch.randperm(p, generator=gen)[:max_points]]
        p = max_points
    first = torch.randperm(p, generator=gen)[:k]
    c = points[first].clone()
    if c.shape[0] < k:
        c = c[torch.arange(k) % c.shape[0]].clone()
        return c
    for _ in range(iters):
        a = nearest(points, c)
        mass = torch.zeros(k).index_add_(0, a, torch.ones(p))
        total = torch.zeros_like(c).index_add_(0, a, points)
        live = mass > 0
        new = torch.where(live[:, None], total / mass.clamp(min=1)[:, None], c)
        dead = (~live).nonzero().flatten()
        if dead.numel():
            err = (points - new[a]).square().sum(1)
            new[dead] = points[err.topk(min(dead.numel(), p)).indices[:dead.numel()]]
        if torch.equal(new, c):
            break
        c = new
    return c


def beam_search(cb: torch.Tensor, codes: torch.Tensor, z: torch.Tensor, s2: torch.Tensor, a: torch.Tensor | None,
                 ea: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code tuples ``[P, M]`` minimising ``Q(v) = s2 vᵀ A v - 2 vᵀ z`` per point (``A = I`` when ``a`` is
    None; ``ea[c, e] = C_c[e]ᵀ A C_c[e]``), from ``codes`` (module docstring) -> (codes, ``Q``): ``cb``
    ``[M, E, d]``, ``z`` ``[P, d]``, ``s2`` ``[P]``, ``a`` ``[d, d]`` or None."""
    p_total, nc = codes.shape
    e = cb.shape[1]
    step = max(1, BEAM_CHUNK_FLOATS // (beam * e))
    out_codes = torch.empty_like(codes)
    out_q = torch.empty(p_total)
    for i in range(0, p_total, step):
        sl = slice(i, i + step)
        out_codes[sl], out_q[sl] = _beam_chunk(cb, codes[sl], z[sl], s2[sl], a, ea, beam)
    return out_codes, out_q


def _beam_chunk(cb, codes, z, s2, a, ea, beam):
    p, nc = codes.shape
    e, d = cb.shape[1], cb.shape[2]
    bits = max(1, (e - 1).bit_length())
    kept = codes[:, None, :]  # [P, B, M]
    v = cb[0][codes[:, 0]]
    for c in range(1, nc):
        v = v + cb[c][codes[:, c]]
    v = v[:, None, :]  # [P, B, d]
    q = None
    for c in range(nc):
        other = v - cb[c][kept[..., c]]  # [P, B, d]: the other codebooks' sum
        ao = other if a is None else other @ a
        base = s2[:, None] * (other * ao).sum(-1) - 2 * (other * z[:, None, :]).sum(-1)  # [P, B]
        y = s2[:, None, None] * ao - z[:, None, :]
        # scores[p, b, e] = base + s2 * ea[c, e] + 2 y · C_c[e]: one GEMM with the constant terms as two more columns
        lhs = torch.cat([2 * y, s2[:, None, None].expand(-1, y.shape[1], 1), base[..., None]], -1)
        rhs = torch.cat([cb[c].t(), ea[c][None, :], torch.ones(1, e)], 0)  # [d + 2, E]
        flat = (lhs.reshape(-1, d + 2) @ rhs).view(p, -1)  # [P, B*E]
        take = min(beam * beam if beam > 1 and kept.shape[1] > 1 else beam, flat.shape[1])
        vals, idx = flat.topk(take, dim=1, largest=False, sorted=True)
        src, ent = idx // e, idx % e
        cand = kept.gather(1, src[..., None].expand(-1, -1, nc)).clone()
        cand[..., c] = ent
        if kept.shape[1] > 1 and take > 1:  # one tuple reached from two kept ones: keep its first (best) copy
            if nc * bits <= 62:  # a tuple as one integer
                key = (cand << (torch.arange(nc) * bits)).sum(-1)
                same = key[:, :, None] == key[:, None, :]
            else:
                same = (cand[:, :, None, :] == cand[:, None, :, :]).all(-1)
            dup = (same & torch.ones(take, take, dtype=torch.bool).tril(-1)).any(-1)
            vals = vals.masked_fill(dup, float("inf"))
            vals, pick = vals.topk(min(beam, take), dim=1, largest=False, sorted=True)
            src, cand = src.gather(1, pick), cand.gather(1, pick[..., None].expand(-1, -1, nc))
        kept = cand
        v = other.gather(1, src[..., None].expand(-1, -1, d)) + cb[c][kept[..., c]]
        q = vals
    return kept[:, 0], q[:, 0]
