"""bitsandbytes-serialized checkpoints (``Linear4bit`` / ``Linear8bitLt`` state dicts, transformers'
``quant_method: "bitsandbytes"``), read and written by fxquant without decoding a weight.

- :func:`load_bnb`: such a state dict (or a transformers ``save_pretrained`` directory) into a float or
  meta skeleton: 4-bit layers become ``nf4-<bs>[+dq]`` / ``fp4-<bs>[+dq]``, 8-bit layers ``bnb8[-<t>]``,
  their stored tensors taken as they are (:mod:`._bnb_layers`).
- :func:`save_bnb`: a model with such layers -> ``model.safetensors`` in bitsandbytes' layout and a
  ``config.json`` whose ``quantization_config`` transformers reads (``BitsAndBytesConfig``).

Everything is checked before the model or a file changes.  Layout and what is exact:
docs/checkpoints.md.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..formats import int8dq
from ..inplace import check_not_quantized
from ..modules import PackedWeight, QuantizedLinear
from ..report import Row
from . import _files
from ._bnb_layers import export_layer, import_4bit, import_8bit, layer_kind
from ._loading import apply_plan, nbytes

__all__ = ["load_bnb", "save_bnb"]

QUANT_METHOD = "bitsandbytes"


# ---- the config -------------------------------------------------------------------------------------------
def _settings(qc: Any) -> dict[str, Any]:
    """A ``quantization_config`` (dict or ``BitsAndBytesConfig``) -> what loading needs: ``kind`` ("4bit" /
    "8bit"), ``quant_type``, ``double_quant``, ``compute_dtype``, ``threshold``.  ``None``: no config
    (each layer is read from its own tensors; LLM.int8's threshold defaults to transformers' 6.0)."""
    if qc is None:
        return {"kind": None, "compute_dtype": None, "threshold": int8dq.DEFAULT_THRESHOLD}
    from ..configs import spec_from_config
    from ..configs._base import as_dict
    from ..schemes import FP4, NF4

    d = as_dict(qc, "quantization_config")
    method = d.get("quant_method", QUANT_METHOD)
    method = getattr(method, "value", method)
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method={method!r}: not a bitsandbytes checkpoint; "
                         f"valid: {QUANT_METHOD!r}")
    scheme = spec_from_config({**d, "quant_method": QUANT_METHOD}).default
    if isinstance(scheme, (NF4, FP4)):
        return {"kind": "4bit", "quant_type": scheme.quant_type, "double_quant": scheme.double_quant,
                "compute_dtype": scheme.compute_dtype, "threshold": int8dq.DEFAULT_THRESHOLD}
    return {"kind": "8bit", "compute_dtype": None, "threshold": scheme.threshold}  # Bnb8 (configs/bitsandbytes)


def source(directory_or_state_dict, config) -> tuple[Any, Mapping[str, torch.Tensor]]:
    if isinstance(directory_or_state_dict, (str, os.PathLike)):
        cfg = _files.read_config(directory_or_state_dict) if config is None else config
        return _unwrap(cfg), _files.read_tensors(directory_or_state_dict)
    if not isinstance(directory_or_state_dict, Mapping):
        raise TypeError("expected a checkpoint directory or a state dict (name -> tensor), got "
                        f"{type(directory_or_state_dict).__name__}")
    for key, t in directory_or_state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {key!r}: expected a tensor, got {type(t).__name__} (bitsandbytes' "
                            "packed form, QuantState.as_dict(packed=True), holds tensors only)")
    return _unwrap(config), directory_or_state_dict


def _unwrap(cfg: Any) -> Any:
    """A model config (``config.json`` dict or a transformers config) -> its ``quantization_config``
    (``None`` when it has none); a ``quantization_config`` itself is returned as it is."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        inner = getattr(cfg, "quantization_config", None)
        if inner is not None:
            return inner
        from ..configs._base import as_dict

        cfg = as_dict(cfg, "config")
    if "quantization_config" in cfg:
        return cfg["quantization_config"]
    return cfg if any(k in cfg for k in ("quant_method", "load_in_4bit", "load_in_8bit")) else None


# ---- load -------------------------------------------------------------------------------------------------
def load_bnb(directory_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module,
             config: Any = None) -> nn.Module:
    """Load a bitsandbytes-serialized checkpoint into the float skeleton ``model`` (CPU or meta device) and
    return it.

    ``directory_or_state_dict``: a transformers ``save_pretrained`` directory (``config.json`` +
    ``model.safetensors`` or shards) or a state dict (e.g. ``Linear4bit(...).state_dict()``);
    ``config``: its ``quantization_config`` (dict, ``BitsAndBytesConfig`` or the whole model config;
    default: the directory's ``config.json``; a state dict needs none).  Each ``nn.Linear`` with a packed
    ``quant_state`` becomes an ``nf4-<bs>[+dq]`` / ``fp4-<bs>[+dq]`` :class:`~fxquant.modules.QuantizedLinear`
    (blocksize and double quant from its quant_state, ``bnb_4bit_compute_dtype`` as ``compute_dtype``),
    each one with an ``SCB`` a ``bnb8-<llm_int8_threshold>`` layer (6.0 without a config); the stored
    codes and statistics are the packed buffers as they are.  Other tensors load in their stored dtype.
    Anything fxquant cannot hold exactly (a blocksize or nested blocksize bitsandbytes does not write, a
    quant_state that disagrees with the layer or the config, a quant_storage that is not a plain dtype, a
    missing, extra or mis-shaped tensor, an unreadable file) raises ``ValueError`` naming the tensor, before
    ``model`` changes.  ``fxquant.report(model)`` lists the layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_quantized(model)
    qc, tensors = source(directory_or_state_dict, config)
    settings = _settings(qc)
    layers, rows, used = _plan_layers(model, tensors, settings)
    return apply_plan(model, tensors, layers, rows, used, "bitsandbytes")


def _plan_layers(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                 settings: dict) -> tuple[list, list[Row], set[str]]:
    """Every ``nn.Linear`` of the skeleton: quantized (its packed weight from the checkpoint's tensors)
    or stored in float.  Returns ``(layers, report rows, tensor names used)``."""
    by_module: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, t in tensors.items():
        for mod, local in _splits(key):
            by_module[mod][local] = t
    used: set[str] = set()
    layers, rows = [], []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        n, k = m.weight.shape
        local = {name: t for name, t in by_module.get(path, {}).items()
                 if name in ("weight", "bias", "SCB", "weight_format") or name.startswith("weight.")}
        kind = layer_kind(local)
        row = dict(fqn=path, shape=(n, k), kind="nn.Linear", bytes_before=nbytes(m.weight), rel_error=None)
        if kind is None:
            rows.append(Row(**row, status="skipped", scheme=None, bytes_after=nbytes(m.weight),
                            reason="stored in float by the checkpoint"))
            continue
        _check_kind(path, kind, settings)
        if kind == "4bit":
            qw, scheme, names, state = import_4bit(path, local, n, k, compute_dtype=settings["compute_dtype"])
            _check_4bit_config(path, scheme, state, settings)
            rule = "quant_state"
        else:
            qw, scheme, names = import_8bit(path, local, n, k, threshold=settings["threshold"])
            rule = "SCB"
        used.update(f"{path}.{x}" for x in names)
        layers.append((path, m, qw, scheme))
        rows.append(Row(**row, status="quantized", scheme=scheme, bytes_after=qw.nbytes, reason="", rule=rule,
                        method="checkpoint"))
    return layers, rows, used


def _splits(key: str):
    """``(module path, local name)`` candidates of a state dict key: bitsandbytes' local names contain dots
    (``weight.quant_state.bitsandbytes__nf4``), so every split is offered and the module decides."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i]), ".".join(parts[i:])
    yield "", key


def _check_kind(path: str, kind: str, settings: dict) -> None:
    want = settings["kind"]
    if want is not None and want != kind:
        stored = "a packed quant_state (4-bit)" if kind == "4bit" else "an SCB (8-bit)"
        raise ValueError(f"layer {path!r}: the checkpoint stores {stored}, but its quantization_config says "
                         f"load_in_{want}")


def _check_4bit_config(path: str, scheme: str, state: dict, settings: dict) -> None:
    if settings["kind"] is None:
        return
    nested = "nested_offset" in state
    if state["quant_type"] != settings["quant_type"] or nested != settings["double_quant"]:
        raise ValueError(f"layer {path!r}: its quant_state is {state['quant_type']}"
                         f"{' with' if nested else ' without'} double quant ({scheme}), but the quantization_config "
                         f"says bnb_4bit_quant_type={settings['quant_type']!r}, "
                         f"bnb_4bit_use_double_quant={settings['double_quant']}")


# ---- save -------------------------------------------------------------------------------------------------
def _packed_layers(model: nn.Module):
    """``(path, scheme string, QuantizedWeight, tensor names owned)`` of every packed linear."""
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            if m.input_scale is not None:
                raise ValueError(f"layer {path!r} (scheme {m.scheme}): divides its input by an AWQ scale; "
                                 "bitsandbytes has no such tensor")
            yield path, m.scheme, m.packed(), m.tensor_names
        elif isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), PackedWeight):
            w = m._parameters["weight"]
            if w.transposed:
                raise ValueError(f"layer {path!r}: its packed weight is stored transposed ([in, out]); bitsandbytes "
                                 "stores [out, in] weights of Linear layers")
            yield path, "", w.packed, ("weight",)


def _dtype_name(model: nn.Module) -> str:
    """The quant_state ``dtype`` (what bitsandbytes dequantizes to): a Hugging Face config's dtype, else
    float32."""
    hf = getattr(model, "config", None)
    dt = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    name = str(dt).removeprefix("torch.") if dt is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def save_bnb(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model``'s ``nf4`` / ``fp4`` (``+dq``) and ``bnb8`` layers in bitsandbytes' serialized layout:
    ``model.safetensors`` (the keys ``Linear4bit`` / ``Linear8bitLt`` state dicts have) and ``config.json``
    (``model.config.to_dict()`` for a Hugging Face model, with a transformers ``quantization_config``).

    One kind per checkpoint (4-bit with one quant type and double-quant setting, or 8-bit with one
    threshold), as ``BitsAndBytesConfig`` can state only that; float ``nn.Linear`` layers are listed in
    ``llm_int8_skip_modules``.  Any other packed layer, or a mix, raises ``ValueError`` naming the layer
    before a file is written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = _dtype_name(model)
    tensors: dict[str, torch.Tensor] = {}
    packed_keys: set[str] = set()
    first: tuple[str, str, dict] | None = None
    for path, scheme, qw, names in _packed_layers(model):
        kind, out, info = export_layer(path, scheme, qw, dtype)
        if first is None:
            first = (path, kind, info)
        elif (kind, _uniform(info)) != (first[1], _uniform(first[2])):
            raise ValueError(f"layer {path!r} ({scheme or qw.op}): {_describe(kind, info)}, but layer {first[0]!r} is "
                             f"{_describe(first[1], first[2])}; a BitsAndBytesConfig states one of them")
        tensors.update({f"{path}.{k}": v for k, v in out.items()})
        packed_keys.update(f"{path}.{n}" for n in names)
    if first is None:
        raise ValueError("the model has no nf4 / fp4 / bnb8 layer: quantize it with fxquant.quantize_ first")
    for key, t in model.state_dict().items():
        if key not in packed_keys:
            tensors[key] = t
    skip = sorted(p for p, m in model.named_modules() if type(m) is not QuantizedLinear and isinstance(m, nn.Linear)
                  and not isinstance(m._parameters.get("weight"), PackedWeight))
    config = {}
    hf = getattr(model, "config", None)
    if hf is not None and callable(getattr(hf, "to_dict", None)):
        config = dict(hf.to_dict())
    config["quantization_config"] = bnb_config(first[1], first[2], skip)
    _files.write_checkpoint(directory, config, _files.unique_storage(tensors))


def _uniform(info: dict) -> tuple:
    return tuple(sorted(info.items(), key=lambda kv: kv[0]))


def _describe(kind: str, info: dict) -> str:
    if kind == "8bit":
        return f"8-bit with threshold {info['threshold']}"
    return (f"4-bit {info['quant_type']}{' with' if info['double_quant'] else ' without'} double quant"
            f"{'' if info['compute_dtype'] is None else ', compute dtype ' + str(info['compute_dtype'])}")


def bnb_config(kind: str, info: dict, skip: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` transformers' ``BitsAndBytesConfig.to_dict()`` would write."""
    four = kind == "4bit"
    cd = info.get("compute_dtype")
    return {"quant_method": QUANT_METHOD, "load_in_4bit": four, "load_in_8bit": not four, "_load_in_4bit": four,
            "_load_in_8bit": not four, "llm_int8_threshold": info.get("threshold", int8dq.DEFAULT_THRESHOLD),
            "llm_int8_skip_modules": skip or None, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": info.get("quant_type", "fp4"),
            "bnb_4bit_use_double_quant": info.get("double_quant", False), "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_compute_dtype": None if cd is None else str(cd).removeprefix("torch.")}
