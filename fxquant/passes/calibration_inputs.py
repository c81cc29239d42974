"""The calibration batches as the traced graph runs them: a batch in call form (:func:`as_call`),
keywords the trace did not take left out where that keeps the activations (:func:`without_extras`),
laid out as the exported program was traced (:func:`traced_layout`), split into single rows where the
graph pins its batch to one (:func:`batch_rows`), flattened into the graph's placeholders
(:func:`flat_inputs`).  The calibrate pass (:mod:`.calibrate`) runs them through :func:`graph_calls`;
``quantize_`` prepares its items with :class:`Call`.
"""
from __future__ import annotations

import inspect
import itertools
import operator
import re
from collections.abc import Mapping

import torch
import torch.fx
from torch.utils._pytree import tree_map

from ..frontend import BOUND_KEY, EXAMPLE_KEY, GUARDS_KEY
from ._base import InputError


def batches(calibration):
    for i, item in enumerate(calibration):
        yield as_call(item, f"calibration[{i}]")


class Call(tuple):
    """An ``(args, kwargs)`` pair already in call form."""


def as_call(item, where: str = "calibration item") -> tuple[tuple, dict]:
    """A calibration item -> ``(args, kwargs)``: a tensor, a tuple / list of positional args, or a
    dict of keyword args (as ``example_inputs`` / ``example_kwargs``)."""
    if isinstance(item, Call):
        return item[0], item[1]
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)):
        if item and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item):
            raise InputError(f"{where}: a list of {len(item)} numbers; token ids (or any input) go in a tensor: "
                             "torch.tensor([ids]) or {'input_ids': torch.tensor([ids])}")
        return tuple(item), {}
    if isinstance(item, Mapping):  # a dict, or a tokenizer's BatchEncoding
        return (), dict(item)
    raise InputError(f"{where}: expected a tensor, a tuple of positional arguments or a dict of keyword "
                    f"arguments, got {type(item).__name__}")


def with_example(calibration, example_inputs, example_kwargs) -> tuple:
    """``(calibration, example_inputs, example_kwargs)`` as the front end and the calibrate pass take them:
    a single tensor or dict (a tokenizer's output) given as ``calibration`` is one batch (iterating it
    would give its rows or its keys); with no example inputs, the first batch is the example the model
    is traced with (the batches stay one pass, in order)."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    no_example = (example_inputs is None or (isinstance(example_inputs, (tuple, list)) and not example_inputs)) \
        and not example_kwargs
    if calibration is None or not no_example:
        return calibration, example_inputs, example_kwargs
    if isinstance(calibration, (list, tuple)):  # re-iterable: left as given
        first, rest = (calibration[0] if calibration else None), calibration
    else:
        it = iter(calibration)
        first = next(it, None)
        rest = itertools.chain([first], it) if first is not None else []
    if first is None:
        return rest, example_inputs, example_kwargs
    args, kwargs = as_call(first, "calibration[0]")
    return rest, args, kwargs


def graph_calls(gm: torch.fx.GraphModule, model, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """One calibration batch as the calls the traced graph runs: keywords the trace did not take but
    whose effect is known left out (:func:`without_extras`), laid out as traced (:func:`traced_layout`),
    split into rows where the graph pins its batch to one (:func:`batch_rows`)."""
    return [row for a, k in without_extras(gm, args, kwargs)
            for row in batch_rows(gm, *traced_layout(gm, model, a, k))]


def _traced_names(gm: torch.fx.GraphModule) -> set[str] | None:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "in_spec", None)
    children = list(spec.children()) if spec is not None else []
    return set(children[1].context or ()) if len(children) == 2 else None


def without_extras(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """A batch whose keywords the trace did not take, where leaving them out keeps every activation:
    ``labels`` (only a loss reads them), an all-zero ``token_type_ids``, an all-ones ``attention_mask``;
    a padded ``attention_mask`` (a tokenizer's output with ``padding=True``) splits the batch into its
    rows, each cut to its unpadded tokens (the padding's activations left out of the statistics, as a
    mask would keep them out of the real tokens').  A batch without the ``attention_mask`` the trace took
    gets an all-ones one.  Other keywords go on (:func:`traced_layout` names them)."""
    names = _traced_names(gm)
    if names is None:
        return [(args, kwargs)]
    kwargs = dict(kwargs)
    ids = kwargs.get("input_ids", args[0] if len(args) == 1 else None)
    if "attention_mask" in names and kwargs.get("attention_mask") is None and isinstance(ids, torch.Tensor):
        kwargs["attention_mask"] = torch.ones_like(ids)  # traced with a mask, a batch without: attend to all
    if "labels" not in names:
        kwargs.pop("labels", None)
    tt = kwargs.get("token_type_ids")
    if "token_type_ids" not in names and isinstance(tt, torch.Tensor) and not tt.any():
        del kwargs["token_type_ids"]
    mask = kwargs.get("attention_mask")
    if "attention_mask" in names or not isinstance(mask, torch.Tensor):
        return [(args, kwargs)]
    del kwargs["attention_mask"]
    if mask.bool().all():
        return [(args, kwargs)]
    if mask.dim() != 2:
        raise InputError(f"a calibration batch passes a padded attention_mask of shape {list(mask.shape)}, which "
                         f"the model was not traced with: pass attention_mask in example_kwargs too, or unpadded "
                         f"batches")
    b, t = mask.shape
    rows = []
    for i in range(b):
        idx = mask[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo != idx.numel():
            raise InputError(f"calibration: row {i} of a batch's attention_mask is not one span of tokens (packed "
                             f"sequences?); the model was not traced with attention_mask: pass it in "
                             f"example_kwargs too")

        def cut(v, i=i, lo=lo, hi=hi):
            if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != b:
                return v
            return v[i:i + 1, lo:hi] if v.dim() >= 2 and v.shape[1] == t else v[i:i + 1]
        rows.append(tree_map(cut, (args, kwargs)))
    return rows


def traced_layout(gm: torch.fx.GraphModule, model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` rearranged as the exported program was traced (which arguments were passed
    by position, which by name), so a batch may name a positional parameter or pass a keyword one by
    position, as the model's own ``forward`` allows."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(info, "in_spec", None)
    children = list(spec.children()) if spec is not None else []
    if model is None or len(children) != 2:
        return args, kwargs
    n_args = children[0].num_children
    names = list(children[1].context or ())
    if len(args) == n_args and sorted(kwargs) == sorted(names):
        return args, {k: kwargs[k] for k in names}
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"a calibration batch does not fit the model's forward: {e}") from None
    params = list(sig.parameters)
    for p, par in sig.parameters.items():  # keywords taken by **kwargs: by their own names
        if par.kind is inspect.Parameter.VAR_KEYWORD and p in bound.arguments:
            bound.arguments.update(bound.arguments.pop(p))
    traced_bound = gm.meta.get(BOUND_KEY, {})  # non-tensor keywords the trace bound (use_cache=False)
    for k, v in traced_bound.items():
        if k in bound.arguments and bound.arguments[k] == v:
            del bound.arguments[k]
    new_args = tuple(bound.arguments[p] for p in params[:n_args] if p in bound.arguments)
    # a non-tensor keyword the model was traced with (use_cache=False) and the batch leaves out
    _, example_kwargs = gm.meta.get(EXAMPLE_KEY, ((), {}))
    for k in names:
        if k not in bound.arguments and k in example_kwargs and not isinstance(example_kwargs[k], torch.Tensor):
            bound.arguments[k] = example_kwargs[k]
    missing = [k for k in names if k not in bound.arguments]
    extra = [k for k, v in bound.arguments.items()
             if k not in names and k not in params[:n_args] and v is not None]
    if extra:  # the traced graph has no input for them: running without would silently change the data
        raise InputError(f"a calibration batch passes {extra}, which the model was not traced with: pass them "
                         f"in example_inputs / example_kwargs too (traced with {n_args} positional, keywords {names})")
    if len(new_args) != n_args or missing:
        raise InputError(f"a calibration batch must give the arguments the model was traced with "
                         f"({n_args} positional, keywords {names}); missing {missing or params[len(new_args):n_args]}")
    return new_args, {k: bound.arguments[k] for k in names}


_BATCH_ONE = re.compile(r"L\['(\w+)'\]\.size\(\)\[0\] == 1")  # a guard pinning an input's batch to 1


def batch_rows(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """A calibration call as the graph can run it: itself, or, when the graph was traced with a batch of
    one that the model's code pinned (Hugging Face's mask code branches on ``batch_size == 1``, so
    the exported graph guards on it) and the call has ``B > 1`` rows, ``B`` calls of one row each
    (every tensor whose first dim is ``B`` sliced; the others, such as a ``[1, T]`` position
    tensor, as given).  Every statistic is a sum over tokens, so the rows give the batch's values."""
    pinned = {m.group(1) for g in gm.meta.get(GUARDS_KEY, ()) if (m := _BATCH_ONE.fullmatch(g.strip()))}
    for node in gm.graph.nodes:  # a dim 0 the export specialised to 1 (no guard left to read)
        v = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and v.dim() > 1 and type(v.shape[0]) is int and v.shape[0] == 1 \
                and any(type(d) is not int for d in v.shape[1:]):
            pinned.add(node.target)
    if not pinned:
        return [(args, kwargs)]
    flat = flat_inputs(gm, args, kwargs)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rows = None
    for node, value in zip(holders, flat):
        if node.target in pinned and isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
            rows = value.shape[0]
            break
    if rows is None:
        return [(args, kwargs)]

    def row(i):
        return tree_map(lambda t: t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows
                        else t, (args, kwargs))
    return [row(i) for i in range(rows)]


def flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The placeholder values of ``gm`` for a call ``gm(*args, **kwargs)``."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        try:
            return list(tree_flatten_spec((args, kwargs), info.in_spec))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"a calibration batch does not have the structure of the example inputs the model "
                             f"was traced with ({type(e).__name__}: {e})") from None
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            name = node.target.lstrip("*")
            values.append(bound.arguments.get(name, node.args[0] if node.args else None))
    return values


_COMPARE = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge, "<": operator.lt,
            "<=": operator.le}
_SHAPE_GUARD = re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\] (==|!=|>|>=|<|<=) (\d+)")  # the shape guards export writes


def check_guards(gm: torch.fx.GraphModule, where: str, args: tuple, kwargs: dict) -> None:
    """``InputError`` when a calibration call breaks a shape guard of the traced graph (a size the model's
    code branched on when it was traced: a batch of one row against an example of two, a one-token
    sequence), naming the call, the guard and what to do; checked before the call runs."""
    guards = [m.groups() for g in gm.meta.get(GUARDS_KEY, ()) if (m := _SHAPE_GUARD.fullmatch(g.strip()))]
    if not guards:
        return
    values = {n.target: v for n, v in zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                          flat_inputs(gm, args, kwargs))}
    example = gm.meta.get(EXAMPLE_KEY)
    for name, dim, op, bound in guards:
        v = values.get(name)
        if not isinstance(v, torch.Tensor) or v.dim() <= int(dim):
            continue
        size, bound = v.shape[int(dim)], int(bound)
        if not _COMPARE[op](size, bound):
            traced = ""
            if example is not None:
                shapes = {k: list(t.shape) for k, t in zip(values, flat_inputs(gm, *example))
                          if isinstance(t, torch.Tensor)}
                traced = f" (traced with {shapes})"
            raise InputError(
                f"{where}: {name} of shape {list(v.shape)} does not fit the traced graph{traced}: it holds for "
                f"{name}.size({dim}) {op} {bound} only (the model's code branches on that size).  Give calibration "
                f"batches shaped like the example, or an example shaped like them: an example of one row makes "
                f"any batch run row by row; sequences need more than one token")


def token_mask(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The real tokens (bool ``[B, T]``) of a call that passes the traced graph a padded ``attention_mask``:
    the statistics leave the padding's activations out (:func:`real_tokens`); ``None`` when nothing is padded."""
    mask = kwargs.get("attention_mask")
    names = _traced_names(gm)
    if (names is None or "attention_mask" not in names or not isinstance(mask, torch.Tensor) or mask.dim() != 2
            or bool(mask.bool().all())):
        return None
    return mask.bool()


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A site's input ``x`` without the padded positions of ``mask`` (``[B, T, ...]`` or ``[B * T, K]``
    activations); as it is when it has neither layout."""
    if mask is None:
        return x
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    return x
