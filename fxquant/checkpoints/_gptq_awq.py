"""What the GPTQ and AWQ checkpoint modules share: a packed layer as integer codes / scales / zero points
(the writers' input), the checks of a stored tensor, the config and tensors of a checkpoint, and loading
planned layers into a float or meta skeleton (every check before the model changes).

Both layouts store per quantized ``nn.Linear`` ``<path>``: ``qweight`` int32, ``qzeros`` int32 (integer
zero points), ``scales`` ``[G, N]`` (fp16) and an optional ``bias``; ``W[n, k] = (q - z) * s`` with
the codes and zero points packed along different dims (GPTQ along K, AWQ along N in its interleaved
order).  fxquant holds such a layer as ``affine<b>-g<g>[-sym]-fp16`` (:mod:`fxquant.formats.affine`), or,
for a GPTQ act-order ``g_idx``, as the same weight with permuted input columns
(:mod:`fxquant.ops.affine_perm`).
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..formats import affine as affine_fmt
from ..formats import intx as intx_fmt
from ..inplace import check_not_quantized
from ..modules import PackedWeight, QuantizedLinear
from ..report import Row
from ..schemes import QuantizedWeight
from . import _files
from ._loading import apply_plan, nbytes

#: AutoGPTQ's separate quantization config file (older checkpoints keep it beside config.json)
QUANTIZE_CONFIG = "quantize_config.json"


# ---- a packed layer as integers (what the writers pack) ---------------------------------------------------
@dataclass
class LayerCodes:
    """One packed linear in input-column order: ``codes`` uint8 ``[N, K]``, ``scale`` ``[N, G]`` (its
    stored dtype), ``zero`` uint8 ``[N, G]`` (``2**(bits-1)`` everywhere when ``symmetric``), the
    group size (``None``: one group per row), ``perm`` int32 ``[K]`` for a permuted (act-order) layer;
    ``W[n, k] = (codes[n, k] - zero[n, g(k)]) * scale[n, g(k)]``, ``g(k) = invperm[k] // group_size``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int | None
    symmetric: bool
    perm: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def g_idx(self) -> torch.Tensor:
        """int32 ``[K]``: the group of every input column (GPTQ's ``g_idx``)."""
        k = self.codes.shape[1]
        g = k if self.group_size is None else self.group_size
        stored_group = torch.arange(k, dtype=torch.int32) // max(g, 1)
        if self.perm is None:
            return stored_group
        return torch.empty_like(stored_group).index_copy_(0, self.perm.long(), stored_group)


EXPORTABLE = ("affine<b>-g<g>[-sym] / affine<b>-ch[-sym] (fp16 scales, or bf16 / fp32 ones that are fp16 numbers), "
              "layers loaded from GPTQ act-order checkpoints, int<b>wo-<g>-sym / int<b>wo-ch-sym and int8wo")


def layer_codes(path: str, scheme: str, qw: QuantizedWeight, layout: str) -> LayerCodes:
    """A packed layer -> :class:`LayerCodes` (never through a float weight); ``ValueError`` naming the
    layer and its scheme when the layer has no integer-zero-point form."""
    t, a, n, k = qw.tensors, qw.attrs, qw.out_features, qw.in_features

    def refuse(why: str):
        raise ValueError(f"{layout} checkpoint: layer {path!r} (scheme {scheme or qw.op}): {why}; {layout} holds "
                         f"exactly: {EXPORTABLE}")

    if qw.op in ("linear_affine", "linear_affine_perm"):
        bits, sym = a["bits"], a["symmetric"]
        codes = affine_fmt.unpack_rows(t["qweight"], bits, k)
        scale, zero, g = t["scale"], t["zero_point"], a["group_size"]
        perm = t.get("perm")
        if perm is not None:  # stored column i is input column perm[i]
            codes = torch.empty_like(codes).index_copy_(1, perm.long(), codes)
    elif qw.op == "linear_intx":
        bits, sym, g = a["bits"], a["symmetric"], a["group_size"]
        if a["axis"] != 1:
            refuse("groups along axis 0 (one input column across rows) have no GPTQ / AWQ form")
        if not sym:
            refuse("asymmetric intx stores a bf16 offset per group, not an integer zero point (quantize with "
                   "affine<b>-g<g> instead)")
        kp = intx_fmt.stored_in_features(k, g, 1)
        codes = intx_fmt.codes_from_storage(t["codes_lo"], t["codes_hi"], bits, a["block_n"], n, kp)[:, :k]
        scale, zero, perm = t["scale"].t().contiguous(), None, None
    elif qw.op == "linear_int8wo":
        codes = (t["qweight"].to(torch.int16) + 128).to(torch.uint8)
        scale, zero, perm, bits, sym, g = t["scale"][:, None], None, None, 8, True, k
    else:
        hint = " (int4wo stores float zero points: use affine4-g<g>)" if qw.op == "linear_int4wo" else ""
        refuse(f"op {qw.op} has no integer zero point form{hint}")
    groups = scale.shape[1]
    if zero is None or zero.numel() == 0:
        zero = torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8)
    return LayerCodes(codes, scale, zero.to(torch.uint8), bits, None if groups <= 1 else g, sym, perm)


def fp16_scales(path: str, scale: torch.Tensor, layout: str) -> torch.Tensor:
    """``scale`` as fp16 (the dtype GPTQ / AWQ kernels read) when every value is an fp16 number; otherwise a
    ``ValueError`` naming the layer (bf16 scales are fp16 numbers in fp16's normal range)."""
    half = scale.to(torch.float16)
    if scale.dtype != torch.float16 and not torch.equal(half.to(scale.dtype), scale):
        bad = (half.to(scale.dtype) != scale).nonzero()[0].tolist()
        raise ValueError(f"{layout} checkpoint: layer {path!r}: scale {scale[tuple(bad)].item()!r} ({scale.dtype}, "
                         f"index {bad}) is not an fp16 number and {layout} stores fp16 scales; quantize with an "
                         "fp16 scale dtype (e.g. affine4-g128-fp16)")
    return half.contiguous()


# ---- writing ----------------------------------------------------------------------------------------------
def packed_layers(model: nn.Module, layout: str):
    """``(path, scheme string, QuantizedWeight, owner)`` of every packed ``nn.Linear``; ``ValueError`` for a
    packed weight this layout cannot name (outside an ``nn.Linear``'s ``weight``, stored transposed, with
    an unfolded AWQ input scale)."""
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            if m.input_scale is not None:
                raise ValueError(f"{layout} checkpoint: layer {path!r} (scheme {m.scheme}): divides its input by an "
                                 f"AWQ scale that could not be folded into a preceding weight; {layout} has no such "
                                 "tensor")
            yield path, m.scheme, m.packed(), m
        elif isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), PackedWeight):
            w = m._parameters["weight"]
            if w.transposed:
                raise ValueError(f"{layout} checkpoint: layer {path!r}: its packed weight is stored transposed "
                                 f"([in, out]); {layout} stores the weights of Linear layers")
            yield path, "", w.packed, m
    for mpath, m in model.named_modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if isinstance(t, PackedWeight) and not (isinstance(m, nn.Linear) and name == "weight"):
                raise ValueError(f"{layout} checkpoint: tensor {(mpath + '.' if mpath else '') + name!r}: a packed "
                                 f"weight outside an nn.Linear's 'weight'; {layout} quantizes Linear layers only")


def float_linears(model: nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` layers left in float (what readers must not convert)."""
    return sorted(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not QuantizedLinear
                  and not isinstance(m._parameters.get("weight"), PackedWeight))


def write(model: nn.Module, directory: str | os.PathLike, layers: dict[str, dict[str, torch.Tensor]],
          owners: dict[str, nn.Module], quantization_config: dict[str, Any]) -> None:
    """``model.safetensors`` (every float tensor of the state dict, then each packed layer's ``layers[path]``
    tensors instead of its packed buffers) and ``config.json`` (``model.config.to_dict()`` when the model
    has a Hugging Face config, ``quantization_config`` set), written all at once."""
    tensors: dict[str, torch.Tensor] = {}
    packed_keys = set()
    for path, owner in owners.items():
        names = owner.tensor_names if isinstance(owner, QuantizedLinear) else ("weight",)
        packed_keys.update(f"{path}.{n}" for n in names)
    for key, t in model.state_dict().items():
        if key not in packed_keys:
            tensors[key] = t
    for path, local in layers.items():
        tensors.update({f"{path}.{k}": v for k, v in local.items()})
    config = {}
    hf = getattr(model, "config", None)
    if hf is not None and callable(getattr(hf, "to_dict", None)):
        config = dict(hf.to_dict())
    config["quantization_config"] = quantization_config
    _files.write_checkpoint(directory, config, _files.unique_storage(tensors))


# ---- reading ----------------------------------------------------------------------------------------------
def read_source(directory_or_state_dict, config, model: nn.Module,
                layout: str) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """``(quantization_config dict, tensors)`` of a checkpoint directory (its ``config.json``'s
    ``quantization_config``, else AutoGPTQ's ``quantize_config.json``; weights in ``model.safetensors``, its
    shards, or the ``<model_file_base_name>.safetensors`` AutoGPTQ names) or of a state dict (its config
    is ``config`` or ``model.config.quantization_config``)."""
    if isinstance(directory_or_state_dict, (str, os.PathLike)):
        d = os.fspath(directory_or_state_dict)
        if config is None:
            qc_path = os.path.join(d, QUANTIZE_CONFIG)
            cfg = _files.read_config(d) if os.path.isfile(os.path.join(d, _files.CONFIG)) else {}
            config = cfg.get("quantization_config")
            if config is None and os.path.isfile(qc_path):
                config = _read_json(qc_path)
            if config is None:
                raise ValueError(f"{os.path.join(d, _files.CONFIG)}: no 'quantization_config' (and no "
                                 f"{QUANTIZE_CONFIG}); pass config=")
        return _as_dict(config, layout), _read_weights(d, _as_dict(config, layout))
    if not isinstance(directory_or_state_dict, Mapping):
        raise TypeError("expected a checkpoint directory or a state dict (name -> tensor), got "
                        f"{type(directory_or_state_dict).__name__}")
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        raise ValueError(f"a {layout} state dict needs its quantization config: pass config= (the "
                         "'quantization_config' dict of its config.json)")
    return _as_dict(config, layout), directory_or_state_dict


def _as_dict(config, layout: str) -> dict:
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if isinstance(config, Mapping) and "quantization_config" in config and "quant_method" not in config:
        config = config["quantization_config"]
    if not isinstance(config, Mapping):
        raise ValueError(f"{layout} quantization_config: expected a dict, got {type(config).__name__}")
    return dict(config)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def _read_weights(directory: str, qc: Mapping) -> dict[str, torch.Tensor]:
    base = qc.get("model_file_base_name")
    named = os.path.join(directory, f"{base}.safetensors") if isinstance(base, str) and base else None
    if named is None or os.path.isfile(os.path.join(directory, _files.WEIGHTS)) or not os.path.isfile(named):
        return _files.read_tensors(directory)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(named, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{named}: not a readable safetensors file ({e})") from None


def expect(tensors: Mapping[str, torch.Tensor], path: str, name: str, dtypes: tuple, shape: tuple, layout: str,
           meaning: str) -> torch.Tensor:
    """``tensors[name]`` of one of ``dtypes`` and exactly ``shape``, else ``ValueError`` naming the tensor
    ``<path>.<name>``, what it should be and what it is."""
    key = f"{path}.{name}"
    if name not in tensors:
        raise ValueError(f"{layout} checkpoint: tensor {key!r}: missing (a {layout} layer stores {meaning})")
    t = tensors[name]
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{layout} checkpoint: tensor {key!r}: expected {' or '.join(map(str, dtypes))} of shape "
                         f"{tuple(shape)} ({meaning}), got {t.dtype} of shape {tuple(t.shape)}")
    return t


ImportLayer = Callable[[str, Mapping[str, torch.Tensor], int, int], tuple[QuantizedWeight, str]]


def load(model: nn.Module, tensors: Mapping[str, torch.Tensor], import_layer: ImportLayer, names: set[str],
         layout: str, notes: list[str]) -> nn.Module:
    """Every ``nn.Linear`` of the skeleton whose ``<path>.qweight`` is in ``tensors`` becomes packed
    (``import_layer(path, local tensors, N, K) -> (packed weight, scheme)``; ``names``: the tensors a
    layer may hold), every other tensor is loaded as stored.  Everything is checked (missing, extra,
    mis-shaped tensors, a ``qweight`` of a module that is not an ``nn.Linear``) before the model changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_quantized(model)
    by_module = collections.defaultdict(dict)
    for key, t in tensors.items():
        mod, _, local = key.rpartition(".")
        by_module[mod][local] = t
    modules = dict(model.named_modules())
    for mod, local in by_module.items():
        if "qweight" in local and not isinstance(modules.get(mod), nn.Linear):
            what = "no such module" if mod not in modules else f"a {type(modules[mod]).__name__}, not an nn.Linear"
            raise ValueError(f"{layout} checkpoint: tensor {mod + '.qweight'!r}: the model has {what} at {mod!r} "
                             f"(fxquant loads {layout} layers into nn.Linear modules)")
    layers, rows, used = [], [], set()
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        n, k = m.weight.shape
        local = by_module.get(path, {})
        row = dict(fqn=path, shape=(n, k), kind="nn.Linear", bytes_before=nbytes(m.weight), rel_error=None)
        if "qweight" not in local:
            rows.append(Row(**row, status="skipped", scheme=None, bytes_after=nbytes(m.weight),
                            reason="stored in float by the checkpoint"))
            continue
        extra = sorted(set(local) - names - {"bias"})
        if extra:
            raise ValueError(f"{layout} checkpoint: tensor {path + '.' + extra[0]!r}: not a tensor of the {layout} "
                             f"layout (a quantized layer holds {', '.join(sorted(names))} and bias)")
        qw, scheme = import_layer(path, local, n, k)
        used.update(f"{path}.{x}" for x in local if x != "bias")
        layers.append((path, m, qw, scheme))
        rows.append(Row(**row, status="quantized", scheme=scheme, bytes_after=qw.nbytes, reason="",
                        rule=f"{layout} checkpoint", method="checkpoint"))
    if not layers:
        raise ValueError(f"{layout} checkpoint: no tensor '<layer>.qweight' of any nn.Linear of the model; nothing "
                         "is quantized (is this the right checkpoint and model?)")
    return apply_plan(model, tensors, layers, rows, used, layout, notes)
