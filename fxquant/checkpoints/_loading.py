"""What every checkpoint reader shares: where the tensors and config come from, the float tensors of a
skeleton outside its quantized layers (checked against the file, then assigned), installing a packed
layer in place of an ``nn.Linear``, and the meta-device buffers a checkpoint never holds.

Every reader (compressed-tensors, GPTQ, AWQ, bitsandbytes, AQLM, VPTQ) plans with these first and
changes the model only once the whole plan holds, so a bad file leaves the model as it was.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..modules import PackedWeight, QuantizedLinear
from . import _files

__all__ = ["source", "nbytes", "float_plan", "assign_floats", "install", "meta_buffers", "fill_meta_buffers"]


def source(directory_or_state_dict, config, model) -> tuple[Any, Mapping[str, torch.Tensor]]:
    if isinstance(directory_or_state_dict, (str, os.PathLike)):
        cfg = _files.read_config(directory_or_state_dict) if config is None else config
        qc = cfg.get("quantization_config") if isinstance(cfg, Mapping) and "quant_method" not in cfg else cfg
        if qc is None:
            raise ValueError(f"{os.path.join(directory_or_state_dict, _files.CONFIG)}: no 'quantization_config'")
        return qc, _files.read_tensors(directory_or_state_dict)
    if not isinstance(directory_or_state_dict, Mapping):
        raise TypeError("expected a checkpoint directory or a state dict (name -> tensor), got "
                        f"{type(directory_or_state_dict).__name__}")
    qc = config if config is not None else getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        raise ValueError("a state dict needs its quantization config: pass config= (the 'quantization_config' "
                         "dict of its config.json)")
    if isinstance(qc, Mapping) and "quantization_config" in qc:
        qc = qc["quantization_config"]
    return qc, directory_or_state_dict


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def float_plan(model: nn.Module, tensors: Mapping[str, torch.Tensor], quantized: set[str],
                used: set[str]) -> list[tuple[torch.Tensor, list[tuple[nn.Module, str, bool]]]]:
    """For every tensor of the skeleton outside the quantized layers' weights: the file's tensor and every
    ``(module, name, is_parameter)`` it is registered at.  Missing, extra and mismatched tensors raise."""
    places: dict[int, list] = collections.defaultdict(list)
    owners: dict[int, torch.Tensor] = {}
    for mpath, m in model.named_modules(remove_duplicate=False):
        for name, t in list(m._parameters.items()) + [(n, b) for n, b in m._buffers.items()
                                                        if n not in m._non_persistent_buffers_set]:
            if t is None or (mpath in quantized and name == "weight"):
                continue
            places[id(t)].append((m, name, name in m._parameters, f"{mpath}.{name}" if mpath else name))
            owners[id(t)] = t
    plan = []
    for tid, entries in places.items():
        old = owners[tid]
        keys = [key for *_, key in entries if key in tensors]
        if not keys:
            raise ValueError(f"tensor {entries[0][3]!r}: missing from the checkpoint")
        t = tensors[keys[0]]
        for key in keys:
            if tuple(tensors[key].shape) != tuple(old.shape):
                raise ValueError(f"tensor {key!r}: shape {tuple(tensors[key].shape)} in the checkpoint, "
                                 f"{tuple(old.shape)} in the model")
            if key != keys[0] and not torch.equal(tensors[key], t):
                raise ValueError(f"tensor {key!r}: the model ties it to {keys[0]!r} but the checkpoint holds "
                                 "different values")
        used.update(keys)
        plan.append((t, [(m, name, is_param) for m, name, is_param, _ in entries]))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"tensor {extra[0]!r} (and {len(extra) - 1} more): in the checkpoint but not in the model "
                         "(or not a tensor of a layer the config quantizes)")
    return plan


def assign_floats(model: nn.Module, plan) -> None:
    for t, entries in plan:
        new_param = None
        for m, name, is_param in entries:
            if is_param:
                if new_param is None:
                    new_param = nn.Parameter(t, requires_grad=m._parameters[name].requires_grad and t.is_floating_point())
                m._parameters[name] = new_param
            else:
                m._buffers[name] = t


def install(model: nn.Module, path: str, old: nn.Linear, qw, scheme: str) -> None:
    """``old`` replaced by a :class:`QuantizedLinear` at every path it is registered under (an
    ``nn.Linear`` subclass with its own ``forward`` keeps it: its weight becomes a PackedWeight)."""
    if type(old).forward is not nn.Linear.forward:
        old._parameters["weight"] = nn.Parameter(PackedWeight(qw, False, old.weight.dtype if
                                                              old.weight.dtype.is_floating_point else torch.float32),
                                                 requires_grad=False)
        return
    new = QuantizedLinear(qw, old.bias, scheme, weight_dtype=old.weight.dtype)
    new.train(old.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(new, hooks).update(getattr(old, hooks))
    for parent_path, parent in model.named_modules(remove_duplicate=False):
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new


def meta_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Non-persistent buffers on the meta device (a checkpoint never holds them): recomputed by a Hugging
    Face model's ``_init_weights``; any other model cannot be completed (``ValueError`` now)."""
    found = [(m, name, path) for path, m in model.named_modules() for name, b in m._buffers.items()
             if b is not None and b.is_meta and name in m._non_persistent_buffers_set]
    if found and not callable(getattr(model, "_init_weights", None)):
        raise ValueError(f"buffer {found[0][2]}.{found[0][1]!r} is on the meta device and not stored in checkpoints "
                         "(non-persistent); build the skeleton on the CPU, or use a Hugging Face model")
    return [(m, name) for m, name, _ in found]


def fill_meta_buffers(model: nn.Module, found: list[tuple[nn.Module, str]]) -> None:
    modules = {}
    for m, name in found:
        m._buffers[name] = torch.empty_like(m._buffers[name], device="cpu")
        modules[id(m)] = m
    with torch.no_grad():
        for m in modules.values():
            model._init_weights(m)


def apply_plan(model: nn.Module, tensors: Mapping[str, torch.Tensor], layers: list, rows: list, used: set[str],
               what: str, notes: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """The last step of every reader: check the float tensors against the file (:func:`float_plan`), then
    change the model: floats assigned, each ``(path, old linear, QuantizedWeight, scheme)`` of ``layers``
    installed, meta buffers recomputed, the report (``rows``; ``what`` names the checkpoint kind) set."""
    from ..report import INPLACE_REPORT_ATTR, Report, tensor_bytes

    floats = float_plan(model, tensors, {p for p, *_ in layers}, used)
    on_meta = meta_buffers(model)
    before = sum(nbytes(t) for t in {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())
    # -- nothing has changed so far; from here on every step succeeds --
    assign_floats(model, floats)
    for path, m, qw, scheme in layers:
        install(model, path, m, qw, scheme)
    fill_meta_buffers(model, on_meta)
    setattr(model, INPLACE_REPORT_ATTR, Report(
        rows=rows, frontend=f"{what} checkpoint", model_bytes_before=before, model_bytes_after=tensor_bytes(model),
        notes=[f"loaded {len(layers)} quantized layers from the {what} checkpoint (rel_error unknown: no float "
               "weights)", *notes]))
    return model
