"""``fxquant.compile`` and ``fxquant.quantize_``: trace, plan with the passes, emit.

Both run the same front end and the same passes (:data:`fxquant.passes.PLAN` then
:data:`~fxquant.passes.QUANTIZE`); they differ only in where the plan is applied: ``compile``
rewrites the traced graph (:data:`~fxquant.passes.GRAPH_EMIT`), ``quantize_`` lowers each quantized
site into the user's module tree (:mod:`fxquant.inplace`) as soon as it is packed.
"""
from __future__ import annotations

import collections
import gc
import logging
import sys
from typing import Any, Iterable, Mapping

import torch
import torch.fx

from . import inplace
from . import ops  # noqa: F401  (registers torch.ops.fxquant.*)
from .frontend import TraceResult, trace
from .passes import PIPELINE, PLAN, QUANTIZE, PassContext, run_passes
from .passes.calibration_inputs import with_example
from .passes.cleanup import note_kept_float_weights
from .report import INPLACE_REPORT_ATTR, REPORT_KEY, build_report, tensor_bytes
from .schemes import Scheme
from .spec import Spec

log = logging.getLogger(__name__)

SpecLike = "Spec | str | Scheme | Mapping | None"


def _trace(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None,
           frontend: str, dynamic: bool, user_example: bool | None = None) -> TraceResult:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return trace(model, example_inputs, dict(example_kwargs or {}), frontend=frontend, dynamic=dynamic,
                         user_example=user_example)
    finally:
        model.train(was_training)


def _op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module"))


def compile(model: torch.nn.Module, spec: SpecLike, example_inputs: Any = (),
            example_kwargs: Mapping[str, Any] | None = None, *,
            frontend: str = "auto", dynamic: bool = True, passes=PIPELINE,
            calibration: Iterable | None = None) -> torch.fx.GraphModule:
    """Quantize ``model``'s linear layers as ``spec`` says; return a runnable GraphModule.

    ``spec``: a :class:`Spec`, a scheme string/object (the default for every linear), or a dict
    (``Spec.from_dict``).  ``example_inputs`` (tuple, or a single tensor) and ``example_kwargs``
    are what ``model`` is called with; batch and sequence dims stay dynamic (``dynamic=True``).
    ``frontend``: "auto" (torch.export, FX fallback), "export" or "fx".
    ``calibration``: an iterable of model inputs (each a tensor, a tuple of positional args or a dict
    of keyword args; a single tensor or dict is one batch) for the methods that need data
    (``"int4wo-128@gptq"``, AWQ, OneBit); RTN and HQQ need none, and with data every quantized layer's
    output error is reported too.  Without example inputs, the first batch is the example.
    The user's model is not modified; ``fxquant.report(result)`` gives the per-layer report.
    """
    spec = Spec.coerce(spec)
    if isinstance(model, torch.nn.Module):
        inplace.check_not_quantized(model)
    if frontend == "modules":
        raise ValueError("frontend='modules' is for fxquant.quantize_ (it lists the model's nn.Linear modules "
                         "without a graph); fxquant.compile needs frontend 'auto', 'export' or 'fx'")
    calibration, example_inputs, example_kwargs = with_example(calibration, example_inputs, example_kwargs)
    traced = _trace(model, example_inputs, example_kwargs, frontend, dynamic)
    if traced.frontend == "modules":
        hint = ""
        if "use_cache" not in (example_kwargs or {}) and "use_cache" in inplace.planning_kwargs(model, example_kwargs):
            hint = ("; this model's forward takes use_cache: a Hugging Face model returns its KV cache object, which "
                    "a graph cannot output, unless called with use_cache=False: pass it in example_kwargs (and when "
                    "calling the result), or use fxquant.quantize_ to keep generate")
        raise RuntimeError(f"fxquant.compile could not trace the model ({traced.export_error}){hint}; "
                           "fxquant.quantize_ can still quantize its nn.Linear modules in place")
    ctx = PassContext(spec=spec, model=model, calibration=calibration)
    counts_before = _op_counts(traced.gm)
    gm = run_passes(traced.gm, ctx, passes)
    gm.meta[REPORT_KEY] = build_report(
        ctx.sites, frontend=traced.frontend, export_error=traced.export_error, dynamic_dims=traced.dynamic_dims,
        notes=ctx.notes, model_bytes_before=tensor_bytes(model), model_bytes_after=tensor_bytes(gm),
        op_counts_before=counts_before, spec=spec)
    return gm


def quantize_(model: torch.nn.Module, spec: SpecLike, example_inputs: Any = (),
              example_kwargs: Mapping[str, Any] | None = None, *, frontend: str = "auto",
              dynamic: bool = True, calibration: Iterable | None = None) -> torch.nn.Module:
    """Quantize ``model`` in place, as :func:`compile` would, and return the same object.

    Same front end, same passes, same decisions and report as ``compile(model, spec, ...)``; the plan
    is lowered into the module tree instead of a graph, so the model keeps its own ``forward`` (and,
    for a Hugging Face model, ``generate`` with any KV cache): a plain ``nn.Linear`` site becomes a
    :class:`fxquant.inplace.QuantizedLinear`, any other site (``F.linear`` / ``x @ W.t()`` / ``addmm`` /
    ``matmul`` on a parameter) has its parameter replaced by a :class:`fxquant.inplace.PackedWeight`
    that routes those calls to the op.  Layers are quantized and swapped one at a time and each float
    weight is released right after, so peak memory stays near the float model's size; a float weight
    still used elsewhere (a tied embedding) is kept, once.

    ``frontend``: as :func:`compile`, plus "modules": no trace, the sites are the model's ``nn.Linear``
    modules (no example inputs needed; the fallback when export and FX both fail; no calibration).
    ``calibration``: model inputs for the methods that need data (as :func:`compile`); the calibrate
    pass runs on the trace, before any layer is converted, and AWQ scales it folds into a norm weight
    are applied to this model's parameter.

    Errors (``ValueError`` for a bad spec / scheme / pattern / frontend, ``TypeError`` for a
    non-module, ``ValueError`` for a model fxquant already quantized) are raised before the model is
    touched.  ``fxquant.report(model)`` gives the per-layer report.
    """
    spec = Spec.coerce(spec)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inplace.check_not_quantized(model)
    calibration, example_inputs, example_kwargs = with_example(calibration, example_inputs, example_kwargs)
    given = bool(example_kwargs) or not (example_inputs is None
                                         or (isinstance(example_inputs, tuple) and not example_inputs))
    traced = _trace(model, example_inputs, inplace.planning_kwargs(model, example_kwargs), frontend, dynamic, given)
    if traced.frontend == "modules" and calibration is not None:
        raise ValueError("calibration needs a traced model, and this one could not be traced "
                         f"({traced.export_error or 'frontend=modules'}); pass example inputs it can be exported with")
    calls = None if calibration is None else inplace.calibration_calls(model, calibration)
    ctx = PassContext(spec=spec, model=model, calibration=calls,
                      input_scale_ok=inplace.takes_input_scale)
    counts_before = _op_counts(traced.gm)
    bytes_before = tensor_bytes(model)
    if traced.frontend == "modules":
        ctx.notes.append("no graph (frontend 'modules'): the sites are the model's nn.Linear modules; "
                         "functional linear calls on parameters (F.linear, x @ W.t()) were not looked for")
    run_passes(traced.gm, ctx, PLAN)  # calibration runs the trace (traced in eval mode), not the model
    info = dict(frontend=traced.frontend, export_error=traced.export_error, dynamic_dims=traced.dynamic_dims)
    extra_uses = inplace.weights_used_outside_sites(traced.gm, ctx.sites)
    for site in ctx.sites:  # the plan outlives the graph: release the trace (it references every weight)
        site.graph = None
    del traced
    gc.collect()
    lowering = inplace.Lowering(model, extra_uses, ctx.sites)
    ctx.read_weight = lowering.read_weight
    ctx.on_quantized = lowering.apply
    try:
        run_passes(None, ctx, QUANTIZE)
    except Exception as e:  # every check ran before the first layer was converted: this is not bad input
        if not lowering.done:
            raise
        raise RuntimeError(f"fxquant.quantize_ failed after converting {len(lowering.done)} layers in place (their "
                           "float weights are released): the model is partly quantized; load it again before "
                           f"retrying.  Cause: {type(e).__name__}: {e}") from e
    lowering.finish(ctx.sites)
    inplace.apply_folds(model, ctx.folds)
    note_kept_float_weights(ctx.sites, model)
    rep = build_report(ctx.sites, **info, notes=ctx.notes, model_bytes_before=bytes_before,
                       model_bytes_after=tensor_bytes(model), op_counts_before=counts_before, spec=spec)
    setattr(model, INPLACE_REPORT_ATTR, rep)
    if rep.quantized:
        _attach_hf(model, spec)
    return model


def _attach_hf(model: torch.nn.Module, spec: Spec) -> None:
    """A transformers or diffusers model keeps saving and loading packed (:func:`fxquant.hf.attach`)."""
    transformers, diffusers = sys.modules.get("transformers"), sys.modules.get("diffusers")
    if isinstance(model, getattr(transformers, "PreTrainedModel", ())):
        from . import hf

        hf.attach(model, spec)
    elif isinstance(model, getattr(diffusers, "ModelMixin", ())):
        from . import hf_diffusers

        hf_diffusers.attach(model, spec)
