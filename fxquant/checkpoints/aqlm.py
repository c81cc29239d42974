"""AQLM checkpoints (``quant_method: "aqlm"``: the aqlm library's ``QuantizedLinear`` layers, as its and
transformers' ``save_pretrained`` write them), read into a float skeleton packed and written back.

- :func:`load_aqlm`: every ``nn.Linear`` of the skeleton except those ``linear_weights_not_to_quantize`` lists
  (as transformers' ``replace_with_aqlm_linear`` converts them) becomes a
  :class:`~fxquant.modules.QuantizedLinear` of the ``aqlm`` format holding the stored tensors themselves (no
  float weight is made); every other tensor is loaded as stored.
- :func:`save_aqlm`: a model whose packed layers are all ``aqlm`` with one set of sizes -> the same layout
  (``config.json`` with the ``AqlmConfig`` fields; the float linears listed as ``<name>.weight``, the aqlm
  library's meaning, and as ``<name>``: transformers 5 matches the list against module names).

Per quantized linear ``<name>`` (``O = N / out_group_size``, ``G = K / in_group_size``, ``M = num_codebooks``,
``B = nbits_per_codebook``; :mod:`fxquant.formats.aqlm`):

| tensor | dtype, shape | fxquant buffer |
|---|---|---|
| ``<name>.codes`` | int8 (B <= 8) / int16 (B <= 16) ``[O, G, M]``, codes above ``2**(B-1) - 1`` stored minus ``2**B`` | ``codes`` |
| ``<name>.codebooks`` | fp16 / bf16 / fp32 (the model dtype) ``[M, 2**B, out_group_size, in_group_size]`` | ``codebooks`` |
| ``<name>.scales`` | the codebooks' dtype, ``[O, 1, 1, 1]`` | ``scales`` |
| ``<name>.bias`` | float ``[N]`` | the module's bias |

Everything is checked before the model changes (a missing or unknown tensor, a dtype or shape the config does
not imply, codes in the aqlm CPU kernel's transposed runtime order ``[G, O, M]``, a float ``weight`` for a layer
the config quantizes, a config field no ``AqlmConfig`` has): ``ValueError`` naming the tensor or field.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import torch
from torch import nn

from ..configs.aqlm import FIELDS as CONFIG_FIELDS
from ..configs.aqlm import NAME as CONFIG_NAME
from ..formats import aqlm as fmt
from ..inplace import check_not_quantized
from ..modules import PackedWeight, QuantizedLinear
from ..report import Row
from ..schemes import AQLM
from . import _files
from ._loading import apply_plan, source

__all__ = ["load_aqlm", "save_aqlm"]

NAMES = ("codes", "codebooks", "scales")


# ---- import -----------------------------------------------------------------------------------------------
def _parse(qc: Any) -> tuple[dict[str, int], set[str]]:
    """``quantization_config`` -> ``(sizes, names of the weights not to quantize)``."""
    where = "quantization_config"
    if hasattr(qc, "to_dict") and not isinstance(qc, Mapping):
        qc = qc.to_dict()
    if not isinstance(qc, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(qc).__name__}")
    method = qc.get("quant_method")
    method = getattr(method, "value", method)
    if method != "aqlm":
        raise ValueError(f"{where}.quant_method={method!r}; valid: 'aqlm'")
    unknown = sorted(set(qc) - set(CONFIG_FIELDS) - {"quant_method"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: no version of {CONFIG_NAME} has this field; its fields: "
                         f"{', '.join(CONFIG_FIELDS)}")
    sizes = {}
    for field, default, hi in (("num_codebooks", 1, None), ("nbits_per_codebook", 16, 16), ("in_group_size", 8, None),
                               ("out_group_size", 1, None)):
        v = qc.get(field)
        v = default if v is None else v
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi is not None and v > hi):
            raise ValueError(f"{where}.{field}={v!r} is not supported; valid: an integer >= 1"
                             + (f" and <= {hi}" if hi else ""))
        sizes[field] = v
    skip = qc.get("linear_weights_not_to_quantize") or []
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"{where}.linear_weights_not_to_quantize: expected a list of weight names, got {skip!r}")
    return sizes, set(skip)


def _expect(path: str, name: str, local: Mapping[str, torch.Tensor], dtypes: tuple, shape: tuple, meaning: str,
            transposed: tuple | None = None) -> torch.Tensor:
    key = f"{path}.{name}"
    if name not in local:
        raise ValueError(f"AQLM checkpoint: tensor {key!r}: missing (an AQLM layer stores codes, codebooks, scales)")
    t = local[name]
    if transposed is not None and tuple(t.shape) == transposed and transposed != shape:
        raise ValueError(f"AQLM checkpoint: tensor {key!r}: shape {tuple(t.shape)} is the aqlm CPU kernel's "
                         f"transposed runtime order [G, O, M]; checkpoints store [O, G, M] = {shape}")
    if t.dtype not in dtypes or tuple(t.shape) != shape:
        raise ValueError(f"AQLM checkpoint: tensor {key!r}: expected {' or '.join(map(str, dtypes))} of shape {shape} "
                         f"({meaning}), got {t.dtype} of shape {tuple(t.shape)}")
    return t


def import_layer(path: str, local: Mapping[str, torch.Tensor], sizes: dict[str, int], n: int, k: int):
    """One layer's stored tensors -> ``(QuantizedWeight, scheme string)``; ``ValueError`` naming the tensor."""
    extra = sorted(set(local) - set(NAMES) - {"bias"})
    if extra:
        what = ("a float weight: the config quantizes this layer (list it in linear_weights_not_to_quantize to keep "
                "it float)" if extra[0] == "weight" else "not a tensor of an AQLM layer")
        raise ValueError(f"AQLM checkpoint: tensor {path + '.' + extra[0]!r}: {what}; valid: codes, codebooks, "
                         "scales, bias")
    m, b, ig, og = sizes["num_codebooks"], sizes["nbits_per_codebook"], sizes["in_group_size"], sizes["out_group_size"]
    o, g = fmt.padded(n, k, og, ig)
    codes = _expect(path, "codes", local, (fmt.code_dtype(b),), (o, g, m),
                    f"{b}-bit codes, [out_features/out_group_size, in_features/in_group_size, num_codebooks]",
                    transposed=(g, o, m))
    cb = _expect(path, "codebooks", local, fmt.PARAM_DTYPES, (m, 1 << b, og, ig),
                 "[num_codebooks, 2**nbits_per_codebook, out_group_size, in_group_size]")
    sc = _expect(path, "scales", local, (cb.dtype,), (o, 1, 1, 1),
                 "the codebooks' dtype, [out_features/out_group_size, 1, 1, 1]")
    scheme = AQLM(num_codebooks=m, nbits_per_codebook=b, in_group_size=ig, out_group_size=og, param_dtype=cb.dtype)
    try:
        qw = scheme.packed(codes, cb, sc, n, k)
    except ValueError as e:
        raise ValueError(f"AQLM checkpoint: layer {path!r}: {e}") from None
    return qw, str(scheme)


def load_aqlm(directory_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module, *,
              config: Mapping | None = None) -> nn.Module:
    """Load an AQLM checkpoint into the float skeleton ``model`` (CPU or meta device) and return it (module
    docstring).  ``directory_or_state_dict``: a directory (``config.json`` + safetensors) or a state dict, whose
    quantization config is ``config`` or ``model.config.quantization_config``.  Raises ``ValueError`` naming the
    tensor or field, before ``model`` changes, for anything fxquant cannot hold exactly.
    ``fxquant.report(model)`` lists the layers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_quantized(model)
    qc, tensors = source(directory_or_state_dict, config, model)
    sizes, keep_float = _parse(qc)
    by_module = collections.defaultdict(dict)
    for key, t in tensors.items():
        mod, _, local = key.rpartition(".")
        by_module[mod][local] = t
    modules = dict(model.named_modules())
    for mod, local in by_module.items():
        if "codes" in local and not isinstance(modules.get(mod), nn.Linear):
            what = "no such module" if mod not in modules else f"a {type(modules[mod]).__name__}, not an nn.Linear"
            raise ValueError(f"AQLM checkpoint: tensor {mod + '.codes'!r}: the model has {what} at {mod!r} (fxquant "
                             "loads AQLM layers into nn.Linear modules)")
    layers, rows, used = [], [], set()
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        n, k = m.weight.shape
        row = dict(fqn=path, shape=(n, k), kind="nn.Linear", bytes_before=m.weight.numel() * m.weight.element_size(),
                   rel_error=None)
        if f"{path}.weight" in keep_float:
            if "codes" in by_module.get(path, {}):
                raise ValueError(f"AQLM checkpoint: tensor {path + '.codes'!r}: the config keeps {path + '.weight'!r} "
                                 "in float (linear_weights_not_to_quantize), but the layer is stored quantized")
            rows.append(Row(**row, status="skipped", scheme=None, bytes_after=row["bytes_before"],
                            reason="in linear_weights_not_to_quantize"))
            continue
        qw, scheme = import_layer(path, by_module.get(path, {}), sizes, n, k)
        used.update(f"{path}.{x}" for x in NAMES)
        layers.append((path, m, qw, scheme))
        rows.append(Row(**row, status="quantized", scheme=scheme, bytes_after=qw.nbytes, reason="",
                        rule="AQLM checkpoint", method="checkpoint"))
    if not layers:
        raise ValueError("AQLM checkpoint: the config keeps every nn.Linear of the model in float; nothing is "
                         "quantized")
    return apply_plan(model, tensors, layers, rows, used, "AQLM")


# ---- export -----------------------------------------------------------------------------------------------
def _packed_layers(model: nn.Module):
    """``(path, QuantizedWeight, owner)`` of every packed linear, ``ValueError`` for one AQLM cannot store."""
    for path, m in model.named_modules():
        qw = None
        if isinstance(m, QuantizedLinear):
            if m.input_scale is not None:
                raise ValueError(f"layer {path!r} (scheme {m.scheme}): divides its input by an AWQ scale; an AQLM "
                                 "checkpoint has no such tensor")
            qw = m.packed()
        elif isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), PackedWeight):
            w = m._parameters["weight"]
            if w.transposed:
                raise ValueError(f"layer {path!r}: its packed weight is stored transposed ([in, out]); AQLM stores "
                                 "[out, in] weights of Linear layers")
            qw = w.packed
        if qw is not None:
            if qw.op != "linear_aqlm":
                raise ValueError(f"layer {path!r}: op {qw.op} is not an AQLM layer; an AQLM checkpoint holds "
                                 "aqlm-<M>x<B>-g<in> layers only (quantize with an aqlm scheme, or save with another "
                                 "writer)")
            yield path, qw, m


def save_aqlm(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (packed ``aqlm`` layers, e.g. from ``fxquant.quantize_`` or :func:`load_aqlm`) as an AQLM
    checkpoint in ``directory``: ``model.safetensors`` and ``config.json`` (the model's Hugging Face config, if it
    has one, with ``quantization_config`` set).  Every packed layer must be ``aqlm`` with the same sizes (an
    ``AqlmConfig`` has one set), with ``out_features`` / ``in_features`` multiples of the groups (the aqlm
    library's layers have no partial groups); anything else raises ``ValueError`` naming the layer before any
    file is written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors, packed_keys, sizes, first = {}, set(), None, None
    for path, qw, owner in _packed_layers(model):
        a = qw.attrs
        mine = {f: a[f] for f in ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")}
        if sizes is None:
            sizes, first = mine, path
        elif mine != sizes:
            raise ValueError(f"layer {path!r}: AQLM sizes {mine} differ from layer {first!r}'s {sizes}; an AqlmConfig "
                             "has one set of sizes for every layer")
        if a["out_features"] % a["out_group_size"] or a["in_features"] % a["in_group_size"]:
            raise ValueError(f"layer {path!r}: weight [{a['out_features']}, {a['in_features']}] is not a whole number "
                             f"of {a['out_group_size']} x {a['in_group_size']} groups; the aqlm library's layers have "
                             "no partial groups")
        if "compute_dtype" in a:
            raise ValueError(f"layer {path!r}: compute_dtype={a['compute_dtype']} has no AqlmConfig form")
        tensors.update({f"{path}.{name}": qw.tensors[name] for name in NAMES})
        names = owner.tensor_names if isinstance(owner, QuantizedLinear) else ("weight",)
        packed_keys.update(f"{path}.{x}" for x in names)
    if sizes is None:
        raise ValueError("the model has no packed layer: quantize it with an aqlm scheme (fxquant.quantize_) first")
    for key, t in model.state_dict().items():
        if key not in packed_keys:
            tensors[key] = t
    floats = [p for p, m in model.named_modules() if type(m) is not QuantizedLinear and isinstance(m, nn.Linear)
              and not isinstance(m._parameters.get("weight"), PackedWeight)]
    floats = sorted(f"{p}.weight" for p in floats) + sorted(floats)  # weight names; module names for transformers 5
    config = {}
    hf = getattr(model, "config", None)
    if hf is not None and callable(getattr(hf, "to_dict", None)):
        config = dict(hf.to_dict())
    config["quantization_config"] = {"quant_method": "aqlm", **sizes, "linear_weights_not_to_quantize": floats}
    _files.write_checkpoint(directory, config, _files.unique_storage(tensors))
