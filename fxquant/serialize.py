"""Save and load compiled models: ``fxquant.save(qm, path)`` / ``fxquant.load(path)``.

The file is a ``torch.export`` archive (``.pt2``): the rewritten graph, every buffer bit for bit,
and the report as JSON.  Loading needs only ``import fxquant`` (which registers the ops).
"""
from __future__ import annotations

import json
import os

import torch

from . import ops  # noqa: F401  (the archive's graph calls torch.ops.fxquant.*)
from .frontend import EXAMPLE_KEY, GUARDS_KEY, export_program, framework_exclusions, module_of
from .report import REPORT_KEY, Report

_REPORT_FILE = "fxquant_report.json"
_GUARDS_FILE = "fxquant_droppable_guards.json"  # framework_exclusions at save time (no shape env on load)


def save(qm: torch.fx.GraphModule, path: str | os.PathLike, *, dynamic: bool = True) -> None:
    """Write the module ``fxquant.compile`` returned to ``path`` (a ``torch.export`` archive).

    The graph is re-exported with the example inputs it was compiled with (batch and sequence
    dims dynamic).  Loading gives a module whose buffers equal ``qm``'s bit for bit."""
    if REPORT_KEY not in getattr(qm, "meta", {}):
        raise ValueError("fxquant.save expects the module fxquant.compile (or fxquant.load) returned")
    args, kwargs = qm.meta[EXAMPLE_KEY]
    ep = export_program(qm, args, kwargs, dynamic)
    report = qm.meta[REPORT_KEY]
    # re-tracing qm evaluates its own guards inside PyTorch's guard function: keep the ones qm checks
    kept = set(qm.meta.get(GUARDS_KEY, ()))
    droppable = [g for g in framework_exclusions(ep) if g not in kept]
    extra = {_REPORT_FILE: json.dumps(report.to_dict()), _GUARDS_FILE: json.dumps(droppable)}
    torch.export.save(ep, path, extra_files=extra)


def load(path: str | os.PathLike) -> torch.fx.GraphModule:
    """Read a file written by :func:`save`; ``fxquant.report`` works on the result."""
    extra = {_REPORT_FILE: "", _GUARDS_FILE: ""}
    ep = torch.export.load(path, extra_files=extra)
    gm = module_of(ep, json.loads(extra[_GUARDS_FILE] or "[]"))
    gm.meta[REPORT_KEY] = Report.from_dict(json.loads(extra[_REPORT_FILE]))
    gm.meta[EXAMPLE_KEY] = ep.example_inputs
    return gm
