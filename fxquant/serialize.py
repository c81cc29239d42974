"""Save and load quantized models: ``fxquant.save(obj, path)`` / ``fxquant.load(path, model=None)``.

One file format: a single ``.safetensors`` file (:mod:`fxquant.safefile`): the tensors as safetensors
(packed weights as their plain tensors, a tensor shared by several modules stored once) and, in the
file's metadata, one JSON document: format name and version, ``kind``, the report, and what the
kind needs.  Nothing in it is pickled, so loading a file cannot run code.

- ``kind: "graph"`` (:mod:`fxquant.graph_file`): a module ``fxquant.compile`` returned; the program
  is ``torch.export``'s JSON graph, checked string by string before it is rebuilt
  (:mod:`fxquant.program_check`).  ``fxquant.load(path)`` needs no model.
- ``kind: "inplace"`` (:mod:`fxquant.inplace_file`): a model ``fxquant.quantize_`` converted; the file
  holds its tensors and the packed layout, not its code, so ``fxquant.load(path, model=skeleton)``
  loads into the float architecture (real, or built under ``torch.device("meta")``).

Either way the loaded model's tensors equal the saved ones bit for bit and ``fxquant.report`` gives
the saved report.  A file that is corrupt, truncated, of another format version, not fxquant's, or
that does not match ``model`` raises ``ValueError`` naming the file and the problem, and leaves
``model`` as it was; a failed save leaves ``path`` as it was.

``format="pt2"`` keeps the ``torch.export`` archive for compiled modules (readable by
``torch.export.load``); loading one unpickles its example inputs (``torch.load``, falling back to
``weights_only=False``), so ``fxquant.load`` reads it only when asked with ``format="pt2"``, for
files you trust.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from . import graph_file, inplace_file, safefile
from . import ops  # noqa: F401  (the saved graphs call torch.ops.fxquant.*)
from .frontend import EXAMPLE_KEY, GUARDS_KEY, export_program, framework_exclusions, module_of
from .report import INPLACE_REPORT_ATTR, REPORT_KEY, Report

__all__ = ["save", "load", "FORMATS"]

FORMATS = ("safetensors", "pt2")
_REPORT_FILE = "fxquant_report.json"
_GUARDS_FILE = "fxquant_droppable_guards.json"  # framework_exclusions at save time (no shape env on load)


def _is_graph(obj) -> bool:
    return isinstance(obj, torch.fx.GraphModule) and REPORT_KEY in getattr(obj, "meta", {})


def save(obj: nn.Module, path: str | os.PathLike, *, format: str = "safetensors", dynamic: bool = True) -> None:
    """Write ``obj`` to ``path``: a module ``fxquant.compile`` returned, or a model ``fxquant.quantize_``
    converted (or either as ``fxquant.load`` returned it).

    ``format="safetensors"`` (default): fxquant's file (module docstring).  ``format="pt2"``: a
    ``torch.export`` archive, compiled modules only (loading it unpickles; see the module docstring).
    A compiled module is re-exported with the example inputs it was compiled with (batch and sequence
    dims dynamic unless ``dynamic=False``).  Errors (``ValueError`` / ``TypeError``) are raised before
    ``path`` is touched."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not valid; choose one of {', '.join(FORMATS)}")
    path = os.fspath(path)
    if format == "safetensors" and path.endswith(".pt2"):
        raise ValueError(f"fxquant.save: {path} ends in .pt2 but format='safetensors' (the default) writes fxquant's "
                         "safetensors file: name it .safetensors, or pass format='pt2' for a torch.export archive")
    if _is_graph(obj):
        if format == "pt2":
            return _save_pt2(obj, path, dynamic)
        doc, tensors = graph_file.document(obj, dynamic)
    elif isinstance(obj, nn.Module) and isinstance(getattr(obj, INPLACE_REPORT_ATTR, None), Report):
        if format == "pt2":
            raise ValueError("fxquant.save: format='pt2' is for modules fxquant.compile returned; a model "
                             "fxquant.quantize_ converted is saved as safetensors (the default)")
        doc, tensors = inplace_file.document(obj)
    else:
        raise ValueError("fxquant.save expects the module fxquant.compile returned or a model fxquant.quantize_ "
                         f"converted (or one fxquant.load returned); got a {type(obj).__name__} fxquant did not "
                         "quantize")
    safefile.write(path, doc, tensors)


def load(path: str | os.PathLike, model: nn.Module | None = None, *, format: str | None = None,
         device: torch.device | str | None = None) -> nn.Module:
    """Read a file :func:`save` wrote.

    A compiled module's file: ``fxquant.load(path)`` returns the GraphModule.  A ``quantize_``'d
    model's file: ``fxquant.load(path, model=skeleton)`` loads into ``skeleton`` (the float
    architecture, real or built under ``torch.device("meta")``; its dtype must be the saved one)
    and returns it.  Tensors are placed on ``device`` (default: the CPU).  ``format="pt2"`` reads a
    ``torch.export`` archive (which unpickles: trusted files only).  ``fxquant.report`` works on the
    result."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fxquant.load: no such file: {path}")
    if format == "pt2":
        if model is not None:
            raise ValueError("fxquant.load: a .pt2 archive holds a compiled module; call without model=")
        return _load_pt2(path)
    if format not in (None, "safetensors"):
        raise ValueError(f"format={format!r} is not valid; choose one of {', '.join(FORMATS)}")
    if safefile.is_zip(path):
        raise ValueError(f"fxquant.load: {path} is a zip archive (a torch.export .pt2 file?), not fxquant's "
                         "safetensors file; loading an archive unpickles its example inputs, so pass format='pt2' if "
                         "you trust it")
    doc = safefile.read_document(path)
    device = torch.device(device if device is not None else "cpu")
    if doc.get("kind") == "graph":
        if model is not None:
            raise ValueError(f"fxquant.load: {path} holds a compiled module (fxquant.compile), which needs no model: "
                             "call fxquant.load(path)")
        return graph_file.rebuild(doc, safefile.read_tensors(path, doc, device), path)
    if doc.get("kind") == "inplace":
        if model is None:
            raise ValueError(f"fxquant.load: {path} holds a model quantized in place (fxquant.quantize_): the file has "
                             "its tensors, not its code, so pass the float architecture as model=, e.g. "
                             "`with torch.device('meta'): skeleton = MyModel(config)` then "
                             "`fxquant.load(path, model=skeleton)`")
        return inplace_file.load_into(model, doc, lambda: safefile.read_tensors(path, doc, device), path)
    raise ValueError(f"fxquant.load: {path}: unknown kind {doc.get('kind')!r}; expected 'graph' or 'inplace'")


# ---- the torch.export archive (opt-in) ------------------------------------------------------------------------
def _save_pt2(qm: torch.fx.GraphModule, path: str, dynamic: bool) -> None:
    args, kwargs = qm.meta[EXAMPLE_KEY]
    ep = export_program(qm, args, kwargs, dynamic)
    # re-tracing qm evaluates its own guards inside PyTorch's guard function: keep the ones qm checks
    kept = set(qm.meta.get(GUARDS_KEY, ()))
    droppable = [g for g in framework_exclusions(ep) if g not in kept]
    extra = {_REPORT_FILE: json.dumps(qm.meta[REPORT_KEY].to_dict()), _GUARDS_FILE: json.dumps(droppable)}
    torch.export.save(ep, path, extra_files=extra)


def _load_pt2(path: str) -> torch.fx.GraphModule:
    extra = {_REPORT_FILE: "", _GUARDS_FILE: ""}
    ep = torch.export.load(path, extra_files=extra)
    gm = module_of(ep, json.loads(extra[_GUARDS_FILE] or "[]"))
    gm.meta[REPORT_KEY] = Report.from_dict(json.loads(extra[_REPORT_FILE]))
    gm.meta[EXAMPLE_KEY] = ep.example_inputs
    return gm
