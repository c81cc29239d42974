"""Quantize pass: compute each chosen site's quantized buffers (graph unchanged).

Every site's weight is checked first (``Scheme.unsupported_reason``: dims, dtype, layout), then the
supported ones are quantized one at a time; ``ctx.on_quantized`` (``quantize_``'s in-place emit)
runs after each, so a caller can free a float weight before the next is quantized.
A weight used by several sites with the same scheme (a module called twice, tied weights) is
quantized once and its buffers are shared.  A site the scheme cannot handle keeps its float
weight, with the scheme's reason in the report.
"""
from __future__ import annotations

import torch
import torch.fx
from tqdm.auto import tqdm

from ._base import PassContext, PassResult, Site, get_attr_path

#: Largest weight (elements) quantized in one piece; larger ones go in row blocks
#: (``Scheme.quantize_in_blocks``) where the format allows, so each fp32 temporary stays near 16 MB
#: (an lm_head of 32000 x 2048 took ~0.9 GB of them at once).  Measured with tools/measure_memory.py
#: (1.1B Llama, int4wo-128): peak RSS of quantize_ 1.20 x the float model with 8M, 1.10 x with 4M.
BLOCK_ELEMENTS = 4 << 20


def _as_nk(w: torch.Tensor, site: Site) -> torch.Tensor:
    w = w.detach()
    return w.t() if site.transposed else w


def quantize_weights(gm: torch.fx.GraphModule | None, ctx: PassContext) -> PassResult:
    """Fill ``site.qweight``/``status``/``rel_error``/``bytes_after`` for every site with a scheme."""
    read = ctx.read_weight or (lambda site: get_attr_path(gm, site.weight_attr))
    todo = [s for s in ctx.sites if s.scheme is not None and not s.reason]
    for site in todo:  # every check before any work: a caller that emits per site never half-applies a plan
        reason = site.scheme.unsupported_reason(_as_nk(read(site), site))
        if reason:
            site.reason = f"{site.scheme}: {reason}"
    todo = [s for s in todo if not s.reason]
    done: dict[tuple, Site] = {}
    for site in tqdm(todo, desc="fxquant: quantizing", unit="layer", disable=None, leave=False):
        key = (site.weight_attr, site.transposed, site.scheme)
        if key in done:
            first = done[key]
            site.qweight, site.rel_error, site.shared_with = first.qweight, first.rel_error, first.name
            site.bytes_before = 0  # counted once, on the first site
        else:
            w = _as_nk(read(site), site)
            with torch.no_grad():
                site.qweight, site.rel_error = site.scheme.quantize_in_blocks(w, BLOCK_ELEMENTS)
            del w
            done[key] = site
        site.status = "quantized"
        site.bytes_after = 0 if site.shared_with else site.qweight.nbytes
        if ctx.on_quantized is not None:
            ctx.on_quantized(site)
    return PassResult(gm, modified=False)
