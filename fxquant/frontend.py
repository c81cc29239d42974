"""Front end: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule`` the passes can rewrite.

``torch.export.export(strict=False)`` first, with every input dim marked ``Dim.AUTO`` (batch
and sequence stay dynamic, feature dims get pinned by the model; size-1 example dims are not
specialised), then
``run_decompositions({})`` when needed so grad-mode wrappers disappear (``aten.linear`` survives).
``torch.fx.symbolic_trace`` is the fallback (or ``frontend="fx"``), and when that fails too the
*modules* front end (or ``frontend="modules"``): a graph that only calls each ``nn.Linear`` module
of the model once, what module-swapping quantizers see.  It needs no example inputs and finds no
functional ``F.linear`` use and no data flow (no calibration, no AWQ folds); the report says it was
used.  The user's model is never mutated: export builds fresh modules, the FX path copies the module
tree (sharing tensors), the modules graph only references the model's modules.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import Dim

log = logging.getLogger(__name__)

FRONTENDS = ("auto", "export", "fx", "modules")
MODULES_KEY = "fxquant_modules_frontend"  # gm.meta key: the graph only lists the model's nn.Linear modules
EXAMPLE_KEY = "fxquant_example_inputs"  # gm.meta key: (args, kwargs) the model was traced with
GUARDS_KEY = "fxquant_input_guards"  # gm.meta key: the input guards the module checks


@dataclass
class TraceResult:
    gm: torch.fx.GraphModule
    frontend: str  # "export" or "fx"
    export_error: str | None = None
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)


def _auto_dims(value: Any) -> Any:
    """``dynamic_shapes`` entry for one input: ``Dim.AUTO`` on every dim of each tensor (export
    keeps static the dims the model pins, such as a feature dim feeding a Linear)."""
    if isinstance(value, torch.Tensor):
        return {d: Dim.AUTO for d in range(value.dim())} or None
    if isinstance(value, (list, tuple)):
        return type(value)(_auto_dims(v) for v in value)
    if isinstance(value, dict):
        return {k: _auto_dims(v) for k, v in value.items()}
    return None


def _dynamic_dims(ep: torch.export.ExportedProgram) -> dict[str, list[int]]:
    """Which placeholder dims ended up symbolic, by user input name."""
    out = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [i for i, s in enumerate(val.shape) if not isinstance(s, int)]
            if dims:
                out[node.name] = dims
    return out


def export_module(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool = True) -> TraceResult:
    """``torch.export`` the model (non-strict, dynamic batch/sequence) into a GraphModule."""
    ep = export_program(model, args, kwargs, dynamic)
    return TraceResult(module_of(ep), "export", None, _dynamic_dims(ep))


def export_program(model: torch.nn.Module, args: tuple, kwargs: dict,
                   dynamic: bool = True) -> torch.export.ExportedProgram:
    """The ExportedProgram behind :func:`export_module` (also used by ``fxquant.save``)."""
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {"args": _auto_dims(args), "kwargs": _auto_dims(kwargs)} if kwargs else _auto_dims(args)
    import torch.fx.experimental._config as fx_config

    try:
        # size-oblivious: a size-1 example dim (batch 1) stays dynamic instead of being pinned to 1
        with fx_config.patch(backed_size_oblivious=True):
            ep = _strip_hops(_export(model, args, kwargs, dynamic_shapes))
    except Exception as first:  # noqa: BLE001 - retry without size-oblivious reasoning
        log.info("export with backed_size_oblivious failed (%s); retrying without", first)
        ep = _strip_hops(_export(model, args, kwargs, dynamic_shapes))
    return ep


def _strip_hops(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``run_decompositions({})`` when the graph holds higher-order ops (e.g. the
    ``wrap_with_set_grad_enabled`` of Llama exports, which breaks ``torch.compile`` of the module);
    it keeps ``aten.linear`` but re-traces the whole program (2/3 of compile time on SmolLM2), so
    graphs without such ops are used as exported."""
    if any(n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
           for n in ep.graph.nodes):
        return ep.run_decompositions({})
    return ep


def framework_exclusions(ep: torch.export.ExportedProgram) -> list[str]:
    """The input guards of ``ep`` that size-oblivious tracing added inside PyTorch itself: ``s != 1``
    style exclusions (``Ne`` guards) whose source location is in the ``torch`` package, e.g. a
    reshape-of-transpose contiguity check.  The traced general path computes the same values at size
    1 there, so these may be dropped.  An exclusion raised by the model's own code (``if x.shape[0]
    == 1:`` in the model, or in transformers) is a real branch and is not listed: dropping it would
    run the wrong path at size 1.  Empty when the program carries no shape environment (a loaded file)."""
    from torch.export.exported_program import _get_shape_env
    from torch.fx.experimental.symbolic_shapes import ShapeGuardPythonPrinter
    import sympy

    shape_env = _get_shape_env(ep.graph_module)
    if shape_env is None:
        return []
    printer = ShapeGuardPythonPrinter(shape_env.var_to_sources, lambda s: s.name, shape_env.var_to_sources)
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    out = []
    for guard in shape_env.guards:
        loc = guard.sloc.framework_loc
        filename = loc if isinstance(loc, str) else getattr(loc, "filename", "")
        internal = guard.sloc.maybe_user_loc is None and str(filename).startswith(torch_dir)
        if internal and isinstance(guard.expr, sympy.Ne):
            try:
                out.append(printer.doprint(guard.expr))
            except Exception:  # noqa: BLE001 - a guard the printer cannot render is kept
                continue
    return out


def module_of(ep: torch.export.ExportedProgram, droppable: list[str] | None = None) -> torch.fx.GraphModule:
    """``ep.module()`` keeping every input guard except the size-oblivious exclusions PyTorch itself
    added (:func:`framework_exclusions`, or ``droppable`` when given, e.g. as recorded in a saved file).

    Tracing with ``backed_size_oblivious`` records the general (size >= 2) path and guards it against
    size 1; where the guard comes from PyTorch's own reasoning the general path is right at size 1 (a
    decode step with one token must work) and the guard goes; where it comes from the model's code
    (a branch on a size of 1) it stays, so calling at size 1 fails loudly instead of running the
    other branch's graph."""
    codes = getattr(ep, "_guards_code", None)
    drop = set(framework_exclusions(ep) if droppable is None else droppable)
    if codes and drop:
        ep._guards_code = [g for g in codes if g not in drop]
    gm = ep.module()
    bound = getattr(ep, "_fxquant_bound", None)
    if bound:
        gm.register_forward_pre_hook(functools.partial(_drop_bound, bound), with_kwargs=True, prepend=True)
        gm.meta[BOUND_KEY] = dict(bound)
    # what the module enforces (a re-export for fxquant.save sees these as PyTorch's own guards)
    gm.meta[GUARDS_KEY] = list(getattr(ep, "_guards_code", None) or [])
    return gm


def _export(model, args, kwargs, dynamic_shapes):
    import inspect

    sig = inspect.signature(model.forward).parameters
    var_kw = next((n for n, p in sig.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    # non-tensor keywords the signature does not name (use_cache=False into a **kwargs): torch.export cannot
    # take a dynamic_shapes entry for them (a None leaf under **kwargs fails its tree matching), so they are
    # bound to forward for the trace instead of passed
    bound = {k: v for k, v in (kwargs or {}).items()
             if var_kw is not None and k not in sig
             and not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(v))}
    kwargs = {k: v for k, v in (kwargs or {}).items() if k not in bound}
    if dynamic_shapes is not None and kwargs:
        # export wants dynamic_shapes keyed like the forward signature: flatten args+kwargs by name;
        # a keyword the signature does not name goes through its **kwargs, nested under that name
        params = list(sig)
        spec = {}
        for i, a in enumerate(args):
            spec[params[i]] = dynamic_shapes["args"][i]
        for name, dims in dynamic_shapes["kwargs"].items():
            if name in bound:
                continue
            if name in sig or var_kw is None:
                spec[name] = dims
            else:
                spec.setdefault(var_kw, {})[name] = dims
        dynamic_shapes = spec
    elif dynamic_shapes is not None and isinstance(dynamic_shapes, dict) and "args" in dynamic_shapes:
        dynamic_shapes = dynamic_shapes["args"]
    if not bound:
        return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    model.forward = functools.partial(type(model).forward, model, **bound)
    try:
        ep = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        del model.forward
    ep._fxquant_bound = bound  # module_of: the graph takes them (as traced) and drops them
    return ep


#: ``gm.meta`` key: the non-tensor keywords the trace bound to forward (``_export``) -> their values
BOUND_KEY = "fxquant_bound_kwargs"


def _drop_bound(bound: dict, module, args, kwargs):
    """The keywords the trace bound (``_export``): accepted with the traced value, dropped before the graph."""
    for k, v in bound.items():
        if k in kwargs:
            if kwargs[k] != v:
                raise ValueError(f"this graph was traced with {k}={v!r}; it cannot run with {k}={kwargs[k]!r}")
            kwargs = {n: a for n, a in kwargs.items() if n != k}
    return args, kwargs


def fx_trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    """``symbolic_trace`` a structural copy of ``model``: new module objects, shared tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    clone = copy.deepcopy(model, memo)
    return torch.fx.symbolic_trace(clone)


def modules_graph(model: torch.nn.Module) -> torch.fx.GraphModule:
    """A GraphModule over ``model``'s own modules: one input and one ``call_module`` per ``nn.Linear``
    (each module once, under its first name), and for each transformers experts module (3-D expert
    weights) the grouped matmul its default implementation computes, ``torch._grouped_mm(x, W.mT, offs)``
    per weight; outputs all of them; never meant to run on data."""
    graph = torch.fx.Graph()
    outs, seen = [], set()
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and path and id(m) not in seen:
            seen.add(id(m))
            x = graph.placeholder(f"x_{len(outs)}")
            outs.append(graph.call_module(path, (x,)))
        elif path and id(m) not in seen and _is_conv1d(m):  # GPT-2's Conv1D: addmm(b, x, W [K, N])
            seen.add(id(m))
            x = graph.placeholder(f"x_{len(outs)}")
            outs.append(graph.call_function(torch.addmm, (graph.get_attr(f"{path}.bias"), x,
                                                          graph.get_attr(f"{path}.weight"))))
        elif path and id(m) not in seen and _is_experts_module(m):
            seen.add(id(m))
            for name, p in m.named_parameters(recurse=False):
                if p.dim() == 3 and name.endswith("proj"):  # gate_up_proj / up_proj / down_proj
                    x, offs = graph.placeholder(f"x_{len(outs)}"), graph.placeholder(f"offs_{len(outs)}")
                    w = graph.get_attr(f"{path}.{name}")
                    if not m.is_transposed:  # stored [E, N, K]: the product takes W.mT
                        w = graph.call_function(torch.transpose, (w, -2, -1))
                    outs.append(graph.call_function(torch._grouped_mm, (x, w, offs)))
    graph.output(tuple(outs))
    gm = torch.fx.GraphModule(model, graph)
    gm.meta[MODULES_KEY] = True
    return gm


def _is_conv1d(m: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its kin): ``y = addmm(bias, x, weight)`` with weight ``[K, N]``."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (type(m).__name__ == "Conv1D" and isinstance(w, torch.nn.Parameter) and w.dim() == 2
            and isinstance(b, torch.nn.Parameter) and b.shape == (w.shape[1],))


def _is_experts_module(m: torch.nn.Module) -> bool:
    """A transformers experts module (``use_experts_implementation`` sets ``is_transposed`` and ``has_gate``)."""
    return isinstance(getattr(m, "is_transposed", None), bool) and hasattr(m, "has_gate")


def _check_runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """``ValueError`` when the model itself fails on the example inputs (a misspelt keyword, a wrong
    shape): no front end can trace a call that does not run, and falling back would hide why."""
    try:
        model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the model's own error, whatever it is, is what to report
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"the model fails on the example inputs (args of types {[type(a).__name__ for a in args]}, "
                         f"kwargs {sorted(kwargs)}): {type(e).__name__}: {first}; pass example inputs the model "
                         "runs on") from e


def trace(model: torch.nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
          frontend: str = "auto", dynamic: bool = True, user_example: bool | None = None) -> TraceResult:
    """Trace ``model`` with ``frontend`` in {"auto", "export", "fx"}; see the module docstring.
    ``user_example``: whether the user gave the example (default: whether there is one); when export and
    FX both fail on a user's example, the model must at least run on it (else ``ValueError``, no fallback
    to the modules front end)."""
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend={frontend!r} is not valid; choose one of {', '.join(FRONTENDS)}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    error = None
    if frontend == "modules":
        return TraceResult(modules_graph(model), "modules", None, {})
    if frontend in ("auto", "export"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecation noise
                result = export_module(model, example_inputs, kwargs, dynamic)
                result.gm.meta[EXAMPLE_KEY] = (example_inputs, kwargs)
                return result
        except Exception as e:  # noqa: BLE001 - any export failure falls back to FX
            if frontend == "export":
                raise
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("torch.export failed (%s); falling back to torch.fx.symbolic_trace", error)
    try:
        gm = fx_trace(model)
    except Exception as e:  # noqa: BLE001
        why = f"torch.export failed ({error}) and " if error else ""
        if frontend == "fx":
            raise RuntimeError(f"fxquant could not trace the model: {why}torch.fx.symbolic_trace failed "
                               f"({type(e).__name__}: {e})") from e
        fx_error = f"torch.fx.symbolic_trace failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if user_example or (user_example is None and (example_inputs or kwargs)):
            _check_runs(model, example_inputs, kwargs)  # a wrong example: the model's error, not a fallback
        log.warning("%s; quantizing the model's nn.Linear modules without a graph", fx_error)
        return TraceResult(modules_graph(model), "modules", "; ".join(filter(None, [error, fx_error])), {})
    gm.meta[EXAMPLE_KEY] = (example_inputs, kwargs)
    return TraceResult(gm, "fx", error, {})
