"""Quantize pass: compute each chosen site's quantized buffers (graph unchanged).

A weight used by several sites with the same scheme (a module called twice, tied weights) is
quantized once and its buffers are shared.  A site the scheme cannot handle keeps its float
weight, with the scheme's reason in the report.
"""
from __future__ import annotations

import torch
import torch.fx
from tqdm.auto import tqdm

from ._base import PassContext, PassResult, get_attr_path


def quantize_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fill ``site.qweight``/``status``/``rel_error``/``bytes_after`` for every site with a scheme."""
    todo = [s for s in ctx.sites if s.scheme is not None and not s.reason]
    done: dict[tuple, object] = {}
    for site in tqdm(todo, desc="fxquant: quantizing", unit="layer", disable=None, leave=False):
        w = get_attr_path(gm, site.weight_attr).detach()
        w = w.t() if site.transposed else w
        reason = site.scheme.unsupported_reason(w)
        if reason:
            site.reason = f"{site.scheme}: {reason}"
            continue
        key = (site.weight_attr, site.transposed, site.scheme)
        if key in done:
            first = done[key]
            site.qweight, site.rel_error, site.shared_with = first.qweight, first.rel_error, first.name
            site.bytes_before = 0  # counted once, on the first site
        else:
            with torch.no_grad():
                site.qweight = site.scheme.quantize(w.contiguous())
                site.rel_error = site.scheme.rel_error(w, site.qweight)
            done[key] = site
        site.status = "quantized"
        site.bytes_after = 0 if site.shared_with else site.qweight.nbytes
    return PassResult(gm, modified=False)
