"""``fxquant.compile``: trace, run the pass pipeline, attach the report."""
from __future__ import annotations

import collections
import logging
from typing import Any, Mapping

import torch
import torch.fx

from . import ops  # noqa: F401  (registers torch.ops.fxquant.*)
from .frontend import trace
from .passes import PIPELINE, PassContext, run_passes
from .report import REPORT_KEY, Report, Row, tensor_bytes
from .schemes import Scheme
from .spec import Spec

log = logging.getLogger(__name__)


def compile(model: torch.nn.Module, spec: "Spec | str | Scheme | Mapping | None",
            example_inputs: Any = (), example_kwargs: Mapping[str, Any] | None = None, *,
            frontend: str = "auto", dynamic: bool = True, passes=PIPELINE) -> torch.fx.GraphModule:
    """Quantize ``model``'s linear layers as ``spec`` says; return a runnable GraphModule.

    ``spec``: a :class:`Spec`, a scheme string/object (the default for every linear), or a dict
    (``Spec.from_dict``).  ``example_inputs`` (tuple, or a single tensor) and ``example_kwargs``
    are what ``model`` is called with; batch and sequence dims stay dynamic (``dynamic=True``).
    ``frontend``: "auto" (torch.export, FX fallback), "export" or "fx".
    The user's model is not modified; ``fxquant.report(result)`` gives the per-layer report.
    """
    spec = Spec.coerce(spec)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            traced = trace(model, example_inputs, dict(example_kwargs or {}), frontend=frontend, dynamic=dynamic)
    finally:
        model.train(was_training)
    ctx = PassContext(spec=spec, model=model)
    counts_before = collections.Counter(str(n.target) for n in traced.gm.graph.nodes
                                        if n.op in ("call_function", "call_module"))
    gm = run_passes(traced.gm, ctx, passes)
    rows = [Row(fqn=s.name, status=s.status, scheme=str(s.scheme) if s.scheme else None, reason=s.reason,
                bytes_before=s.bytes_before,
                bytes_after=s.bytes_after if s.status == "quantized" else s.bytes_before,  # float stays
                rel_error=s.rel_error, rule=s.rule, kind=s.kind, shape=s.out_shape) for s in ctx.sites]
    if not rows:
        ctx.notes.append("no linear layer found in the traced graph")
    gm.meta[REPORT_KEY] = Report(rows=rows, frontend=traced.frontend, export_error=traced.export_error,
                                 notes=ctx.notes, dynamic_dims=traced.dynamic_dims,
                                 model_bytes_before=tensor_bytes(model), model_bytes_after=tensor_bytes(gm),
                                 op_counts_before=dict(counts_before))
    return gm
