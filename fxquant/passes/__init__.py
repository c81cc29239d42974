"""The pass pipeline: passes run in the order of :data:`PIPELINE`, each a function
``(GraphModule, PassContext) -> PassResult`` with a one-line contract in its docstring.

Passes share state only through :class:`PassContext` (the list of linear :class:`Site` records)
and ``node.meta["fxquant"]``; the graph is linted after every pass.  A failing pass is re-raised
as :class:`PassError` naming it and the passes that ran before it.
"""
from __future__ import annotations

from typing import Callable

import torch.fx

from ._base import PassContext, PassError, PassResult, Site
from .cleanup import remove_dead_weights
from .match import match_linears
from .quantize import quantize_weights
from .resolve import resolve_spec
from .rewrite import rewrite_linears

Pass = Callable[[torch.fx.GraphModule, PassContext], PassResult]

#: the pipeline, in order
PIPELINE: tuple[Pass, ...] = (match_linears, resolve_spec, quantize_weights, rewrite_linears, remove_dead_weights)


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext, passes: tuple[Pass, ...] = PIPELINE) -> torch.fx.GraphModule:
    """Run ``passes`` in order, linting the graph after each; wrap failures in :class:`PassError`."""
    done: list[str] = []
    for p in passes:
        try:
            result = p(gm, ctx)
            gm = result.gm
            gm.graph.lint()
        except PassError:
            raise
        except Exception as e:
            before = ", ".join(done) or "none"
            raise PassError(f"fxquant pass {p.__name__!r} failed (passes run before it: {before}): "
                            f"{type(e).__name__}: {e}") from e
        if result.modified:
            gm.recompile()
        done.append(p.__name__)
    return gm


__all__ = ["PIPELINE", "PassContext", "PassError", "PassResult", "Site", "run_passes",
           "match_linears", "resolve_spec", "quantize_weights", "rewrite_linears", "remove_dead_weights"]
