"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``), written and read by fxquant.

- :func:`save_compressed_tensors`: a model ``fxquant.quantize_`` packed -> a directory vLLM,
  transformers and compressed-tensors read: ``model.safetensors`` (float tensors as they are, and per
  quantized linear the ``pack-quantized`` tensors, :mod:`._ct_layers`) and ``config.json`` (the model's
  Hugging Face config, if it has one, with ``quantization_config`` set).
- :func:`load_compressed_tensors`: such a checkpoint (``pack-quantized``, ``int-quantized`` or
  ``naive-quantized`` integer weight-only layers) into a float skeleton, every quantized layer packed
  straight from the stored codes (no float weight is made).

Both check everything first: an error (a layer with no exact compressed-tensors form, an unsupported
config, a missing or mismatched tensor, an unreadable file) leaves the model and the files as they
were.  Layout and what is exact: docs/checkpoints.md.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from ..inplace import check_not_quantized
from ..modules import PackedWeight, QuantizedLinear
from ..report import Row
from . import _files
from ._loading import apply_plan, nbytes, source
from ._ct_layers import INT8_NAMES, PACKED_NAMES, LayerArgs, export_layer, import_layer

__all__ = ["save_compressed_tensors", "load_compressed_tensors"]

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


# ---- export -----------------------------------------------------------------------------------------------
def _packed_layers(model: nn.Module):
    """``(path, scheme string, QuantizedWeight, owner)`` of every packed linear: a
    :class:`QuantizedLinear`, or an ``nn.Linear`` whose ``weight`` is a :class:`PackedWeight`."""
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            if m.input_scale is not None:
                raise ValueError(f"layer {path!r} (scheme {m.scheme}): divides its input by an AWQ scale that could "
                                 "not be folded into a preceding weight; compressed-tensors has no such tensor")
            yield path, m.scheme, m.packed(), m
        elif isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), PackedWeight):
            w = m._parameters["weight"]
            if w.transposed:
                raise ValueError(f"layer {path!r}: its packed weight is stored transposed ([in, out]); "
                                 "compressed-tensors stores [out, in] weights of Linear layers")
            yield path, "", w.packed, m
    for mpath, m in model.named_modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if isinstance(t, PackedWeight) and not (isinstance(m, nn.Linear) and name == "weight"):
                what = (f"mixture-of-experts weights ({t.packed.experts} experts stacked)" if t.packed.experts
                        else "a packed weight outside an nn.Linear's 'weight'")
                raise ValueError(f"tensor {(mpath + '.' if mpath else '') + name!r}: {what}; compressed-tensors "
                                 "quantizes Linear layers only (save this model with fxquant.save or "
                                 "save_pretrained instead)")


def compressed_tensors_config(groups: dict[str, tuple[LayerArgs, list[str]]], ignore: list[str],
                              single: bool) -> dict[str, Any]:
    """The ``quantization_config`` dict: one config group per distinct weight args (``targets``
    ``["Linear"]`` when there is one group, the layer names otherwise)."""
    config_groups = {}
    for i, (args, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if single else sorted(names),
                                       "weights": args.to_json(), "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def save_compressed_tensors(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (packed by ``fxquant.quantize_``) as a compressed-tensors ``pack-quantized``
    checkpoint in ``directory``: ``model.safetensors`` and ``config.json`` (docs/checkpoints.md).

    Exportable layers: ``int8wo``, symmetric ``int<b>wo-<g>`` / ``-ch`` and ``affine<b>-g<g>[-sym]`` /
    ``-ch`` with b in 2, 4, 8 and groups dividing in_features; anything else raises ``ValueError``
    naming the layer and its scheme, before any file is written.  Layers left in float are listed in
    ``ignore``; tied tensors are written once.  ``config.json`` is ``model.config.to_dict()`` when the
    model has a Hugging Face config, with ``quantization_config`` replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups: dict[str, tuple[LayerArgs, list[str]]] = {}
    tensors: dict[str, torch.Tensor] = {}
    packed_keys: set[str] = set()
    for path, scheme, qw, owner in _packed_layers(model):
        args, out = export_layer(path, scheme, qw)
        key = json.dumps(args.to_json(), sort_keys=True)
        groups.setdefault(key, (args, []))[1].append(path)
        tensors.update({f"{path}.{k}": v for k, v in out.items()})
        names = owner.tensor_names if isinstance(owner, QuantizedLinear) else ("weight",)
        packed_keys.update(f"{path}.{n}" for n in names)
    if not groups:
        raise ValueError("the model has no packed layer: quantize it with fxquant.quantize_ first")
    for key, t in model.state_dict().items():
        if key not in packed_keys:
            tensors[key] = t
    ignore = [p for p, m in model.named_modules() if type(m) is not QuantizedLinear and isinstance(m, nn.Linear)
              and not isinstance(m._parameters.get("weight"), PackedWeight)]
    config = {}
    hf = getattr(model, "config", None)
    if hf is not None and callable(getattr(hf, "to_dict", None)):
        config = dict(hf.to_dict())
    config["quantization_config"] = compressed_tensors_config(groups, ignore, len(groups) == 1)
    _files.write_checkpoint(directory, config, _files.unique_storage(tensors))


# ---- import -----------------------------------------------------------------------------------------------
def _name_matches(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _class_matches(module: nn.Module, target: str) -> bool:
    return any(c.__name__ == target for c in type(module).__mro__)


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' rule: ``re:`` prefix is ``re.match`` on the name, else the exact name or a
    class name in the module's MRO."""
    return _name_matches(name, target) or _class_matches(module, target)


def _group_of(name: str, module: nn.Module, by_target: dict):
    """The config group of a layer as compressed-tensors picks it: a target string maps to the last group
    listing it; of the matching targets, exact names first, then regexes (each sorted), then classes."""
    ordered = sorted(by_target, key=lambda t: ("re:" in t, t))
    hits = [t for t in ordered if _name_matches(name, t)] + [t for t in ordered if _class_matches(module, t)]
    return by_target[hits[0]] if hits else None


def _parse_config(qc: Any) -> tuple[list[tuple[str, list[str], LayerArgs, str]], list[str]]:
    """``quantization_config`` -> ``([(group name, targets, weight args, format)], ignore)``."""
    where = "quantization_config"
    if hasattr(qc, "to_dict") and not isinstance(qc, Mapping):
        qc = qc.to_dict()
    if not isinstance(qc, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(qc).__name__}")
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{where}.quant_method={qc.get('quant_method')!r}; valid: 'compressed-tensors'")
    for field, what in (("kv_cache_scheme", "kv-cache quantization"), ("sparsity_config", "sparsity"),
                        ("transform_config", "a transform"), ("moe_sparsity_config", "MoE expert sparsity")):
        if qc.get(field):
            raise ValueError(f"{where}.{field}: {what} is not supported (fxquant loads integer weight-only "
                             "layers); valid: null or empty")
    top = qc.get("format", "dense")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{where}.quantization_status={status!r}: the weights are not stored compressed; "
                         "valid: 'compressed'")
    groups = []
    for gname, g in (qc.get("config_groups") or {}).items():
        gw = f"{where}.config_groups[{gname!r}]"
        if not isinstance(g, Mapping):
            raise ValueError(f"{gw}: expected a quantization scheme object, got {g!r} (preset names are not read)")
        for act in ("input_activations", "output_activations"):
            if g.get(act) is not None:
                raise ValueError(f"{gw}.{act}: activation quantization is not supported (fxquant loads "
                                 "weight-only layers); valid: null")
        fmt = g.get("format") or top
        if fmt not in FORMATS:
            raise ValueError(f"{gw}.format={fmt!r} is not supported; valid: {', '.join(FORMATS)}")
        targets = g.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{gw}.targets: expected a list of strings, got {targets!r}")
        if g.get("weights") is None:
            raise ValueError(f"{gw}.weights: missing (a weight-only scheme is expected)")
        groups.append((gname, targets, LayerArgs.from_json(g["weights"], f"{gw}.weights"), fmt))
    if not groups:
        raise ValueError(f"{where}.config_groups: no group; nothing is quantized")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise ValueError(f"{where}.ignore: expected a list of strings, got {ignore!r}")
    return groups, ignore


def load_compressed_tensors(directory_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                            model: nn.Module, *, config: Mapping | None = None,
                            prefer_affine: bool = False) -> nn.Module:
    """Load a compressed-tensors checkpoint into the float skeleton ``model`` (CPU or meta device) and
    return it: each quantized linear becomes a packed :class:`~fxquant.modules.QuantizedLinear` (an
    ``nn.Linear`` subclass with its own ``forward`` keeps it, its ``weight`` a
    :class:`~fxquant.modules.PackedWeight`), every other tensor is loaded as stored (its dtype).

    ``directory_or_state_dict``: a directory (``config.json`` + ``model.safetensors`` or shards) or a
    state dict, whose quantization config is ``config`` or ``model.config.quantization_config``.
    Symmetric layers with bf16 scales become ``int<b>wo`` / ``int8wo`` (same values, faster kernels),
    the others ``affine<b>`` (``prefer_affine=True``: all).  Anything fxquant cannot hold exactly
    (float8 or activation quantization, act-order ``g_idx``, a missing, extra or mismatched tensor,
    an unreadable file) raises ``ValueError`` naming it, before ``model`` changes.
    ``fxquant.report(model)`` lists the layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_quantized(model)
    qc, tensors = source(directory_or_state_dict, config, model)
    groups, ignore = _parse_config(qc)
    layers, rows, used = _plan_layers(model, tensors, groups, ignore, prefer_affine)
    return apply_plan(model, tensors, layers, rows, used, "compressed-tensors")


def _plan_layers(model: nn.Module, tensors: Mapping[str, torch.Tensor], groups, ignore: list[str],
                 prefer_affine: bool) -> tuple[list, list[Row], set[str]]:
    """Every ``nn.Linear`` of the skeleton: its config group (or none), and for a quantized one its packed
    weight from the checkpoint's tensors.  Returns ``(layers, report rows, tensor names used)``."""
    by_module = collections.defaultdict(dict)
    for key, t in tensors.items():
        mod, _, local = key.rpartition(".")
        by_module[mod][local] = t
    by_target = {t: g for g in groups for t in g[1]}
    used: set[str] = set()
    layers, rows = [], []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        where, (n, k) = f"layer {path!r}", m.weight.shape
        ignored = any(_matches(path, m, t) for t in ignore)
        group = None if ignored else _group_of(path, m, by_target)
        row = dict(fqn=path, shape=(n, k), kind="nn.Linear", bytes_before=nbytes(m.weight), rel_error=None)
        if group is None:
            rows.append(Row(**row, status="skipped", scheme=None, bytes_after=nbytes(m.weight),
                            reason="ignored by the checkpoint" if ignored else "targeted by no config group"))
            continue
        gname, _, args, fmt = group
        local = by_module.get(path, {})
        extra = sorted(set(local) - (PACKED_NAMES if fmt == "pack-quantized" else INT8_NAMES) - {"bias"})
        if extra:
            what = "act-order g_idx is not supported" if "weight_g_idx" in extra else "not a tensor of this format"
            raise ValueError(f"{where}.{extra[0]}: {what} (config group {gname!r}, format {fmt})")
        qw, scheme = import_layer(where, args, fmt, local, n, k, prefer_affine)
        used.update(f"{path}.{x}" for x in local if x != "bias")
        layers.append((path, m, qw, scheme))
        rows.append(Row(**row, status="quantized", scheme=scheme, bytes_after=qw.nbytes, reason="",
                        rule=f"config_groups[{gname!r}]", method="checkpoint"))
    return layers, rows, used


