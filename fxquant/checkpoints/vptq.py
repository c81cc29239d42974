"""VPTQ checkpoints (``quant_method: "vptq"``, the VPTQ library's packed ``VQuantLinear`` layers), read into a
float skeleton packed and written back.

- :func:`load_vptq`: each linear the config names (``config_for_layers`` by full name, else
  ``shared_layer_config`` by its last name component, unless ``modules_to_not_convert`` skips it) becomes a
  :class:`~fxquant.modules.QuantizedLinear` of the ``vptq`` format holding the stored tensors themselves
  (no float weight is made); every other tensor is loaded as stored.
- :func:`save_vptq`: a model whose packed layers are all ``vptq`` -> the same layout (``config.json`` with a
  ``config_for_layers`` entry per layer, ``modules_to_not_convert`` listing the float linears).

Per quantized linear ``<name>`` (:mod:`fxquant.formats.vptq` for the layout; absent parts have no tensor):

| tensor | dtype, shape | fxquant buffer |
|---|---|---|
| ``<name>.indices`` | int32 ``[G, ceil(N/v), ceil(gs*(ib+rb)/32)]`` | ``indices`` |
| ``<name>.centroids.weight`` | float ``[G, C*v]`` | ``centroids`` |
| ``<name>.res_centroids.weight`` | float ``[G, Cr*v]`` | ``res_centroids`` |
| ``<name>.outlier_centroids.weight`` | float ``[1, Co*vo]`` | ``outlier_centroids`` |
| ``<name>.outlier_indices`` | int16 (fp16 bits with ``indices_as_float``) ``[1, ceil(N/vo), o]`` | ``outlier_indices`` (int16 bits) |
| ``<name>.perm`` | int16 ``[K]`` (uint16 values) | ``perm`` |
| ``<name>.weight_scale``, ``<name>.weight_bias`` | float ``[K]`` | the same |
| ``<name>.bias`` | float ``[N]`` | the module's bias |

Everything is checked before the model changes (an unknown or missing tensor, a dtype or shape the config
does not imply, a ``perm`` that is not a permutation, an outlier index past its codebook, unpacked
``res_indices``, a field the reader refuses): ``ValueError`` naming the tensor or field.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..configs.vptq import NAME as CONFIG_NAME
from ..configs.vptq import layer_dict, layer_scheme
from ..configs._base import hf_module_patterns
from ..formats import vptq as fmt
from ..inplace import check_not_quantized
from ..modules import PackedWeight, QuantizedLinear
from ..report import Row
from ..schemes import VPTQ
from ..spec import Pattern
from . import _files
from ._loading import apply_plan, source

__all__ = ["load_vptq", "save_vptq"]

#: checkpoint tensor name (after ``<layer>.``) -> the op's buffer name
NAMES = {"indices": "indices", "centroids.weight": "centroids", "res_centroids.weight": "res_centroids",
         "outlier_centroids.weight": "outlier_centroids", "outlier_indices": "outlier_indices", "perm": "perm",
         "weight_scale": "weight_scale", "weight_bias": "weight_bias"}
BUFFERS = {v: k for k, v in NAMES.items()}


# ---- import -----------------------------------------------------------------------------------------------
def _parse(qc: Any) -> tuple[dict, dict, list[str], list[str]]:
    """``quantization_config`` -> ``(config_for_layers, shared_layer_config, skip patterns, notes)``."""
    where = "quantization_config"
    if hasattr(qc, "to_dict") and not isinstance(qc, Mapping):
        qc = qc.to_dict()
    if not isinstance(qc, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(qc).__name__}")
    method = qc.get("quant_method")
    method = getattr(method, "value", method)
    if method != "vptq":
        raise ValueError(f"{where}.quant_method={method!r}; valid: 'vptq'")
    unknown = sorted(set(qc) - {"quant_method", "enable_proxy_error", "config_for_layers", "shared_layer_config",
                                "modules_to_not_convert"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: no version of {CONFIG_NAME} has this field")
    if qc.get("enable_proxy_error"):
        raise ValueError(f"{where}.enable_proxy_error={qc['enable_proxy_error']!r}; valid: False")
    dicts = []
    for field in ("config_for_layers", "shared_layer_config"):
        d = qc.get(field) or {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}.{field}: expected a dict {{module name: layer config}}, got {d!r}")
        dicts.append(dict(d))
    skip = qc.get("modules_to_not_convert")
    return dicts[0], dicts[1], hf_module_patterns(["lm_head"] if skip is None else skip,
                                                  f"{where}.modules_to_not_convert"), []


def _layer_config(path: str, layers: dict, shared: dict) -> tuple[str, Any] | None:
    """``(where, layer dict)`` the config gives the linear ``path`` (VPTQ's lookup), else None."""
    if path in layers:
        return f"config_for_layers[{path!r}]", layers[path]
    last = path.rpartition(".")[2]
    if last in shared:
        return f"shared_layer_config[{last!r}]", shared[last]
    return None


def _uint16(t: torch.Tensor, where: str, limit: int) -> torch.Tensor:
    """Stored uint16 values (int16 bits, fp16 bits with ``indices_as_float``, or wider ints) -> int16 bits,
    each below ``limit``."""
    if t.dtype == torch.float16:
        t = t.view(torch.int16)
    if t.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"{where}: dtype {t.dtype} is not supported; valid: int16 (uint16 values), float16 bits, "
                         "int32, int64")
    values = t.to(torch.int64) & 0xFFFF if t.dtype == torch.int16 else t.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
        raise ValueError(f"{where}: values must be in 0 .. {limit - 1}, got {int(values.min())} .. {int(values.max())}")
    return fmt.to_uint16_bits(values)


def _import_layer(path: str, where: str, d: Any, local: dict[str, torch.Tensor], n: int, k: int, notes: list[str]):
    """One layer's tensors -> ``(QuantizedWeight, scheme string, tensor names used)``."""
    scheme = layer_scheme(d, f"{CONFIG_NAME}.{where}", notes).format
    if "centroids.weight" not in local:
        raise ValueError(f"tensor {path + '.centroids.weight'!r}: missing (layer {path!r}, {where})")
    dtype = local["centroids.weight"].dtype
    if dtype not in fmt.FLOAT_DTYPES:
        raise ValueError(f"tensor {path + '.centroids.weight'!r}: dtype {dtype} is not supported; valid: bfloat16, "
                         "float16, float32")
    scheme = dataclasses.replace(scheme, codebook_dtype=dtype)
    if scheme.group_size is not None and scheme.outlier_size + scheme.group_num * scheme.group_size == k:
        scheme = dataclasses.replace(scheme, group_size=None)  # the layer's shape says it: a shorter scheme string
    try:
        lay = scheme.layout(n, k)
    except ValueError as e:
        raise ValueError(f"layer {path!r} ({where}, weight [{n}, {k}]): {e}") from None
    extra = dict(local)
    extra.pop("bias", None)
    if "res_indices" in extra:
        raise ValueError(f"tensor {path + '.res_indices'!r}: unpacked residual indices (is_indice_packed=False) are "
                         "not supported; VPTQ's packed checkpoints merge them into 'indices'")
    book = ("outlier_centroids.weight", "outlier_indices")
    if not lay.outlier_size and any(b in extra for b in book):
        for b in book:  # an outlier codebook of zero columns: nothing to store
            extra.pop(b, None)
        notes.append(f"layer {path!r}: its outlier codebook has no columns (outlier_size=0); not loaded")
    shapes = lay.shapes()
    tensors = {}
    for buf, shape in shapes.items():
        key = BUFFERS[buf]
        t = extra.pop(key, None)
        if shape == (0,):
            if t is not None:
                raise ValueError(f"tensor {path + '.' + key!r}: not a tensor of this layer's config ({where})")
            continue
        if t is None:
            raise ValueError(f"tensor {path + '.' + key!r}: missing (layer {path!r}, {where})")
        if buf == "outlier_indices":
            t = _uint16(t, f"tensor {path + '.' + key!r}", lay.num_outlier_centroids)
        elif buf == "perm":
            t = _uint16(t, f"tensor {path + '.' + key!r}", k)
            if t.shape == (k,) and not torch.equal(torch.sort(fmt.from_uint16_bits(t)).values, torch.arange(k)):
                raise ValueError(f"tensor {path + '.perm'!r}: not a permutation of 0 .. {k - 1}")
        tensors[buf] = t
    if extra:
        name = sorted(extra)[0]
        raise ValueError(f"tensor {path + '.' + name!r}: not a tensor of a VPTQ layer ({where}); valid: "
                         f"{', '.join(NAMES)}, bias")
    try:
        qw = scheme.packed(tensors, n, k)
    except ValueError as e:
        raise ValueError(f"layer {path!r} ({where}): {e}") from None
    return qw, str(scheme), {f"{path}.{x}" for x in local if x != "bias"}


def load_vptq(directory_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module, *,
              config: Mapping | None = None) -> nn.Module:
    """Load a VPTQ checkpoint into the float skeleton ``model`` (CPU or meta device) and return it (module
    docstring).  ``directory_or_state_dict``: a directory (``config.json`` + safetensors) or a state dict,
    whose quantization config is ``config`` or ``model.config.quantization_config``.  Raises ``ValueError``
    naming the tensor or field, before ``model`` changes, for anything fxquant cannot hold exactly.
    ``fxquant.report(model)`` lists the layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_quantized(model)
    qc, tensors = source(directory_or_state_dict, config, model)
    layers_cfg, shared_cfg, skip, notes = _parse(qc)
    by_module = collections.defaultdict(dict)
    for key, t in tensors.items():
        for suffix in NAMES:  # names with a dot ("centroids.weight") first split at the layer
            if key.endswith("." + suffix):
                by_module[key[: -len(suffix) - 1]][suffix] = t
                break
        else:
            mod, _, local = key.rpartition(".")
            by_module[mod][local] = t
    layers, rows, used = [], [], set()
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        n, k = m.weight.shape
        row = dict(fqn=path, shape=(n, k), kind="nn.Linear", bytes_before=m.weight.numel() * m.weight.element_size(),
                   rel_error=None)
        skipped = any(Pattern(p).matches(path) for p in skip)
        found = None if skipped else _layer_config(path, layers_cfg, shared_cfg)
        if found is None:
            rows.append(Row(**row, status="skipped", scheme=None, bytes_after=row["bytes_before"],
                            reason="in modules_to_not_convert" if skipped else "named by no layer config"))
            continue
        where, d = found
        qw, scheme, names = _import_layer(path, where, d, by_module.get(path, {}), n, k, notes)
        used |= names
        layers.append((path, m, qw, scheme))
        rows.append(Row(**row, status="quantized", scheme=scheme, bytes_after=qw.nbytes, reason="", rule=where,
                        method="checkpoint"))
    if not layers:
        raise ValueError("quantization_config: no linear of the model is named by config_for_layers or "
                         "shared_layer_config (or all are in modules_to_not_convert)")
    return apply_plan(model, tensors, layers, rows, used, "VPTQ")


# ---- export -----------------------------------------------------------------------------------------------
def save_vptq(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (its packed layers all ``vptq``) as a VPTQ checkpoint in ``directory``: ``model.safetensors``
    (float tensors as they are, the VPTQ tensors of each layer) and ``config.json`` (the model's Hugging Face
    config when it has one, ``quantization_config`` set).  Any other packed layer raises ``ValueError`` naming
    it, before a file is written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers, tensors, packed = {}, {}, set()
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            if m.op_name != "linear_vptq" or m.input_scale is not None:
                raise ValueError(f"layer {path!r} (scheme {m.scheme or m.op_name}): not a VPTQ layer; a VPTQ "
                                 "checkpoint holds vptq layers and float ones only")
            qw = m.packed()
            scheme = VPTQ.parse(m.scheme.partition("@")[0]) if m.scheme else None
            if scheme is None:
                raise ValueError(f"layer {path!r}: scheme {m.scheme!r} is not a vptq scheme string")
            layers[path] = layer_dict(scheme, qw.in_features, qw.out_features)
            for buf, t in qw.tensors.items():
                if t.numel():
                    tensors[f"{path}.{BUFFERS[buf]}"] = t
            packed.update(f"{path}.{n}" for n in m.tensor_names)
        elif isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), PackedWeight):
            raise ValueError(f"layer {path!r}: a packed weight inside an nn.Linear subclass; a VPTQ checkpoint "
                             "holds VQuantLinear layers (quantize a plain nn.Linear)")
    if not layers:
        raise ValueError("the model has no vptq layer: quantize it with a vptq scheme first")
    for key, t in model.state_dict().items():
        if key not in packed:
            tensors[key] = t
    floats = [p for p, m in model.named_modules() if type(m) is not QuantizedLinear and isinstance(m, nn.Linear)]
    config = {}
    hf = getattr(model, "config", None)
    if hf is not None and callable(getattr(hf, "to_dict", None)):
        config = dict(hf.to_dict())
    config["quantization_config"] = {"quant_method": "vptq", "enable_proxy_error": False, "config_for_layers": layers,
                                     "shared_layer_config": {}, "modules_to_not_convert": floats}
    _files.write_checkpoint(directory, config, _files.unique_storage(tensors))
