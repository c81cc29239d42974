"""VPTQ's quantizer (Liu et al. 2024): k-means codebooks for vectors along the output dim, a second-order
(GPTQ-style) column pass, residual k-means on what is left, outlier columns in their own codebook.

The ``vptq`` format (:mod:`fxquant.formats.vptq`) stores, per input column, vectors of ``v`` consecutive
output rows as codebook indices.  Given a weight ``W`` ``[N, K]`` and, with calibration, ``H = XᵀX``
(``Stats.hessian``: the output error of a change ``D`` is ``tr(D H Dᵀ)``), :func:`fit` does:

1. **Dead columns**: an input no calibration token reached (``H_kk = 0``) gets weight 0 and ``H_kk = 1``
   (GPTQ's rule).
2. **Norm** (``enable_norm``): per column ``s = max - min``, ``b = min`` (VPTQ's ``init_norm``), stored
   in the codebook dtype; the work matrix is ``(W - b) / s``.  Its output error is ``tr(D' H' D'ᵀ)`` with
   ``H' = S H S`` (``S = diag(s)``): the error of the normalised weights, exactly.
3. **Permutation** (``enable_perm``): columns by decreasing ``diag(H)`` (VPTQ's and GPTQ's act order;
   without data, by decreasing ``||W[:, k]||²``); the first ``outlier_size`` of that order are the
   outlier columns.
4. **Codebooks**: weighted k-means (:mod:`._kmeans`, seeded) per codebook (the outlier columns', then
   each group's) on the column vectors, each vector weighted by its column's ``H'_kk`` (VPTQ's
   ``kmeans_mode="hessian"``; 1 without data), rounded to the codebook dtype.  Rows past ``N`` (the
   last vector of a column when ``v`` does not divide ``N``) repeat row ``N - 1``.
5. **Assignment**: without data, the nearest codebook vector of each vector.  With data
   (``error_feedback``), VPTQ's pass: columns in order, each column's vectors set to their nearest
   codebook vectors and the error ``e`` pushed onto the later columns by ``-e [H⁻¹]_{i,>i} / [H⁻¹]_ii``
   (upper Cholesky factor of the damped inverse, lazy blocks of ``block_size`` columns, as GPTQ).
6. **Residual** (``num_res_centroids``): k-means (same weights) on the remainder of the main columns
   after 5 (with data: the updated weights minus the codes, as VPTQ), then 5 again with both codebooks
   (each vector: nearest main vector, then the nearest residual vector to what remains).
7. With data, the plain nearest assignment on the same codebooks is scored too and the one with the
   lower ``tr(D H Dᵀ)`` is stored (``info["assignment"]``).

Deterministic for a ``seed`` (k-means seeding and sampling are the only random steps).  Cost: k-means
``O(iters * min(P, max_kmeans_vectors) * C * v)``; the column pass ``O(N K C)`` plus GPTQ's ``O(K³)``
(SmolLM2's 576 x 1536 at ``C = 256``: about a second).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import vptq as fmt
from . import _kmeans
from ._base import Method, MethodResult, Stats, check_number, quadratic_error

__all__ = ["VPTQ", "fit"]

#: weights up to this many elements are fitted on one thread: the k-means and column steps are small
#: GEMMs whose OpenMP fork / join costs more than they do (measured on the 2-core machine, loaded:
#: a [832, 8] x [8, 256] distance GEMM took 6-14 ms with 2 threads, 0.07-1.3 ms with one)
SINGLE_THREAD_MAX = 1 << 22


@dataclass(frozen=True, kw_only=True)
class VPTQ(Method):
    """``@vptq``: ``seed`` (k-means), ``kmeans_iters`` / ``kmeans_tol`` (Lloyd steps, relative improvement
    to stop at), ``max_kmeans_vectors`` (sample size of each k-means), ``hessian_weighted`` (k-means
    weights from ``diag(H)``), ``error_feedback`` (VPTQ's second-order column pass), ``damp_percent`` (of
    the mean Hessian diagonal) and ``block_size`` (columns per lazy update).  Module docstring: the steps."""

    name: ClassVar[str] = "vptq"
    needs_data: ClassVar[bool] = True
    per_expert: ClassVar[bool] = False  # one input statistic per layer
    needs_hessian: ClassVar[bool] = True
    seed: int = 0
    kmeans_iters: int = 30
    kmeans_tol: float = 1e-5
    max_kmeans_vectors: int = 1 << 15
    hessian_weighted: bool = True
    error_feedback: bool = True
    damp_percent: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        check_number("VPTQ", "seed", self.seed, kind=int, lo=0)
        check_number("VPTQ", "kmeans_iters", self.kmeans_iters, kind=int, lo=1)
        check_number("VPTQ", "kmeans_tol", self.kmeans_tol, lo=0)
        check_number("VPTQ", "max_kmeans_vectors", self.max_kmeans_vectors, kind=int, lo=1)
        check_number("VPTQ", "damp_percent", self.damp_percent, lo=0, hi=1, lo_open=True, valid="a number in (0, 1]")
        check_number("VPTQ", "block_size", self.block_size, kind=int, lo=1)
        for flag in ("hessian_weighted", "error_feedback"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"VPTQ.{flag}={getattr(self, flag)!r} is not valid; valid: True, False")

    def unsupported_reason(self, scheme) -> str | None:
        from ..schemes.vptq import VPTQ as Scheme

        if not isinstance(scheme, Scheme):
            return f"the VPTQ method fits the vptq format (codebooks of vectors), not {scheme}; use a 'vptq-...' scheme"
        return None

    def quantize(self, scheme, weight: torch.Tensor, stats: Stats | None) -> MethodResult:
        reason = self.unsupported_reason(scheme)
        if reason:
            raise ValueError(reason)
        hessian = None if stats is None else stats.hessian
        if hessian is None:
            raise ValueError(f"VPTQ needs calibration statistics with a Hessian (Stats.hessian = XᵀX) for {scheme}; "
                             f"got {'no stats' if stats is None else 'stats without a hessian'} (the scheme without "
                             "a method fits data-free)")
        if hessian.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"VPTQ: hessian has shape {tuple(hessian.shape)}, expected [{weight.shape[1]}] * 2 for "
                             f"a weight of shape {tuple(weight.shape)}")
        qw, info = fit(scheme.format, weight, hessian, self)
        return MethodResult(qw, info=info)


# ---- the fit --------------------------------------------------------------------------------------------
@dataclass
class _Part:
    """A codebook's columns ``c0 .. c1`` (stored order), vector length, sizes and fitted books."""

    c0: int
    c1: int
    vlen: int
    count: int
    res_count: int
    book: torch.Tensor | None = None
    res_book: torch.Tensor | None = None


def _vectors(w: torch.Tensor, vlen: int) -> torch.Tensor:
    """``[N, c]`` -> ``[c, R, vlen]`` column vectors, rows past ``N`` repeating row ``N - 1``."""
    n = w.shape[0]
    rows = -(-n // vlen) * vlen
    if rows > n:
        w = torch.cat([w, w[-1:].expand(rows - n, -1)], 0)
    return w.t().reshape(w.shape[1], rows // vlen, vlen)


def _fit_book(part_w: torch.Tensor, vlen: int, count: int, col_weight: torch.Tensor, p: VPTQ, seed: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    vec = _vectors(part_w, vlen)
    wts = col_weight[:, None].expand(vec.shape[0], vec.shape[1]).reshape(-1)
    book, info = _kmeans.kmeans(vec.reshape(-1, vlen), count, wts, iters=p.kmeans_iters, tol=p.kmeans_tol,
                                seed=seed, max_points=p.max_kmeans_vectors)
    return book.to(dtype).float(), info


def _assign_nearest(w: torch.Tensor, parts: list[_Part], residual: bool):
    """Plain nearest assignment: ``(q [N, K], codes {part: (idx, res)})``."""
    n = w.shape[0]
    q = torch.empty_like(w)
    codes = {}
    for i, pt in enumerate(parts):
        vec = _vectors(w[:, pt.c0:pt.c1], pt.vlen)  # [c, R, v]
        flat = vec.reshape(-1, pt.vlen)
        idx = _kmeans.nearest(flat, pt.book)
        approx = pt.book[idx]
        res = None
        if residual and pt.res_book is not None:
            res = _kmeans.nearest(flat - approx, pt.res_book)
            approx = approx + pt.res_book[res]
        q[:, pt.c0:pt.c1] = approx.reshape(vec.shape).reshape(vec.shape[0], -1).t()[:n]
        codes[i] = (idx.reshape(vec.shape[:2]), None if res is None else res.reshape(vec.shape[:2]))
    return q, codes


def _upper_hinv(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    from .gptq import _upper_inverse_cholesky

    h = h.clone()
    h.diagonal().add_(damp_percent * float(h.diagonal().mean()))
    return _upper_inverse_cholesky(h)


def _assign_feedback(w: torch.Tensor, hinv: torch.Tensor, parts: list[_Part], residual: bool, block: int):
    """VPTQ's column pass (module docstring, step 5): ``(q, codes, target)``; ``target`` holds each column
    as it was when quantized (the updated weights: the residual k-means fits ``target - q``)."""
    n, k = w.shape
    w = w.clone()
    q, target = torch.empty_like(w), torch.empty_like(w)
    owner = torch.empty(k, dtype=torch.int64)
    for i, pt in enumerate(parts):
        owner[pt.c0:pt.c1] = i
    idx = {i: torch.empty(pt.c1 - pt.c0, -(-n // pt.vlen), dtype=torch.int64) for i, pt in enumerate(parts)}
    res = {i: torch.empty_like(idx[i]) for i, pt in enumerate(parts) if residual and pt.res_book is not None}
    books = [(pt.book, pt.book.square().sum(1), pt.res_book,
              None if pt.res_book is None else pt.res_book.square().sum(1)) for pt in parts]
    owner = owner.tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the column loop runs small ops: OpenMP's fork / join costs more than they do
    try:
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            w1, err1, h1 = w[:, i1:i2].clone(), torch.empty(n, i2 - i1), hinv[i1:i2, i1:i2]
            for j in range(i2 - i1):
                col = i1 + j
                pi = owner[col]
                pt = parts[pi]
                book, bn, rbook, rbn = books[pi]
                vec = _vectors(w1[:, j:j + 1], pt.vlen)[0]  # [R, v]
                t = torch.addmm(bn[None, :], vec, book.t(), alpha=-2).argmin(1)
                approx = book[t]
                idx[pi][col - pt.c0] = t
                if pi in res:
                    tr = torch.addmm(rbn[None, :], vec - approx, rbook.t(), alpha=-2).argmin(1)
                    approx = approx + rbook[tr]
                    res[pi][col - pt.c0] = tr
                qc = approx.reshape(-1)[:n]
                q[:, col], target[:, col] = qc, w1[:, j]
                e = (w1[:, j] - qc) / h1[j, j]
                w1[:, j:] -= torch.outer(e, h1[j, j:])
                err1[:, j] = e
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    finally:
        torch.set_num_threads(threads)
    return q, {i: (idx[i], res.get(i)) for i in range(len(parts))}, target


def fit(scheme, weight: torch.Tensor, hessian: torch.Tensor | None, p: VPTQ):
    """``(QuantizedWeight, info)`` of float ``weight`` ``[N, K]`` in ``scheme``'s ``vptq`` layout; ``hessian``
    ``[K, K]`` (``XᵀX``) or ``None`` (no data: unweighted k-means, nearest assignment)."""
    threads = torch.get_num_threads()
    if weight.numel() <= SINGLE_THREAD_MAX:
        torch.set_num_threads(1)
    try:
        return _fit(scheme, weight, hessian, p)
    finally:
        torch.set_num_threads(threads)


def _fit(scheme, weight, hessian, p):
    start = time.perf_counter()
    n, k = weight.shape
    lay = scheme.layout(n, k)
    dt = scheme.codebook_dtype
    w = weight.detach().float().clone()
    h = None
    if hessian is not None:
        h = hessian.detach().float().clone()
        h = (h + h.t()) / 2
        dead = h.diagonal() <= 0
        h[dead, dead] = 1
        w[:, dead] = 0
    key = h.diagonal().clone() if h is not None else w.square().sum(0)
    s = b = None
    if lay.enable_norm:
        lo, hi = w.amin(0), w.amax(0)
        s = (hi - lo).to(dt)
        s = torch.where(s.float() > 0, s, torch.ones_like(s))
        b = lo.to(dt)
        w = (w - b.float()) / s.float()
        if h is not None:
            h = h * s.float()[:, None] * s.float()[None, :]
    perm = torch.argsort(key, descending=True, stable=True) if lay.enable_perm else torch.arange(k)
    wp = w[:, perm]
    hp = None if h is None else h[perm][:, perm]
    col_w = hp.diagonal().clone() if hp is not None and p.hessian_weighted else torch.ones(k)
    o, gs = lay.outlier_size, lay.group_size
    parts = ([_Part(0, o, lay.outlier_vector_len, lay.num_outlier_centroids, 0)] if o else []) + [
        _Part(o + g * gs, o + (g + 1) * gs, lay.vector_len, lay.num_centroids, lay.num_res_centroids)
        for g in range(lay.group_num)]
    info = {"seed": p.seed, "kmeans": []}
    for i, pt in enumerate(parts):
        pt.book, ki = _fit_book(wp[:, pt.c0:pt.c1], pt.vlen, pt.count, col_w[pt.c0:pt.c1], p, p.seed + i, dt)
        info["kmeans"].append(ki)
    residual = lay.num_res_centroids > 0
    feedback = hp is not None and p.error_feedback
    hinv = _upper_hinv(hp, p.damp_percent) if feedback else None
    if feedback:
        q, codes, target = _assign_feedback(wp, hinv, parts, False, p.block_size)
        remainder = target - q
    else:
        q, codes = _assign_nearest(wp, parts, False)
        remainder = wp - q
    if residual:
        for i, pt in enumerate(parts):
            if pt.res_count:
                pt.res_book, ki = _fit_book(remainder[:, pt.c0:pt.c1], pt.vlen, pt.res_count, col_w[pt.c0:pt.c1], p,
                                          p.seed + 100 + i, dt)
                info["kmeans"].append(ki)
        if feedback:
            q, codes, _ = _assign_feedback(wp, hinv, parts, True, p.block_size)
        else:
            q, codes = _assign_nearest(wp, parts, True)
    if feedback:
        plain_q, plain_codes = _assign_nearest(wp, parts, residual)
        err, plain_err = quadratic_error(wp - q, hp), quadratic_error(wp - plain_q, hp)
        info.update(output_error_feedback=err, output_error_nearest=plain_err)
        if not err < plain_err:
            codes = plain_codes
        info["assignment"] = "error feedback" if err < plain_err else "nearest"
    else:
        info["assignment"] = "nearest"
    tensors = _store(lay, parts, codes, perm, s, b, dt)
    from ..schemes._base import QuantizedWeight

    info["quantization_time"] = time.perf_counter() - start
    return QuantizedWeight(scheme.op, tensors, scheme.attrs(lay), n, k), info


def _store(lay: fmt.Layout, parts: list[_Part], codes: dict, perm: torch.Tensor, s, b, dt) -> dict:
    """The format's tensors from the fitted books and codes."""
    empty = torch.empty(0, dtype=dt)
    o, g = lay.outlier_size, lay.group_num
    main = [i + (1 if o else 0) for i in range(g)]
    idx = torch.stack([codes[i][0].t() for i in main])  # [G, R, gs]
    res = torch.stack([codes[i][1].t() for i in main]) if lay.num_res_centroids else None
    t = {"indices": fmt.pack_indices(fmt.merge(idx, res, lay.index_bits), lay.total_bits),
         "centroids": torch.stack([parts[i].book.reshape(-1) for i in main]).to(dt),
         "res_centroids": (torch.stack([parts[i].res_book.reshape(-1) for i in main]).to(dt)
                           if lay.num_res_centroids else empty),
         "outlier_indices": fmt.to_uint16_bits(codes[0][0].t())[None] if o else torch.empty(0, dtype=torch.int16),
         "outlier_centroids": parts[0].book.reshape(1, -1).to(dt) if o else empty,
         "perm": fmt.to_uint16_bits(perm) if lay.enable_perm else torch.empty(0, dtype=torch.int16),
         "weight_scale": s.contiguous() if lay.enable_norm else empty,
         "weight_bias": b.contiguous() if lay.enable_norm else empty}
    return {name: x.contiguous() for name, x in t.items()}


def bits_per_weight(nbytes: int, n: int, k: int) -> float:
    """Stored bits per weight of an ``[n, k]`` layer of ``nbytes`` bytes."""
    return 8 * nbytes / max(n * k, 1) if n * k else math.nan
