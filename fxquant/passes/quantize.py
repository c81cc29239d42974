"""Quantize pass: compute each chosen site's quantized buffers (graph unchanged).

Every site's weight is checked first (``Scheme.unsupported_reason``: dims, dtype, layout), then the
supported ones are quantized one at a time by their method (:mod:`fxquant.methods`; round-to-
nearest when the scheme names none); ``ctx.on_quantized`` (``quantize_``'s in-place emit) runs
after each, so a caller can free a float weight before the next is quantized.  Sites the calibrate
pass already quantized (data-driven methods) are only emitted here.  A weight used by several sites
with the same scheme (a module called twice, tied weights) is quantized once and its buffers are
shared.  A site the scheme cannot handle keeps its float weight, with the scheme's reason in the
report.
"""
from __future__ import annotations

import time

import torch
import torch.fx
from tqdm.auto import tqdm

from .. import experts
from ..formats import _common
from ..methods import RTN, Method, MethodResult, Stats
from ._base import PassContext, PassResult, Site, get_attr_path

#: Largest weight (elements) quantized in one piece; larger ones go in row blocks
#: (``Scheme.quantize_in_blocks``) where the format allows, so each fp32 temporary stays near 16 MB
#: (an lm_head of 32000 x 2048 took ~0.9 GB of them at once).  Measured with tools/measure_memory.py
#: (1.1B Llama, int4wo-128): peak RSS of quantize_ 1.20 x the float model with 8M, 1.10 x with 4M.
BLOCK_ELEMENTS = 4 << 20


def _as_nk(w: torch.Tensor, site: Site) -> torch.Tensor:
    """``[N, K]`` (``[E, N, K]`` for experts) as the site multiplies by it."""
    w = w.detach()
    return w.transpose(-2, -1) if site.transposed else w


def method_of(site: Site) -> Method:
    return site.scheme.method or RTN()


def check_supported(sites: list[Site], read) -> None:
    """Set ``site.reason`` for every site whose scheme cannot take its weight (before any work)."""
    for site in sites:
        if not site.reason and site.qweight is None:
            w = read(site)
            reason = site.scheme.unsupported_reason(w[0] if site.experts else w)
            if reason:
                site.reason = f"{site.scheme}: {reason}"


def quantize_site(site: Site, w: torch.Tensor, stats: Stats | None = None, result: MethodResult | None = None,
                  seconds: float | None = None) -> None:
    """Quantize ``site``'s weight ``w`` ``[N, K]`` by its method (or take the method's ``result``):
    ``site.qweight``, ``rel_error`` and the weight part of ``site.result``."""
    method, fmt = method_of(site), site.scheme.format
    t0 = time.perf_counter()
    if site.experts:
        return quantize_experts(site, w, stats, t0)
    qw, rel, info, _ = _by_method(method, fmt, w, stats, result)
    _record(site, qw, rel, w, info, t0, seconds)


def _by_method(method: Method, fmt, w: torch.Tensor, stats: Stats | None, result: MethodResult | None = None):
    """``(packed weight, relative weight error, method info, AWQ input scale or None)`` of ``w`` ``[N, K]``:
    round-to-nearest in row blocks, else the method's (or its given ``result``); the error is of the
    effective weight (the dequantized one divided by the input scale)."""
    with torch.no_grad():
        if result is None and method.name == "rtn":
            qw, rel = fmt.quantize_in_blocks(w, BLOCK_ELEMENTS)
            return qw, rel, {}, None
        result = result or method.quantize(fmt, w.float(), stats)
        deq = fmt.dequantize(result.qweight)
        scale = result.input_scale
        return result.qweight, _common.rel_error(w, deq if scale is None else deq / scale), result.info, scale


def quantize_experts(site: Site, w: torch.Tensor, stats: list | None = None, t0: float | None = None) -> None:
    """Each expert's ``[N, K]`` (``w`` ``[E, N, K]``) by the site's method, stacked (``experts.stack``);
    ``stats``: each expert's input statistics (the rows routed to it) for a data method, where an
    expert no calibration token reached is rounded to nearest.  The errors are over all experts.  A
    format whose layout differs between experts keeps the float weight (``site.reason``)."""
    t0 = time.perf_counter() if t0 is None else t0
    method, fmt = method_of(site), site.scheme.format
    parts, scales, err_sq, norm_sq, unseen = [], [], 0.0, 0.0, 0
    for e in range(site.experts):
        st = stats[e] if stats is not None else None
        unseen_here = method.needs_data and (st is None or st.tokens == 0)  # no row routed to it: RTN
        unseen += unseen_here
        # AWQ: this expert's input scale (None: alpha 0)
        qw, rel, _, scale = _by_method(RTN() if unseen_here else method, fmt, w[e], st)
        n2 = float(torch.linalg.vector_norm(w[e], dtype=torch.float32)) ** 2
        err_sq, norm_sq = err_sq + rel * rel * n2, norm_sq + n2
        parts.append(qw)
        scales.append(scale)
    stacked = experts.stack(parts)
    if isinstance(stacked, str):
        site.reason = f"{site.scheme}: {stacked}"
        return
    if any(sc is not None for sc in scales):  # the op divides each expert's rows by its row of these
        site.input_scale = torch.stack([torch.ones(w.shape[-1]) if sc is None else sc.float() for sc in scales])
    info = {"experts": site.experts}
    if site.input_scale is not None:
        info["awq_input_scale"] = "per expert, applied to each expert's rows in the op"
    if stats is not None:
        info["expert_tokens"] = [st.tokens for st in stats]
        info["calibration_tokens"] = sum(st.tokens for st in stats)
    if unseen:
        info["experts_rounded_to_nearest"] = unseen  # no calibration token was routed to them
    _record(site, stacked, (err_sq / norm_sq) ** 0.5 if norm_sq else 0.0, w, info, t0, None)


def _record(site: Site, qw, rel: float, w: torch.Tensor, info: dict, t0: float, seconds: float | None) -> None:
    method = method_of(site)
    norm_sq = float(torch.linalg.vector_norm(w, dtype=torch.float32)) ** 2
    sq = rel * rel * norm_sq
    site.qweight, site.rel_error = qw, rel
    site.result = {"method": method.name, "params": method.params(),
                   "quantization_time": seconds if seconds is not None else time.perf_counter() - t0,
                   "weight_squared_error": sq, "mean_weight_squared_error": sq / max(w.numel(), 1),
                   "relative_weight_squared_error": rel * rel, **info}
    if site.out_fold is not None:  # its rows took a later site's AWQ scale (quantized divided)
        site.result["awq_fold"] = site.out_fold.note()


def quantize_weights(gm: torch.fx.GraphModule | None, ctx: PassContext) -> PassResult:
    """Fill ``site.qweight``/``status``/``rel_error``/``bytes_after`` for every site with a scheme."""
    read = ctx.read_weight or (lambda site: get_attr_path(gm, site.weight_attr))
    todo = [s for s in ctx.sites if s.scheme is not None and not s.reason]
    # every check before any work: a caller that emits per site never half-applies a plan
    check_supported(todo, lambda site: _as_nk(read(site), site))
    todo = [s for s in todo if not s.reason]
    done: dict[tuple, Site] = {}
    for site in tqdm(todo, desc="fxquant: quantizing", unit="layer", disable=None, leave=False):
        key = (site.weight_attr, site.transposed, site.scheme)
        if key in done and site.input_scale is None and done[key].input_scale is None:
            first = done[key]
            site.qweight, site.rel_error, site.shared_with = first.qweight, first.rel_error, first.name
            site.result = dict(first.result)
            site.bytes_before = 0  # counted once, on the first site
        else:
            if site.qweight is None:  # not already quantized by the calibrate pass
                method = method_of(site)
                if method.needs_data:
                    raise ValueError(f"{site.name}: method {method.name!r} needs calibration data")
                w = _as_nk(read(site), site)
                quantize_site(site, w)
                del w
                if site.qweight is None:  # the method could not produce it (site.reason says why)
                    continue
            done[key] = site
        site.status = "quantized"
        site.bytes_after = 0 if site.shared_with else site.qweight.nbytes
        if ctx.on_quantized is not None:
            ctx.on_quantized(site)
    return PassResult(gm, modified=False)
