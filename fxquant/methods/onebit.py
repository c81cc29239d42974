"""OneBit (calibrated): the ``onebit`` format's signs and value vectors fitted to the layer's output.

The format stores ``Ŵ = S ⊙ (a bᵀ)`` (signs ``S`` ``[N, K]``, ``a`` ``[N]``, ``b`` ``[K]``,
:mod:`fxquant.formats.onebit`); its round-to-nearest init (SVID) fits ``|W|`` in the Frobenius
norm.  What matters is the layer's output on real inputs ``X`` ``[T, K]``:
``||X Wᵀ - X Ŵᵀ||² = tr((W - Ŵ) H (W - Ŵ)ᵀ) = Σ_n r_nᵀ H r_n`` with ``H = XᵀX`` (``Stats.hessian``)
and ``r_n = w_n - a_n (s_n ⊙ b)`` the residual of row ``n``.  This method (the parameters of the
OneBit quantizer it follows) minimises that error:

1. **Importance scaling** (``use_importance_scaling``): the diagonal of the objective is
   ``Σ_{n,k} H_kk (W_nk - Ŵ_nk)²`` = ``Σ_{n,k} H_kk (|W_nk| - a_n b_k)²`` for ``S = sign(W)``,
   i.e. the unweighted rank-1 fit of ``|W| diag(d)`` with ``d_k = sqrt(H_kk / T)`` (normalised to
   RMS 1): SVID of the scaled magnitudes, then ``b_k = b'_k / d_k``.  Errors on high-energy input
   channels cost more, as they do in the output.
2. **Balancing** (``use_balancing``, ``balance_iters``, ``balance_alpha``): Sinkhorn-like l1
   balancing of ``M = |W|``: positive ``r`` ``[N]``, ``c`` ``[K]`` with, per iteration,
   ``r_n <- r_n (g_r / mean_k (r M c)_nk)^alpha`` then the same for the columns (``g`` the geometric
   mean of the row / column means, so only their spread changes; ``alpha = 1`` is exact alternate
   rescaling, ``< 1`` damped, ``> 1`` over-relaxed); ``log r``, ``log c`` are clamped to
   ``±BALANCE_LOG_CLAMP``.  SVID then fits ``r M c`` (no row or column dominates the rank-1 fit),
   with the importance scaling applied to the *balanced* columns, ``r M (c ⊙ d)`` (balancing
   importance-scaled magnitudes instead would undo the scaling: the balanced matrix does not depend
   on a column scaling of its input).  The vectors are divided back out, ``a = a' / r``,
   ``b = b' / (c ⊙ d)``, so ``S ⊙ (a bᵀ)`` is the weight in the original space.
3. **Refinement** (``iters`` steps), each an exact descent step on the output error with ``H``
   ridge-damped by ``DAMP`` (``H + DAMP · mean(diag H) · I``: the output error plus a little weight
   error, which keeps a few calibration tokens from overfitting; errors are always reported with
   the plain ``H``):

   - ``a``: per row, the 1-D least squares ``a_n = w_nᵀ H z_n / z_nᵀ H z_n``, ``z_n = s_n ⊙ b``;
   - ``b``: the ``K x K`` normal equations ``(H ⊙ Sᵀ diag(a²) S) b = (S ⊙ W H)ᵀ a``
     (``Σ_n a_n² S_n H S_n b = Σ_n a_n S_n H w_n``), solved in float64 by Cholesky with a proximal
     term ``λ (b - b_prev)`` (λ = 1e-6 of the diagonal's mean: a channel no token excites keeps its
     value instead of becoming 0);
   - signs: one sweep over the columns flipping ``s_nk`` wherever that lowers ``r_nᵀ H r_n``
     (the change is ``δ² H_kk + 2 δ (R H)_nk`` with ``δ = 2 s_nk a_n b_k``), rows in parallel,
     columns in order with ``R H`` updated after each column (within blocks of ``FLIP_BLOCK``
     columns, then one matrix product per block, GPTQ's lazy batch update).

   All three use the full ``H`` when ``5 N K² iters <= FULL_HESSIAN_MAX_FLOPS``; above that the
   diagonal objective ``Σ H_kk (W - Ŵ)²`` (``O(N K)`` per step: ``a_n = Σ_k H_kk W_nk s_nk b_k /
   Σ_k H_kk b_k²``, ``b_k = Σ_n a_n s_nk W_nk / Σ_n a_n²``, ``s_nk = sign(W_nk a_n b_k)``).  The
   best iterate (by the objective used) is kept.
4. **Store**: ``b`` is scaled to RMS 1 (``a`` takes the factor) and rounded to bf16, ``a`` is refit
   against the *stored* ``b`` and signs (the 1-D least squares above, full damped ``H``) and
   rounded; the output error (plain ``H``) is computed on exactly the decoded buffers.  If it is
   not below the plain SVID init's (the ``onebit`` scheme's own ``quantize``), that init is stored
   instead and ``info["fallback"]`` says so.

Deterministic: no random numbers (SVID starts from the all-ones vector, every step is closed form).
Cost: ``O(N K² + K³)`` per refinement step with the full ``H`` (SmolLM2-135M, one thread: 1 s for
576 x 576, 5 s for 576 x 1536 at ``iters=10``).

Measured (SmolLM2-135M, H from 2048 random tokens passed through the model, relative output error
on held-out random tokens, SVID init -> default ``OneBit()``): q_proj of layer 0 0.266 -> 0.029,
down_proj of layer 29 0.625 -> 0.020; most of the gain is the sign sweeps (least squares on ``a``,
``b`` alone: 0.266 -> 0.060 and 0.625 -> 0.057); the init options move the final error by about
1 % on the calibration distribution (up to 8 %, either way, on text).  The ridge ``DAMP = 0.1`` is the best of 0.01 / 0.1 / 0.3 / 1 on held-out natural text
(0.01 overfits: relative weight error above 1).  As with any calibrated method the fit is to the
calibration distribution: calibrated on random tokens, a held-out *text* error can be above the
init's (v_proj of layer 29: 0.450 -> 0.501); calibrated on text it was below in every layer tried.

``MethodResult.info``: the seed's result fields (``output_squared_error`` with the given ``H``,
``mean_`` per token and output, ``relative_`` to ``||X Wᵀ||²``, the same for the weight), the
parameters, ``init_output_squared_error``, ``fallback``, ``objective``, ``sign_flips`` (signs
differing from ``sign(W)``), ``refine_objective_history`` (the damped objective with ``H`` scaled to
mean diagonal 1), balancing spreads (max - min of the log row / column means, before and after).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..formats import onebit as fmt
from ._base import Method, MethodResult, Stats, check_number, quadratic_error

__all__ = ["OneBit"]

#: ridge added to ``H`` in the refinement objective, relative to ``mean(diag H)``
DAMP = 0.1
#: proximal weight of the ``b`` step, relative to the mean diagonal of its normal equations
PROX = 1e-6
#: use the full ``H`` in the refinement while ``5 N K² iters`` stays below this (else its diagonal)
FULL_HESSIAN_MAX_FLOPS = 2e12
#: columns per lazy-update block of the sign sweep
FLIP_BLOCK = 128
#: clamp of ``|log r|``, ``|log c|`` in balancing (a factor 1e6 either way)
BALANCE_LOG_CLAMP = math.log(1e6)
#: floor of the importance ``d_k`` relative to its RMS (channels with ``H_kk = 0``)
IMPORTANCE_FLOOR = 1e-4

_OWNER = "OneBit"


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{_OWNER}.{name}={value!r} is not valid; valid: True or False")


@dataclass(frozen=True, kw_only=True)
class OneBit(Method):
    """``@onebit``: the ``onebit`` format's signs and vectors fitted to the output error
    ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (module docstring).

    - ``iters`` (int >= 0): refinement steps (``a``, ``b`` least squares and a sign sweep); 0
      keeps the (importance-scaled / balanced) SVID init, with ``a`` refit to the stored ``b``.
    - ``use_importance_scaling``: fit ``|W| diag(sqrt(diag(H) / tokens))`` in the init.
    - ``use_balancing``: Sinkhorn-like l1 balancing of the magnitudes before the init's fit;
      ``balance_iters`` (int >= 1) iterations with exponent ``balance_alpha`` (> 0), both checked
      only when balancing is on.
    """

    name: ClassVar[str] = "onebit"
    needs_data: ClassVar[bool] = True
    per_expert: ClassVar[bool] = False  # one input statistic per layer
    needs_hessian: ClassVar[bool] = True

    iters: int = 10
    use_importance_scaling: bool = True
    use_balancing: bool = True
    balance_iters: int = 40
    balance_alpha: float = 1.0
    #: which layers the method quantizes, as the seed's quantizer selects them: exact names (a site's
    #: full name or a dotted suffix of it) or keywords (substrings); ``None`` includes every layer
    include_layer_names: tuple[str, ...] | None = None
    exclude_layer_names: tuple[str, ...] = ("lm_head",)
    include_layer_keywords: tuple[str, ...] | None = None
    exclude_layer_keywords: tuple[str, ...] = ("per_layer_model_projection",)

    def __post_init__(self):
        for name in ("include_layer_names", "exclude_layer_names", "include_layer_keywords", "exclude_layer_keywords"):
            v = getattr(self, name)
            if v is None and name.startswith("include"):
                continue
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(e, str) for e in v):
                raise ValueError(f"{_OWNER}.{name}={v!r} is not valid; valid: a list of strings"
                                 + (" or None" if name.startswith("include") else ""))
            object.__setattr__(self, name, tuple(v))
        check_number(_OWNER, "iters", self.iters, kind=int, lo=0)
        _check_bool("use_importance_scaling", self.use_importance_scaling)
        _check_bool("use_balancing", self.use_balancing)
        if self.use_balancing:
            check_number(_OWNER, "balance_iters", self.balance_iters, kind=int, lo=1,
                         valid="an integer >= 1 when use_balancing=True")
            finite = isinstance(self.balance_alpha, (int, float)) and math.isfinite(self.balance_alpha)
            check_number(_OWNER, "balance_alpha", self.balance_alpha if finite else float("nan"), lo=0,
                         lo_open=True, valid="a finite number > 0 when use_balancing=True")

    def excluded_reason(self, name: str) -> str | None:
        def named(entries):
            return any(name == e or name.endswith("." + e) for e in entries)

        if named(self.exclude_layer_names):
            return "excluded by OneBit.exclude_layer_names"
        if any(k in name for k in self.exclude_layer_keywords):
            return "excluded by OneBit.exclude_layer_keywords"
        included = ((self.include_layer_names is None and self.include_layer_keywords is None)
                    or named(self.include_layer_names or ())
                    or any(k in name for k in self.include_layer_keywords or ()))
        return None if included else "not in OneBit.include_layer_names / include_layer_keywords"

    def unsupported_reason(self, scheme) -> str | None:
        from ..schemes.onebit import OneBit as OneBitScheme

        if not isinstance(scheme, OneBitScheme):
            return (f"the OneBit method fits the onebit format (sign bits and two value vectors), not "
                    f"{scheme}; use scheme 'onebit'")
        return None

    # ------------------------------------------------------------------------------------------------
    def quantize(self, scheme, weight: torch.Tensor, stats: Stats | None) -> MethodResult:
        start = time.perf_counter()
        reason = self.unsupported_reason(scheme)
        if reason:
            raise ValueError(reason)
        if stats is None or getattr(stats, "hessian", None) is None:
            raise ValueError("the OneBit method needs calibration statistics with the Hessian "
                             "(Stats.hessian = XᵀX of the layer's inputs); got "
                             f"{'no stats' if stats is None else 'stats without a hessian'}")
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"OneBit: weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
        w = weight.detach().float()
        n, k = w.shape
        h = stats.hessian.detach().to(device=w.device, dtype=torch.float32)  # may alias: never written
        if h.shape != (k, k):
            raise ValueError(f"OneBit: hessian has shape {tuple(h.shape)}, expected [{k}, {k}] for a weight "
                             f"of shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(h).all()):
            raise ValueError("OneBit: weight and hessian must be finite")
        tokens = int(getattr(stats, "tokens", 0) or 0)
        hscale = float(h.diagonal().mean())
        # symmetric, scale-free copy (the objective's minimisers do not depend on the scale); errors
        # are reported in the units of the given H: hscale * tr(D hn Dᵀ)
        hn = (h + h.T).div_(2 * hscale) if hscale > 0 else torch.zeros_like(h)
        del h

        init = scheme.format.quantize(weight) if hasattr(scheme, "format") else scheme.quantize(weight)
        init_w = fmt.dequantize(init.tensors["sign_bits"], init.tensors["a"], init.tensors["b"])
        ref = hscale * quadratic_error(w, hn)  # ||X Wᵀ||²
        init_err = hscale * quadratic_error(w - init_w, hn)
        info = {"iters": self.iters, "use_importance_scaling": self.use_importance_scaling,
                "use_balancing": self.use_balancing, "balance_iters": self.balance_iters,
                "balance_alpha": self.balance_alpha}
        if not hscale > 0:  # H = 0: every weight has output error 0; keep the format's init
            return MethodResult(init, info={**info, **_errors(w, init_w, 0.0, ref, tokens),
                                            "init_output_squared_error": init_err, "fallback": True,
                                            "fallback_reason": "hessian is zero", "objective": "none",
                                            "quantization_time": time.perf_counter() - start})

        sign = torch.where(w < 0, -1.0, 1.0)
        imp = self._importance(hn)
        a, b, bal_info = self._init(w, imp)
        hd = hn.clone()
        hd.diagonal().add_(DAMP)
        full = 5.0 * n * k * k * max(self.iters, 1) <= FULL_HESSIAN_MAX_FLOPS
        if full:
            a, b, sign, ref_info = _refine_full(w, sign, a, b, hd, self.iters)
        else:
            a, b, sign, ref_info = _refine_diag(w, sign, a, b, hd.diagonal(), self.iters)

        # store: gauge rms(b) = 1, round b, refit a to the stored values (full H), round a
        rms = b.square().mean().sqrt()
        if rms > 0:
            a, b = a * rms, b / rms
        b16 = b.to(fmt.SCALE_DTYPE)
        a = _fit_a_full(w, sign, b16.float(), hd, a)
        packed = fmt.pack(sign, a, b16)
        out_w = fmt.dequantize(packed["sign_bits"], packed["a"], packed["b"])
        err = hscale * quadratic_error(w - out_w, hn)
        fallback = not err < init_err
        if fallback:
            packed, out_w, err = dict(init.tensors), init_w, init_err
        qw = type(init)(init.op, packed, dict(init.attrs), n, k)
        info.update(_errors(w, out_w, err, ref, tokens))
        info.update({"init_output_squared_error": init_err,
                     "init_relative_output_squared_error": init_err / ref if ref > 0 else 0.0,
                     "fallback": fallback,
                     "objective": "full hessian" if full else "hessian diagonal",
                     "sign_flips": int((torch.where(w < 0, -1.0, 1.0) != sign).sum()) if not fallback else 0,
                     **bal_info, **ref_info,
                     "quantization_time": time.perf_counter() - start})
        if fallback:
            info["fallback_reason"] = "the fit's stored output error was not below the SVID init's"
        return MethodResult(qw, info=info)

    # ------------------------------------------------------------------------------------------------
    def _importance(self, hn: torch.Tensor) -> torch.Tensor:
        """``d`` ``[K]``: ``sqrt(diag H)`` normalised to RMS 1, floored; ones when scaling is off."""
        k = hn.shape[0]
        if not self.use_importance_scaling:
            return torch.ones(k, device=hn.device)
        d = hn.diagonal().clamp(min=0).sqrt()
        d = d / d.square().mean().sqrt()
        return d.clamp(min=IMPORTANCE_FLOOR)

    def _init(self, w: torch.Tensor, imp: torch.Tensor):
        """(``a``, ``b``) fp32 of the (importance-scaled, balanced) SVID: ``|W| ≈ a bᵀ``."""
        mag = w.abs()
        if self.use_balancing:  # balance |W|, then weight the columns of the balanced magnitudes
            r, c, info = _balance(mag, self.balance_iters, float(self.balance_alpha))
            a1, b1 = fmt.svid(r[:, None] * mag * (c * imp)[None, :])
            return a1 / r, b1 / (c * imp), info
        a1, b1 = fmt.svid(mag * imp)
        return a1, b1 / imp, {}


# ---- pieces ---------------------------------------------------------------------------------------------
def _errors(w, out_w, err, ref, tokens) -> dict:
    n = w.shape[0]
    werr = float((w - out_w).square().sum(dtype=torch.float64))
    wref = float(w.square().sum(dtype=torch.float64))
    return {"output_squared_error": err,
            "mean_output_squared_error": err / (tokens * n) if tokens > 0 else None,
            "relative_output_squared_error": err / ref if ref > 0 else 0.0,
            "weight_squared_error": werr,
            "mean_weight_squared_error": werr / w.numel(),
            "relative_weight_squared_error": werr / wref if wref > 0 else 0.0}


def _balance(mag: torch.Tensor, iters: int, alpha: float):
    """Positive ``r`` ``[N]``, ``c`` ``[K]`` making the row and the column means of ``r mag c``
    (l1, ``mag >= 0``) equal: alternate multiplicative steps with exponent ``alpha`` in the log
    domain (Sinkhorn-Knopp to a common mean instead of to doubly stochastic)."""
    n, k = mag.shape
    lr = torch.zeros(n, dtype=torch.float64, device=mag.device)
    lc = torch.zeros(k, dtype=torch.float64, device=mag.device)
    m = mag.double()

    def step(log_scale, means):
        ok = means > 0
        if not bool(ok.any()):
            return log_scale
        lm = means[ok].log()
        log_scale = log_scale.clone()
        log_scale[ok] += alpha * (lm.mean() - lm)
        return log_scale.clamp(-BALANCE_LOG_CLAMP, BALANCE_LOG_CLAMP)

    def spread(means):
        ok = means > 0
        lm = means[ok].log()
        return float(lm.max() - lm.min()) if lm.numel() else 0.0

    row0 = m.mean(1)
    col0 = m.mean(0)
    for _ in range(iters):
        lr = step(lr, lr.exp() * (m @ lc.exp()) / k)
        lc = step(lc, lc.exp() * (m.T @ lr.exp()) / n)
        shift = lr.mean()  # gauge: r c is what matters
        lr, lc = lr - shift, lc + shift
    r, c = lr.exp(), lc.exp()
    bal = r[:, None] * m * c[None, :]
    info = {"balance_row_log_spread": [spread(row0), spread(bal.mean(1))],
            "balance_col_log_spread": [spread(col0), spread(bal.mean(0))]}
    return r.float(), c.float(), info


def _fit_a_full(w, sign, b, h, a_prev, w_h=None):
    """Per row the 1-D least squares ``a_n = w_nᵀ H z_n / z_nᵀ H z_n`` (``z_n = s_n ⊙ b``);
    ``w_h``: ``W H`` if already computed."""
    z = sign * b
    zh = z @ h
    num = ((w @ h if w_h is None else w_h) * z).sum(1)
    den = (zh * z).sum(1)
    tiny = den.abs().max() * 1e-12 if den.numel() else 0
    return torch.where(den > tiny, num / den.clamp(min=1e-30), a_prev)


def _solve_b(w_h, sign, a, b_prev, h):
    """Proximal least squares for ``b`` with ``a`` and signs fixed (module docstring)."""
    k = h.shape[0]
    sa = sign * a[:, None]
    lhs = ((sa.T @ sa) * h).double()
    rhs = (sa * w_h).sum(0).double()
    lam = float(lhs.diagonal().mean()) * PROX
    if not lam > 0:
        return b_prev
    eye = torch.eye(k, dtype=torch.float64, device=h.device)
    for _ in range(6):
        chol, bad = torch.linalg.cholesky_ex(lhs + lam * eye)
        if int(bad) == 0:
            return torch.cholesky_solve((rhs + lam * b_prev.double())[:, None], chol)[:, 0].float()
        lam *= 100
    return b_prev


def _flip_sweep(w, sign, a, b, h) -> int:
    """One in-place sweep of sign flips lowering ``Σ_n r_nᵀ H r_n``; returns the number flipped."""
    n, k = w.shape
    g = (w - sign * (a[:, None] * b[None, :])) @ h  # R H
    hdiag = h.diagonal()
    flips = 0
    for k0 in range(0, k, FLIP_BLOCK):
        k1 = min(k0 + FLIP_BLOCK, k)
        gb = g[:, k0:k1]
        hb = h[k0:k1, k0:k1]
        moved = torch.zeros(n, k1 - k0, device=w.device)
        for j in range(k1 - k0):
            col = k0 + j
            delta = 2.0 * sign[:, col] * a * b[col]  # residual change of a flip
            flip = delta * (delta * hdiag[col] + 2.0 * gb[:, j]) < 0
            count = int(flip.sum())
            if count:
                d = torch.where(flip, delta, torch.zeros_like(delta))
                sign[:, col] = torch.where(flip, -sign[:, col], sign[:, col])
                gb[:, j:] += d[:, None] * hb[j, j:][None, :]
                moved[:, j] = d
                flips += count
        if k1 < k and bool(moved.any()):
            g[:, k1:] += moved @ h[k0:k1, k1:]
    return flips


def _refine_full(w, sign, a, b, h, iters):
    """``iters`` exact descent steps (a, b, signs) on ``Σ_n r_nᵀ H r_n``; the best iterate."""
    w_h = w @ h
    best = quadratic_error(w - sign * (a[:, None] * b[None, :]), h)
    history = [best]
    best_state = (a, b, sign.clone())
    flips_total = 0
    for _ in range(iters):
        a = _fit_a_full(w, sign, b, h, a, w_h)
        b = _solve_b(w_h, sign, a, b, h)
        flips_total += _flip_sweep(w, sign, a, b, h)
        rms = b.square().mean().sqrt()
        if rms > 0:
            a, b = a * rms, b / rms
        e = quadratic_error(w - sign * (a[:, None] * b[None, :]), h)
        history.append(e)
        if e < best:
            best, best_state = e, (a, b, sign.clone())
    a, b, sign = best_state
    return a, b, sign, {"refine_objective_history": history, "refine_flips_tried": flips_total}


def _refine_diag(w, sign, a, b, hdiag, iters):
    """The same steps on the diagonal objective ``Σ_{n,k} H_kk (W - Ŵ)²`` (``O(N K)`` each)."""
    def obj(a, b, s):
        return float(((w - s * (a[:, None] * b[None, :])).square() * hdiag).sum(dtype=torch.float64))

    best = obj(a, b, sign)
    history = [best]
    best_state = (a, b, sign.clone())
    for _ in range(iters):
        ws = w * sign
        den = (hdiag * b.square()).sum()
        a = (ws * (hdiag * b)).sum(1) / den if den > 0 else a
        na = a.square().sum()
        b = (ws * a[:, None]).sum(0) / na if na > 0 else b
        ab = a[:, None] * b[None, :]
        best_sign = torch.sign(w) * torch.sign(ab)  # argmin_s (W - s a_n b_k)²; 0 where W or ab is 0
        sign = torch.where(best_sign != 0, best_sign, sign)
        rms = b.square().mean().sqrt()
        if rms > 0:
            a, b = a * rms, b / rms
        e = obj(a, b, sign)
        history.append(e)
        if e < best:
            best, best_state = e, (a, b, sign.clone())
    a, b, sign = best_state
    return a, b, sign, {"refine_objective_history": history}
