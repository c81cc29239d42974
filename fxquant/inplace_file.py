"""The ``inplace`` kind of fxquant file: a model ``fxquant.quantize_`` converted, without its code.

The document holds the packed layout (:func:`fxquant.persist.packed_layout`: which layers are
packed, with which op, scalars, tensor shapes and dtypes, and the report) and one entry per tensor
*object* of the module tree: the paths it is registered under (a tied weight has several),
parameter or buffer, ``requires_grad``, and the stored tensor(s) holding its values: a plain tensor
under its first path, a :class:`~fxquant.modules.PackedWeight` as its packed tensors
(``<path>.packed_<name>``, the names of :func:`~fxquant.persist.packed_state_dict`) and its
``float_data``.  Every parameter and buffer is listed, non-persistent buffers included, so a
skeleton built on the meta device is complete after loading.

Loading into a float *skeleton* (the same architecture: real tensors or ``torch.device("meta")``):
:func:`~fxquant.persist.build_packed` puts packed layers with meta tensors in place, then every tensor
slot of the result is matched with the file (the same paths, parameter or buffer, shapes and
dtypes, nothing missing or left over), the file's tensors are read and checked, and only then is
each slot given its tensor, one object per tied group.  Any failure before that last step undoes
the build, so a skeleton that does not match is left as it was.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from .modules import _EXTRAS, _INNER, PackedWeight, QuantizedLinear
from .persist import build_packed, is_packed, packed_layout
from .report import INPLACE_REPORT_ATTR
from .schemes import QuantizedWeight

__all__ = ["document", "load_into"]

_Slot = tuple[nn.Module, str, torch.Tensor, bool]  # owner, attribute name, tensor, is a parameter


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """Every parameter and buffer slot of ``model`` by path, at every path a module is registered under."""
    out = {}
    for mpath, m in model.named_modules(remove_duplicate=False):
        for group, is_param in ((m._parameters, True), (m._buffers, False)):
            for name, t in group.items():
                if t is not None:
                    out[f"{mpath}.{name}" if mpath else name] = (m, name, t, is_param)
    return out


def document(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """The document and tensors of the ``inplace`` kind for ``model`` (see the module docstring)."""
    objects, tensors, index = [], {}, {}
    for path, (_, _, t, is_param) in _slots(model).items():
        if id(t) in index:
            objects[index[id(t)]]["paths"].append(path)
            continue
        index[id(t)] = len(objects)
        entry = {"paths": [path], "kind": "parameter" if is_param else "buffer", "requires_grad": bool(t.requires_grad)}
        if isinstance(t, PackedWeight):
            entry["packed"] = {}
            for name, inner in t.packed.tensors.items():
                tensors[f"{path}.{_INNER}{name}"] = inner
                entry["packed"][name] = f"{path}.{_INNER}{name}"
            for name in _EXTRAS:  # float_data, input_scale
                extra = getattr(t, name)
                entry[name] = None if extra is None else f"{path}.{name}"
                if extra is not None:
                    tensors[f"{path}.{name}"] = extra
        else:
            tensors[path] = t
            entry["tensor"] = path
        objects.append(entry)
    return {"kind": "inplace", "layout": packed_layout(model), "objects": objects}, tensors


# ---- loading ----------------------------------------------------------------------------------------------------
class _Undo:
    """The module tree's registrations (submodules, parameters, buffers, the report), to put back."""

    _ABSENT = object()

    def __init__(self, model: nn.Module):
        self.model = model
        mods = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}.values()
        self.saved = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
                      for m in mods]
        self.report = vars(model).get(INPLACE_REPORT_ATTR, self._ABSENT)

    def restore(self) -> None:
        for m, mods, params, bufs, nonpersistent in self.saved:
            for live, old in ((m._modules, mods), (m._parameters, params), (m._buffers, bufs),
                              (m._non_persistent_buffers_set, nonpersistent)):
                live.clear()
                live.update(old)
        vars(self.model).pop(INPLACE_REPORT_ATTR, None)
        if self.report is not self._ABSENT:
            vars(self.model)[INPLACE_REPORT_ATTR] = self.report


def _spec(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _compare(path: str, t: torch.Tensor, obj: Mapping[str, Any], specs: Mapping[str, dict]) -> list[str]:
    """Mismatches between the model's slot ``t`` (after the build) and the file's entry ``obj``."""
    def differs(name: str, have: torch.Tensor | None) -> list[str]:
        want = specs.get(name)
        if want is None:
            return [f"{name!r}: listed by the document but not stored"]
        if have is None or f"{want['dtype']} {list(want['shape'])}" != _spec(have):
            return [f"{path!r}: {want['dtype']} {want['shape']} in the file, "
                    f"{'nothing' if have is None else _spec(have)} in the model"]
        return []

    if "packed" in obj:
        if not isinstance(t, PackedWeight):
            return [f"{path!r}: packed in the file, a float {_spec(t)} in the model"]
        inner = t.packed.tensors
        extras = {n: obj.get(n) for n in _EXTRAS}
        if set(inner) != set(obj["packed"]) or any((getattr(t, n) is None) != (f is None) for n, f in extras.items()):
            return [f"{path!r}: packed tensors {sorted(obj['packed'])} in the file, {sorted(inner)} in the layout"]
        out = [m for n, name in obj["packed"].items() for m in differs(name, inner[n])]
        return out + [m for n, f in extras.items() if f for m in differs(f, getattr(t, n))]
    if isinstance(t, PackedWeight):
        return [f"{path!r}: a plain tensor in the file, packed in the layout"]
    return differs(obj["tensor"], t)


def _plan(model: nn.Module, objects: list, specs: Mapping[str, dict]) -> list:
    """``[(object entry, [(owner, name, is_param)], the built tensor)]``; ``ValueError`` listing every
    mismatch between the built model's slots and the file's objects."""
    slots = _slots(model)
    problems, covered, plan = [], set(), []
    for obj in objects:
        targets, template = [], None
        for path in obj["paths"]:
            if path not in slots:
                problems.append(f"{path!r}: in the file, not in the model")
                continue
            owner, name, t, is_param = slots[path]
            if is_param != (obj["kind"] == "parameter"):
                problems.append(f"{path!r}: a {obj['kind']} in the file, a {'parameter' if is_param else 'buffer'} "
                                "in the model")
            problems += _compare(path, t, obj, specs)
            if obj.get("requires_grad") and not t.dtype.is_floating_point:
                problems.append(f"{path!r}: requires_grad on a {t.dtype} tensor")
            covered.add(path)
            targets.append((owner, name, is_param))
            template = t if template is None else template
        plan.append((obj, targets, template))
    left = [p for p in slots if p not in covered]
    if left:
        problems.append(f"in the model, not in the file: {', '.join(map(repr, left[:8]))}"
                        + (f", ... ({len(left)} in all)" if len(left) > 8 else ""))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise ValueError(f"the model does not match the file: {shown} (is it the architecture the file was saved "
                         "from, in the same dtype?)")
    return plan


def _check_skeleton(model: nn.Module, layout: Mapping[str, Any]) -> None:
    if is_packed(model) or hasattr(model, INPLACE_REPORT_ATTR):
        raise ValueError("the model is already quantized; pass the float model's skeleton (the same architecture, "
                         "real or built under torch.device('meta'))")
    for path, entry in layout.get("tensors", {}).items():  # a PackedWeight keeps the float dtype it replaced
        for p in [path] + list(entry.get("aliases", [])):
            owner_path, _, name = p.rpartition(".")
            try:
                owner = model.get_submodule(owner_path)
            except AttributeError:
                continue  # build_packed names it
            old = owner._parameters.get(name, owner._buffers.get(name))
            if old is not None and str(old.dtype).removeprefix("torch.") != entry.get("dtype"):
                raise ValueError(f"weight {p!r}: {old.dtype} in the model, {entry.get('dtype')} in the file (build "
                                 "the skeleton in the dtype the model was saved in)")


def load_into(model: nn.Module, doc: Mapping[str, Any], tensors_of: Callable[[], dict[str, torch.Tensor]],
              where: str) -> nn.Module:
    """Load an ``inplace`` document into the float skeleton ``model`` (see the module docstring);
    ``tensors_of()`` reads the file's tensors.  Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the float skeleton), got {type(model).__name__}")
    try:
        layout, objects = doc["layout"], list(doc["objects"])
        specs = {**doc["tensors"], **{a: doc["tensors"][t] for a, t in doc.get("aliases", {}).items()}}
        _check_skeleton(model, layout)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"fxquant.load: {where}: malformed inplace document ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"fxquant.load: {where}: {e}") from None
    undo = _Undo(model)
    try:
        build_packed(model, layout, device="meta")
        plan = _plan(model, objects, specs)
        tensors = tensors_of()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        undo.restore()
        if isinstance(e, ValueError) and str(e).startswith("fxquant.load:"):
            raise
        raise ValueError(f"fxquant.load: {where}: {e}") from None
    except BaseException:
        undo.restore()
        raise
    for obj, targets, template in plan:
        if "packed" in obj:
            q = template.packed
            qw = QuantizedWeight(q.op, {n: tensors[obj["packed"][n]] for n in q.tensors}, dict(q.attrs),
                                 q.out_features, q.in_features, q.experts)
            fd, scale = (None if obj.get(n) is None else tensors[obj[n]] for n in _EXTRAS)
            new = PackedWeight(qw, template.transposed, template.dtype, fd, scale)
            new = nn.Parameter(new, requires_grad=False) if obj["kind"] == "parameter" else new
        else:
            t = tensors[obj["tensor"]]
            new = nn.Parameter(t, requires_grad=bool(obj["requires_grad"])) if obj["kind"] == "parameter" else t
        for owner, name, is_param in targets:
            (owner._parameters if is_param else owner._buffers)[name] = new
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m._bound = None
    return model
