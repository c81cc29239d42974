"""The pass pipeline: passes run in the order of :data:`PIPELINE`, each a function
``(GraphModule, PassContext) -> PassResult`` with a one-line contract in its docstring.

Passes share state only through :class:`PassContext` (the list of linear :class:`Site` records)
and ``node.meta["fxquant"]``; the graph is linted after every pass.  A failing pass is re-raised
as :class:`PassError` naming it and the passes that ran before it.

The pipeline has three stages.  :data:`PLAN` decides (one :class:`Site` per linear: scheme, rule,
reason; the calibrate pass quantizes the sites whose method needs data), :data:`QUANTIZE` packs the chosen weights, and the emit stage applies the plan:
``fxquant.compile`` runs :data:`GRAPH_EMIT` (rewrite the traced graph), ``fxquant.quantize_`` lowers
the same sites into the user's module tree instead (:mod:`fxquant.inplace`).
"""
from __future__ import annotations

from typing import Callable

import torch.fx

from ._base import GraphRef, InputError, PassContext, PassError, PassResult, Site
from .calibrate import calibrate
from .cleanup import remove_dead_weights
from .match import match_linears
from .quantize import quantize_weights
from .resolve import resolve_spec
from .rewrite import rewrite_linears

Pass = Callable[[torch.fx.GraphModule, PassContext], PassResult]

#: decide what every linear site gets (graph unchanged)
PLAN: tuple[Pass, ...] = (match_linears, resolve_spec, calibrate)
#: pack the chosen weights (graph unchanged; weights read through ``ctx.read_weight``)
QUANTIZE: tuple[Pass, ...] = (quantize_weights,)
#: ``compile``'s emit: op calls in the graph, float weights dropped
GRAPH_EMIT: tuple[Pass, ...] = (rewrite_linears, remove_dead_weights)
#: the pipeline, in order
PIPELINE: tuple[Pass, ...] = PLAN + QUANTIZE + GRAPH_EMIT


def run_passes(gm: torch.fx.GraphModule | None, ctx: PassContext,
               passes: tuple[Pass, ...] = PIPELINE) -> torch.fx.GraphModule | None:
    """Run ``passes`` in order, linting the graph after each; wrap failures in :class:`PassError`.

    ``gm`` is ``None`` for passes that work on the plan alone (the quantize pass of ``quantize_``,
    which runs after the traced graph is released)."""
    done: list[str] = []
    for p in passes:
        try:
            result = p(gm, ctx)
            gm = result.gm
            if gm is not None:
                gm.graph.lint()
        except (PassError, InputError):
            raise
        except Exception as e:
            before = ", ".join(done) or "none"
            raise PassError(f"fxquant pass {p.__name__!r} failed (passes run before it: {before}): "
                            f"{type(e).__name__}: {e}") from e
        if result.modified and gm is not None:
            gm.recompile()
        done.append(p.__name__)
    return gm


__all__ = ["PIPELINE", "PLAN", "QUANTIZE", "GRAPH_EMIT", "PassContext", "PassError", "PassResult", "Site",
           "GraphRef", "run_passes", "match_linears", "resolve_spec", "quantize_weights", "rewrite_linears",
           "remove_dead_weights", "calibrate", "InputError"]
