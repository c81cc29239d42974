"""Resolve pass: give every site its scheme from the spec, and report rules that matched nothing."""
from __future__ import annotations

import warnings

import torch.fx

from ._base import PassContext, PassResult, meta

#: why a buffer-backed site keeps its float weight under the default scheme
BUFFER_REASON = ("weight is a buffer, not a parameter: the default scheme applies to parameters only "
                 "(name it in a rule to quantize it)")

#: why a mixture-of-experts weight keeps its float weight under a method that cannot work expert by expert
EXPERTS_REASON = ("{0}: mixture-of-experts weights take rtn, hqq, gptq and awq (expert by expert); {1} fits "
                  "one input statistic per layer; name them in a rule with one of those, e.g. "
                  "{{'re:.*experts.*': '{2}'}}")


def resolve_spec(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Set ``site.scheme``/``site.rule`` by the spec's precedence (buffers only by a rule); note unused entries
    and the spec's own notes."""
    ctx.notes.extend(ctx.spec.notes)  # what the config the spec came from held without effect
    for site in ctx.sites:
        if site.reason:  # the match pass already knows it cannot be quantized
            continue
        choice = ctx.spec.choose(site.name)
        site.scheme, site.rule = choice.scheme, choice.source
        if choice.scheme is None:
            site.reason = f"left in float by {choice.source}" if choice.source != "default" else "no default scheme"
        elif site.weight_kind == "buffer" and choice.source == "default":
            site.scheme, site.reason = None, BUFFER_REASON
        elif choice.scheme.method is not None and (excluded := choice.scheme.method.excluded_reason(site.name)):
            site.scheme, site.reason = None, f"left in float: {excluded}"
        elif site.experts and choice.scheme.method is not None and not choice.scheme.method.per_expert:
            site.scheme, site.reason = None, EXPERTS_REASON.format(choice.scheme, choice.scheme.method.name,
                                                                   choice.scheme.format)
        if site.node is not None:
            meta(site.node).update(scheme=str(site.scheme) if site.scheme else None, rule=choice.source)
    for entry in ctx.spec.unused([s.name for s in ctx.sites]):
        msg = f"spec entry {entry} matched no linear layer"
        ctx.notes.append(msg)
        warnings.warn(f"fxquant: {msg}", stacklevel=3)
    return PassResult(gm, modified=False)
