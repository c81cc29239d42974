"""AQLM (Egiazarian et al., ICML 2024): codes and codebooks of the ``aqlm-<M>x<B>-g<in>`` format fitted to a
layer's weight error, or with calibration statistics to its output error.

Notation (:mod:`fxquant.formats.aqlm`): the weight ``W`` ``[N, K]`` is cut into blocks of ``og`` rows by
``ig`` columns (``d = og*ig`` values, ``O`` out groups, ``G`` in groups; a partial group is padded with
zeros); block ``(o, j)`` is ``s_o * sum_c C_c[b_ojc]`` with ``M`` codebooks ``C_c`` of ``E = 2**B`` codewords.
The objective is ``F = tr((W - Ŵ) H (W - Ŵ)ᵀ)``: ``H = I`` without data (the weight error), ``H = XᵀX``
of the layer's inputs with ``calibrated=True`` (``Stats.hessian``; the output error on the calibration
tokens), damped by ``damp_percent`` of its mean diagonal.

1. **Init**: ``s_o`` = the RMS of out group ``o`` (so codewords are of order 1 and fit fp16); residual
   k-means on the normalised blocks ``W_oj / s_o``: codebook 1 is k-means of the blocks, codebook 2
   k-means of what codebook 1 left, ... (Lloyd steps from ``E`` distinct blocks drawn with the seed, on
   at most ``kmeans_points`` blocks, then every block assigned).
2. **Alternate** ``iters`` times (each step lowers ``F`` or keeps it):

   - *codes* by beam search: for one block, with everything else fixed, the change of ``F`` when its
     value ``v = sum_c C_c[b_c]`` becomes ``v'`` is ``Q(v') = s² v'ᵀ A v' - 2 v'ᵀ z`` (``A`` the block of
     ``H`` of its columns, ``z = s² A v + s g``, ``g`` the block's entries of ``(W - Ŵ) H``).  Beam search
     keeps the ``beam_size`` best code tuples: for each codebook in turn, every kept tuple tries all
     ``E`` codewords in that position (``Q`` by one small GEMM per codebook: ``p + C_c[e]`` with ``p`` the
     other codewords' sum), and the ``beam_size`` best distinct tuples go on.  The current tuple is
     always a candidate, so ``Q <= 0``.  With ``H = I`` the blocks do not interact and are searched all
     at once; with a full ``H`` the in groups are visited in order (Gauss-Seidel), ``(W - Ŵ) H``
     updated after each (GPTQ's order, without its error feedback: the codes of a group see the
     current codes of all others).
   - *codebooks* by least squares: ``Ŵ`` is linear in the codewords, so ``F`` is a quadratic in them;
     ``cg_iters`` steps of conjugate gradients (Jacobi-preconditioned, from the current codebooks,
     so ``F`` never rises; a tiny proximal term keeps unused codewords where they are).
   - *scales*: per out group the 1-D least squares ``s_o = Σ w H vᵀ / Σ v H vᵀ``.
3. **Store**: codebooks rounded to the scheme's ``param_dtype``, scales refit against them and rounded,
   then one more code pass against the stored values.  The best iterate (by ``F``) is what is stored.

Deterministic for a ``seed`` (k-means draws; everything else is closed form or a stable sort).
Cost (defaults, one thread, the 2-core machine shared with other jobs; docs/algorithms.md): SmolLM2's
576 x 576 q_proj 0.9 s (``aqlm-1x8-g4``) / 1.8 s (``aqlm-2x8-g8``) without data, 1.3 / 1.9 s calibrated; its
1536 x 576 up_proj 1.8 / 2.8 s and 2.7 / 4.3 s.  The work grows with ``2**B``: ``aqlm-1x16-g8`` on the
576 x 576 layer takes about a minute (k-means and beam search over 65536 codewords).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import aqlm as fmt
from ._aqlm_search import beam_search, kmeans, nearest
from ._base import Method, MethodResult, Stats, check_number

__all__ = ["AQLM"]

#: input columns per block of lazy updates of ``(W - Ŵ) H`` in the calibrated code sweep (GPTQ's lazy batch)
LAZY_COLUMNS = 128
#: proximal weight of the codebook least squares, relative to the mean of its preconditioner
PROX = 1e-6
_OWNER = "AQLM"


@dataclass(frozen=True, kw_only=True)
class AQLM(Method):
    """``@aqlm``: codes and codebooks for an ``aqlm-<M>x<B>-g<in>`` scheme (module docstring).

    - ``calibrated``: fit the output error ``tr(D H Dᵀ)`` with the layer's input Hessian (the method then
      needs calibration data); ``False`` (default) fits the weight error and needs no data.
    - ``beam_size`` (>= 1): code tuples kept per block in the beam search (1: coordinate descent).
    - ``iters`` (>= 0): code / codebook / scale rounds after the k-means init.
    - ``kmeans_iters`` (>= 1), ``kmeans_points`` (>= 1): Lloyd steps of the init, and the most blocks
      they run on (a sample drawn with the seed).
    - ``cg_iters`` (>= 0): conjugate-gradient steps of each codebook update.
    - ``damp_percent`` (>= 0): ridge added to ``H``, a fraction of its mean diagonal (calibrated only).
    - ``seed``: the k-means draws."""

    name: ClassVar[str] = "aqlm"
    calibrated: bool = False
    beam_size: int = 2
    iters: int = 4
    kmeans_iters: int = 12
    kmeans_points: int = 1 << 15
    cg_iters: int = 8
    damp_percent: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.calibrated, bool):
            raise ValueError(f"{_OWNER}.calibrated={self.calibrated!r} is not valid; valid: True, False")
        check_number(_OWNER, "beam_size", self.beam_size, kind=int, lo=1)
        check_number(_OWNER, "iters", self.iters, kind=int, lo=0)
        check_number(_OWNER, "kmeans_iters", self.kmeans_iters, kind=int, lo=1)
        check_number(_OWNER, "kmeans_points", self.kmeans_points, kind=int, lo=1)
        check_number(_OWNER, "cg_iters", self.cg_iters, kind=int, lo=0)
        finite = isinstance(self.damp_percent, (int, float)) and math.isfinite(self.damp_percent)
        check_number(_OWNER, "damp_percent", self.damp_percent if finite else float("nan"), lo=0,
                     valid="a finite number >= 0")
        check_number(_OWNER, "seed", self.seed, kind=int, lo=0)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.calibrated

    @property
    def needs_hessian(self) -> bool:  # type: ignore[override]
        return self.calibrated

    def unsupported_reason(self, scheme) -> str | None:
        from ..schemes.aqlm import AQLM as AQLMScheme

        if not isinstance(scheme, AQLMScheme):
            return (f"the AQLM method fits codes and codebooks of the aqlm format, not {scheme}; use a scheme "
                    "'aqlm-<M>x<B>-g<in>' (e.g. 'aqlm-2x8-g8@aqlm')")
        return None

    def quantize(self, scheme, weight: torch.Tensor, stats: Stats | None) -> MethodResult:
        start = time.perf_counter()
        reason = self.unsupported_reason(scheme)
        if reason:
            raise ValueError(reason)
        if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() == 0:
            raise ValueError(f"AQLM: weight must be a non-empty 2-D float tensor, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        h = None
        if self.calibrated:
            if stats is None or getattr(stats, "hessian", None) is None:
                raise ValueError("AQLM(calibrated=True) needs calibration statistics with the Hessian "
                                 "(Stats.hessian = XᵀX of the layer's inputs); got "
                                 f"{'no stats' if stats is None else 'stats without a hessian'}")
            h = stats.hessian.detach().float()
            if h.shape != (weight.shape[1], weight.shape[1]):
                raise ValueError(f"AQLM: hessian has shape {tuple(h.shape)}, expected [{weight.shape[1]}, "
                                 f"{weight.shape[1]}] for a weight of shape {tuple(weight.shape)}")
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()) or (h is not None and not bool(torch.isfinite(h).all())):
            raise ValueError("AQLM: weight and hessian must be finite")
        fit = _Fit(self, scheme, w, h)
        qw, info = fit.run()
        info["quantization_time"] = time.perf_counter() - start
        return MethodResult(qw, info=info)


# ---- the fit ----------------------------------------------------------------------------------------------
class _Fit:
    """State of one layer's fit: padded weight, ``H``, codes ``[O, G, M]``, codebooks ``[M, E, d]``,
    scales ``[O]`` (module docstring for the steps)."""

    def __init__(self, method: AQLM, scheme, w: torch.Tensor, h: torch.Tensor | None):
        self.method, self.scheme = method, scheme
        self.n, self.k = w.shape
        og, ig = scheme.out_group_size, scheme.in_group_size
        self.og, self.ig, self.d = og, ig, og * ig
        self.o, self.g = fmt.padded(self.n, self.k, og, ig)
        self.nc, self.e = scheme.num_codebooks, 1 << scheme.nbits_per_codebook
        self.w = torch.zeros(self.o * og, self.g * ig)
        self.w[:self.n, :self.k] = w
        self.h = self.h_plain = None
        if h is not None:  # padded columns meet zero inputs: H rows / columns of zeros, then the ridge
            hp = torch.zeros(self.g * ig, self.g * ig)
            hp[:self.k, :self.k] = (h + h.T) / 2
            self.h_plain = hp
            mean = float(hp.diagonal()[:self.k].mean())
            self.h = hp.clone()
            self.h.diagonal().add_(method.damp_percent * mean if mean > 0 else 1.0)
            if method.damp_percent == 0 or mean <= 0:
                self.h.diagonal()[self.k:] += max(mean, 1.0) * 1e-6  # padded columns: a little weight error
        self.gen = torch.Generator().manual_seed(method.seed)

    # -- layout ------------------------------------------------------------------------------------------
    def groups(self, rows: torch.Tensor) -> torch.Tensor:
        """``[O*og, G*ig]`` -> ``[O, G, d]`` (block values, row-major within a block)."""
        return rows.view(self.o, self.og, self.g, self.ig).permute(0, 2, 1, 3).reshape(self.o, self.g, self.d)

    def rows(self, groups: torch.Tensor) -> torch.Tensor:
        """``[O, G, d]`` -> ``[O*og, G*ig]``."""
        return groups.view(self.o, self.g, self.og, self.ig).permute(0, 2, 1, 3).reshape(self.o * self.og, -1)

    def decode(self, codes: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        """Unscaled block values ``[O, G, d]``."""
        v = cb[0].index_select(0, codes[..., 0].reshape(-1))
        for c in range(1, self.nc):
            v += cb[c].index_select(0, codes[..., c].reshape(-1))
        return v.view(self.o, self.g, self.d)

    def row_scale(self, s: torch.Tensor) -> torch.Tensor:
        return s.repeat_interleave(self.og) if self.og > 1 else s

    def hmul(self, r: torch.Tensor) -> torch.Tensor:
        return r if self.h is None else r @ self.h

    def objective(self, codes, cb, s, h=None) -> float:
        r = self.w - self.row_scale(s)[:, None] * self.rows(self.decode(codes, cb))
        h = self.h if h is None else h
        return float(((r @ h) * r).sum(dtype=torch.float64)) if h is not None else \
            float(r.square().sum(dtype=torch.float64))

    # -- the steps -----------------------------------------------------------------------------------------
    def init(self):
        rms = self.groups(self.w).square().sum((1, 2)).div(self.g * self.d).sqrt()
        real = torch.clamp(torch.tensor(self.n) - torch.arange(self.o) * self.og, 1, self.og) * self.k
        s = (rms * math.sqrt(self.g * self.d) / real.float().sqrt()).clamp(min=1e-8)  # RMS over real entries
        x = (self.groups(self.w) / s[:, None, None]).reshape(-1, self.d)
        codes = torch.empty(x.shape[0], self.nc, dtype=torch.int64)
        cbs = []
        for c in range(self.nc):
            cb = kmeans(x, self.e, self.method.kmeans_iters, self.method.kmeans_points, self.gen)
            codes[:, c] = nearest(x, cb)
            x = x - cb[codes[:, c]]
            cbs.append(cb)
        return codes.view(self.o, self.g, self.nc), torch.stack(cbs), s

    def update_codes(self, codes, cb, s, beam: int) -> torch.Tensor:
        if self.h is None:  # blocks independent: all at once, Q = s² |v'|² - 2 s v'ᵀ w
            z = (s[:, None, None] * self.groups(self.w)).reshape(-1, self.d)
            s2 = (s * s)[:, None].expand(self.o, self.g).reshape(-1)
            new, _ = beam_search(cb, codes.reshape(-1, self.nc), z, s2, None, cb.square().sum(-1), beam)
            return new.view(self.o, self.g, self.nc)
        codes = codes.clone()
        v = self.decode(codes, cb)  # [O, G, d]
        sr = self.row_scale(s)
        gh = (self.w - sr[:, None] * self.rows(v)) @ self.h  # (W - Ŵ) H
        s2 = s * s
        eye = torch.eye(self.og)
        lazy = max(1, LAZY_COLUMNS // self.ig)  # in groups per block of lazy updates of gh
        for b0 in range(0, self.g, lazy):
            b1 = min(self.g, b0 + lazy)
            block = slice(b0 * self.ig, b1 * self.ig)
            moved = torch.zeros(self.o * self.og, (b1 - b0) * self.ig)  # residual changes of this block
            for j in range(b0, b1):
                cols = slice(j * self.ig, (j + 1) * self.ig)
                a = self.h[cols, cols]
                abig = torch.kron(eye, a) if self.og > 1 else a
                vj = v[:, j]
                z = s2[:, None] * (vj @ abig) + s[:, None] * gh[:, cols].reshape(self.o, self.d)
                ea = ((cb @ abig) * cb).sum(-1)  # [M, E]: e A eᵀ
                new, _ = beam_search(cb, codes[:, j], z, s2, abig, ea, beam)
                if bool((new == codes[:, j]).all()):
                    continue
                codes[:, j] = new
                vn = cb[0][new[:, 0]]
                for c in range(1, self.nc):
                    vn = vn + cb[c][new[:, c]]
                delta = -(s[:, None] * (vn - vj)).view(self.o * self.og, self.ig)  # rows x the group's columns
                v[:, j] = vn
                moved[:, (j - b0) * self.ig:(j - b0 + 1) * self.ig] = delta
                gh[:, cols.start:block.stop] += delta @ self.h[cols, cols.start:block.stop]
            if bool(moved.any()) and block.stop < gh.shape[1]:  # the later columns, once per block
                gh[:, block.stop:] += moved @ self.h[block, block.stop:]
        return codes

    def update_codebooks(self, codes, cb, s) -> torch.Tensor:
        """Preconditioned CG on the normal equations of ``F`` in the codewords, from ``cb``."""
        if self.method.cg_iters == 0:
            return cb
        flat = (codes + torch.arange(self.nc) * self.e).reshape(-1, self.nc)  # [O*G, M] into [M*E]
        sr2 = self.row_scale(s).square()[:, None]

        def lmap(theta):  # [M*E, d] -> rows [Np, Kp]
            v = theta.index_select(0, flat[:, 0])
            for c in range(1, self.nc):
                v += theta.index_select(0, flat[:, c])
            return self.rows(v.view(self.o, self.g, self.d))

        def adjoint(rows):  # rows [Np, Kp] -> [M*E, d]
            y = self.groups(rows).reshape(-1, self.d)
            out = torch.zeros(self.nc * self.e, self.d)
            for c in range(self.nc):
                out.index_add_(0, flat[:, c], y)
            return out

        def op(theta):
            return adjoint(sr2 * self.hmul(lmap(theta)))

        hdiag = torch.ones(self.w.shape[1]) if self.h is None else self.h.diagonal()
        diag = adjoint(sr2 * hdiag[None, :].expand_as(self.w))
        lam = float(diag.mean()) * PROX if float(diag.mean()) > 0 else 1e-12
        theta0 = cb.reshape(-1, self.d)
        b = adjoint(self.row_scale(s)[:, None] * self.hmul(self.w)) + lam * theta0
        pre = 1.0 / (diag + lam)
        x = theta0.clone()
        r = b - op(x) - lam * x
        zv = pre * r
        p = zv.clone()
        rz = float((r * zv).sum(dtype=torch.float64))
        for _ in range(self.method.cg_iters):
            if rz <= 0:
                break
            ap = op(p) + lam * p
            pap = float((p * ap).sum(dtype=torch.float64))
            if not pap > 0:
                break
            alpha = rz / pap
            x += alpha * p
            r -= alpha * ap
            zv = pre * r
            rz_new = float((r * zv).sum(dtype=torch.float64))
            p = zv + (rz_new / rz) * p
            rz = rz_new
        return x.view(self.nc, self.e, self.d)

    def update_scales(self, codes, cb, s) -> torch.Tensor:
        v = self.rows(self.decode(codes, cb))
        vh = self.hmul(v)
        num = (self.w * vh).sum(1).view(self.o, self.og).sum(1)
        den = (v * vh).sum(1).view(self.o, self.og).sum(1)
        return torch.where(den > 0, num / den.clamp(min=1e-30), s)

    # -- driver ----------------------------------------------------------------------------------------------
    def run(self):
        m = self.method
        codes, cb, s = self.init()
        history = [self.objective(codes, cb, s)]
        best = (history[0], codes, cb, s)
        for _ in range(m.iters):
            codes = self.update_codes(codes, cb, s, m.beam_size)
            cb = self.update_codebooks(codes, cb, s)
            s = self.update_scales(codes, cb, s)
            history.append(self.objective(codes, cb, s))
            if history[-1] < best[0]:
                best = (history[-1], codes, cb, s)
        _, codes, cb, s = best
        dtype = self.scheme.param_dtype
        cb = cb.to(dtype).float()  # stored values from here on
        s = self.update_scales(codes, cb, s).to(dtype).float()
        s = torch.where(s == 0, torch.finfo(dtype).tiny, s)
        codes = self.update_codes(codes, cb, s, m.beam_size)
        qw = self.scheme.format.pack(codes, cb.view(self.nc, self.e, self.og, self.ig), s, self.n, self.k)
        return qw, self.info(codes, cb, s, history)

    def info(self, codes, cb, s, history) -> dict:
        wd = self.w - self.row_scale(s)[:, None] * self.rows(self.decode(codes, cb))
        werr, wref = float(wd.square().sum(dtype=torch.float64)), float(self.w.square().sum(dtype=torch.float64))
        out = {"objective": "output error (calibrated)" if self.h is not None else "weight error",
               "objective_history": history, "iters": self.method.iters, "beam_size": self.method.beam_size,
               "relative_weight_squared_error": werr / wref if wref > 0 else 0.0,
               "bits_per_weight": 8 * self.scheme.nbytes(self.n, self.k) / (self.n * self.k)}
        if self.h_plain is not None:
            err = float(((wd @ self.h_plain) * wd).sum(dtype=torch.float64))
            ref = float(((self.w @ self.h_plain) * self.w).sum(dtype=torch.float64))
            out.update(output_squared_error=err, relative_output_squared_error=err / ref if ref > 0 else 0.0)
        return out
