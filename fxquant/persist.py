"""What a model quantized in place is made of, as data: the *layout* of its packed layers, and
rebuilding those layers on a float skeleton (any device, the meta device included).

``packed_layout(model)`` is JSON: per packed site the op, its scalar arguments, each packed
tensor's name, shape and dtype (a list, in the op's argument order), the scheme and what surrounds it (bias, AWQ input scale, transposed).
``build_packed(model, layout)`` replaces the skeleton's layers by packed ones holding empty tensors
of exactly those shapes and dtypes, so that loading a state dict (``load_state_dict(assign=True)``,
transformers' loader) fills them with the stored bytes: no float copy of a weight is ever made.
:func:`packed_state_dict` is the model's state dict with each :class:`PackedWeight` flattened into
plain tensors (``<param>.packed_<name>``), what a safetensors file can hold.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .modules import _EXTRAS, _INNER, PackedWeight, QuantizedLinear
from .report import INPLACE_REPORT_ATTR, Report
from .schemes import QuantizedWeight

__all__ = ["LAYOUT_VERSION", "packed_layout", "build_packed", "packed_state_dict", "is_packed"]

#: the layout's format: a file with another version is refused (``build_packed``)
LAYOUT_VERSION = 1


def is_packed(model: nn.Module) -> bool:
    """Whether ``model`` holds layers :func:`fxquant.quantize_` packed."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules()) or any(
        isinstance(p, PackedWeight) for p in list(model.parameters()) + list(model.buffers()))


# ---- JSON of tensors and scalars ------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return dtype


def _tensor_spec(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}


def _attrs_to_json(attrs: Mapping[str, Any]) -> dict:
    return {k: ({"dtype": _dtype_name(v)} if isinstance(v, torch.dtype) else v) for k, v in attrs.items()}


def _attrs_from_json(d: Mapping[str, Any], where: str) -> dict:
    return {k: (_dtype(v["dtype"], f"{where}.{k}") if isinstance(v, dict) else v) for k, v in d.items()}


# ---- the layout -----------------------------------------------------------------------------------------
def packed_layout(model: nn.Module) -> dict:
    """JSON-safe description of every packed layer of ``model`` (see the module docstring)."""
    modules, tensors, seen = {}, {}, {}
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedLinear):
            if id(m) in seen:  # one module registered at two paths: stored once
                modules[seen[id(m)]]["aliases"].append(path)
                continue
            seen[id(m)] = path
            modules[path] = {
                "op": m.op_name, "scheme": m.scheme, "attrs": _attrs_to_json(m.op_attrs),
                "in_features": m.in_features, "out_features": m.out_features,
                "tensors": [{"name": n, **_tensor_spec(getattr(m, n))} for n in m.tensor_names],
                "bias": None if m.bias is None else {**_tensor_spec(m.bias), "parameter": isinstance(m.bias, nn.Parameter)},
                "input_scale": None if m.input_scale is None else _tensor_spec(m.input_scale),
                "aliases": [],
            }
    for path, t in _packed_weights(model):
        if id(t) in seen:
            tensors[seen[id(t)]]["aliases"].append(path)
            continue
        seen[id(t)] = path
        q = t.packed
        tensors[path] = {
            "op": q.op, "attrs": _attrs_to_json(q.attrs), "in_features": q.in_features,
            "out_features": q.out_features, "experts": q.experts,
            "tensors": [{"name": n, **_tensor_spec(v)} for n, v in q.tensors.items()],
            "transposed": t.transposed, "dtype": _dtype_name(t.dtype), "parameter": isinstance(t, nn.Parameter),
            "float_data": None if t.float_data is None else _tensor_spec(t.float_data),
            "input_scale": None if t.input_scale is None else _tensor_spec(t.input_scale), "aliases": [],
        }
    embeddings = _embedding_layout(model)
    rep = getattr(model, INPLACE_REPORT_ATTR, None)
    return {"version": LAYOUT_VERSION, "modules": modules, "tensors": tensors, "embeddings": embeddings,
            "report": rep.to_dict() if isinstance(rep, Report) else None}


def _embedding_layout(model: nn.Module) -> dict:
    """Packed token tables (``PackedEmbedding``, a GGUF file's quantized embedding): as a packed layer,
    plus the float dtype it returns, ``padding_idx`` and its ``embed_scale`` buffer."""
    from .checkpoints._gguf_embedding import PackedEmbedding

    out, seen = {}, {}
    for path, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, PackedEmbedding):
            continue
        if id(m) in seen:
            out[seen[id(m)]]["aliases"].append(path)
            continue
        seen[id(m)] = path
        out[path] = {"op": m.op_name, "scheme": m.scheme, "attrs": _attrs_to_json(m.op_attrs),
                     "in_features": m.embedding_dim, "out_features": m.num_embeddings,
                     "tensors": [{"name": n, **_tensor_spec(getattr(m, n))} for n in m.tensor_names],
                     "dtype": _dtype_name(m.dtype), "padding_idx": m.padding_idx,
                     "embed_scale": None if m.embed_scale is None else _tensor_spec(m.embed_scale), "aliases": []}
    return out


def _packed_weights(model: nn.Module):
    for mod_path, m in model.named_modules(remove_duplicate=False):
        for group in (m._parameters, m._buffers):
            for name, t in group.items():
                if isinstance(t, PackedWeight):
                    yield (f"{mod_path}.{name}" if mod_path else name), t


def packed_state_dict(model: nn.Module, sep: str = ".") -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every :class:`PackedWeight` replaced by its plain tensors
    (``<param>.packed_<name>``, and ``<param>.float_data`` / ``<param>.input_scale`` when it holds them;
    ``sep=STAGED``: the names a transformers checkpoint holds, see :func:`build_packed`)."""
    out = {}
    for key, t in model.state_dict().items():
        if isinstance(t, PackedWeight):
            out.update({f"{key}{sep}{name}": v for name, v in _parts(t).items()})
        else:
            out[key] = t
    return out


# ---- rebuilding ------------------------------------------------------------------------------------------
def _empty(spec: Mapping[str, Any], device, where: str) -> torch.Tensor:
    try:
        shape = [int(s) for s in spec["shape"]]
        dtype = _dtype(spec["dtype"], where)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed tensor entry {spec!r} ({e})") from None
    return torch.empty(shape, dtype=dtype, device=device)


def _qweight(entry: Mapping[str, Any], device, where: str) -> QuantizedWeight:
    try:
        op, n, k = entry["op"], int(entry["out_features"]), int(entry["in_features"])
        specs, attrs, experts = entry["tensors"], entry["attrs"], int(entry.get("experts", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed layout entry ({e!r})") from None
    if not hasattr(torch.ops.fxquant, op):
        raise ValueError(f"{where}: op {op!r} is not one of this fxquant's ops (written by a newer fxquant?)")
    # a list: the op takes the tensors in this order (JSON writers may sort a dict's keys)
    if not isinstance(specs, list) or not all(isinstance(s, Mapping) and "name" in s for s in specs):
        raise ValueError(f"{where}: malformed layout entry: 'tensors' must be a list of {{name, shape, dtype}}")
    tensors = {s["name"]: _empty(s, device, f"{where}.{s['name']}") for s in specs}
    return QuantizedWeight(op, tensors, _attrs_from_json(attrs, f"{where}.attrs"), n, k, experts)


def _check_version(layout: Mapping[str, Any]) -> None:
    if not isinstance(layout, Mapping) or "version" not in layout:
        raise ValueError("fxquant layout: not a layout (no 'version'); expected what fxquant.persist.packed_layout wrote")
    if layout["version"] != LAYOUT_VERSION:
        raise ValueError(f"fxquant layout: version {layout['version']!r} is not supported; this fxquant reads "
                         f"version {LAYOUT_VERSION}")


def _submodule(model: nn.Module, path: str, missing: str) -> nn.Module:
    """``model.get_submodule(path)``, or ``ValueError(missing)`` when there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(missing) from None


#: a transformers checkpoint holds a PackedWeight ``<param>``'s tensors as ``<param>__packed_<name>``
#: (and ``<param>__float_data`` / ``<param>__input_scale``): names of plain buffers of its module
#: (``packed_state_dict(model, sep=STAGED)`` writes them, ``build_packed(staged=True)`` registers them)
STAGED = "__"


def _owners(model: nn.Module, path: str, entry: Mapping[str, Any]):
    """``(module, attribute name)`` of ``path`` and of each of the entry's aliases."""
    for p in [path] + list(entry.get("aliases", [])):
        owner_path, _, name = p.rpartition(".")
        yield (model.get_submodule(owner_path) if owner_path else model), name


def _install_weight(model: nn.Module, path: str, entry: Mapping[str, Any], packed: PackedWeight,
                    by_entry: bool) -> None:
    """``packed`` at every path of the entry: as a parameter where the entry says so (``by_entry``) or
    where the model holds a parameter of that name."""
    new = nn.Parameter(packed, requires_grad=False) if entry.get("parameter", True) else packed
    for owner, name in _owners(model, path, entry):
        as_param = entry.get("parameter", True) if by_entry else name in owner._parameters
        (owner._parameters if as_param else owner._buffers)[name] = new


def _parts(t: PackedWeight) -> dict[str, torch.Tensor]:
    parts = {f"{_INNER}{name}": v for name, v in t.packed.tensors.items()}
    parts.update({name: getattr(t, name) for name in _EXTRAS if getattr(t, name) is not None})
    return parts


def finish_staged(model: nn.Module, layout: Mapping[str, Any]) -> None:
    """After a staged :func:`build_packed` and the loader: each weight's filled buffers become its
    :class:`PackedWeight` again, at every path it had."""
    for path, entry in layout.get("tensors", {}).items():
        owner, name = next(_owners(model, path, {}))
        pop = lambda part: owner._buffers.pop(f"{name}{STAGED}{part}")  # noqa: E731
        tensors = {s["name"]: pop(_INNER + s["name"]) for s in entry["tensors"]}
        fd, scale = (None if entry.get(n) is None else pop(n) for n in _EXTRAS)
        qw = QuantizedWeight(entry["op"], tensors, _attrs_from_json(entry["attrs"], path), entry["out_features"],
                             entry["in_features"], int(entry.get("experts", 0)))
        _install_weight(model, path, entry, PackedWeight(qw, entry["transposed"], _dtype(entry["dtype"], path), fd,
                                                         scale), by_entry=True)


def build_packed(model: nn.Module, layout: Mapping[str, Any], device: torch.device | str | None = None,
                 staged: bool = False) -> nn.Module:
    """Replace ``model``'s layers named in ``layout`` by packed ones with empty tensors on ``device``
    (default: where the skeleton's layer is, e.g. ``meta``); returns ``model``.  Every entry is
    checked against the skeleton first (a missing layer, a different shape: ``ValueError`` naming
    it), so a mismatched model is left as it was.  ``staged`` (transformers' loader, which fills
    parameters and buffers by name): a packed *weight* (not a layer) becomes plain buffers named as
    ``packed_state_dict(model, sep=STAGED)`` writes them, the float parameter removed; :func:`finish_staged` then
    builds the :class:`PackedWeight`."""
    _check_version(layout)
    plan = []
    for path, entry in layout.get("modules", {}).items():
        where = f"fxquant layout: layer {path!r}"
        old = _submodule(model, path, f"{where}: the model has no such module (is it the model the file was saved from?)")
        if not isinstance(old, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"{where}: expected an nn.Linear in the model, found {type(old).__name__}")
        if (old.out_features, old.in_features) != (entry["out_features"], entry["in_features"]):
            raise ValueError(f"{where}: shape [{entry['out_features']}, {entry['in_features']}] in the file, "
                             f"[{old.out_features}, {old.in_features}] in the model")
        if (old.bias is None) != (entry["bias"] is None):
            raise ValueError(f"{where}: bias {'present' if entry['bias'] else 'absent'} in the file but not in the model")
        dev = device if device is not None else _device_of(old)
        plan.append((path, entry, old, _qweight(entry, dev, where), dev))
    tplan = []
    for path, entry in layout.get("tensors", {}).items():
        where = f"fxquant layout: weight {path!r}"
        owner_path, _, name = path.rpartition(".")
        owner = _submodule(model, owner_path, f"{where}: the model has no module {owner_path!r}")
        old = owner._parameters.get(name, owner._buffers.get(name))
        if old is None:
            raise ValueError(f"{where}: the model has no such tensor")
        n, k, e = entry["out_features"], entry["in_features"], int(entry.get("experts", 0))
        shape = ([e] if e else []) + ([k, n] if entry["transposed"] else [n, k])
        if list(old.shape) != shape:
            raise ValueError(f"{where}: shape {list(old.shape)} in the model, {shape} packed in the file")
        dev = device if device is not None else old.device
        tplan.append((path, entry, _qweight(entry, dev, where), dev))
    eplan = []
    for path, entry in layout.get("embeddings", {}).items():
        where = f"fxquant layout: embedding {path!r}"
        old = _submodule(model, path, f"{where}: the model has no such module")
        if not isinstance(old, nn.Embedding) and type(old).__name__ != "PackedEmbedding":
            raise ValueError(f"{where}: expected an nn.Embedding in the model, found {type(old).__name__}")
        shape = (getattr(old, "num_embeddings", None), getattr(old, "embedding_dim", None))
        if shape != (entry["out_features"], entry["in_features"]):
            raise ValueError(f"{where}: table [{entry['out_features']}, {entry['in_features']}] in the file, "
                             f"{list(shape)} in the model")
        dev = device if device is not None else _device_of(old)
        eplan.append((path, entry, _qweight(entry, dev, where), dev))
    for path, entry, old, qw, dev in plan:
        bias = old.bias
        if bias is not None and device is not None:
            bias = nn.Parameter(torch.empty_like(bias, device=device), requires_grad=bias.requires_grad) \
                if isinstance(bias, nn.Parameter) else torch.empty_like(bias, device=device)
        scale = None if entry.get("input_scale") is None else _empty(entry["input_scale"], dev, path)
        new = QuantizedLinear(qw, bias, entry.get("scheme", ""), scale, old.weight.dtype)
        new.train(old.training)  # as quantize_ does: the layer's mode and hooks carry over
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(new, hooks).update(getattr(old, hooks))
        for p in [path] + list(entry.get("aliases", [])):
            parent_path, _, child = p.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    for path, entry, qw, dev in tplan:
        fd, scale = (None if entry.get(n) is None else _empty(entry[n], dev, path) for n in _EXTRAS)
        packed = PackedWeight(qw, entry["transposed"], _dtype(entry["dtype"], path), fd, scale)
        if not staged:
            _install_weight(model, path, entry, packed, by_entry=False)
            continue
        for owner, name in _owners(model, path, entry):
            owner._parameters.pop(name, None)
            owner._buffers.pop(name, None)
        # transformers' weight init must not look for the removed weight: a module's _init_weights may
        # reach its children's (GPT-2's MLP inits c_proj.weight); every tensor comes from the file
        for alias in [path] + list(entry.get("aliases", [])):
            parts = alias.split(".")[:-1]
            for i in range(len(parts) + 1):
                model.get_submodule(".".join(parts[:i]))._is_hf_initialized = True
        owner, name = next(_owners(model, path, {}))
        for part, t in _parts(packed).items():
            owner.register_buffer(f"{name}{STAGED}{part}", t)
    for path, entry, qw, dev in eplan:
        from .checkpoints._gguf_embedding import PackedEmbedding

        scale = None if entry.get("embed_scale") is None else _empty(entry["embed_scale"], dev, path)
        new = PackedEmbedding(qw, _dtype(entry["dtype"], path), entry.get("padding_idx"), scale, entry.get("scheme", ""))
        for p in [path] + list(entry.get("aliases", [])):
            parent_path, _, child = p.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    if layout.get("report") is not None:
        setattr(model, INPLACE_REPORT_ATTR, Report.from_dict(layout["report"]))
    return model


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
