"""VPTQ (transformers' ``VptqConfig``; the VPTQ library's ``quantization_config``).

| field | fxquant |
|---|---|
| ``config_for_layers`` {full module name: layer dict} | one rule per name (exact pattern), first |
| ``shared_layer_config`` {last name component, e.g. ``q_proj``: layer dict} | one rule per key, after them |
| (a linear neither names) | left in float (the VPTQ integration converts only the named layers) |
| ``modules_to_not_convert`` | ``Spec.skip`` (transformers' matching); absent: ``lm_head`` |
| ``enable_proxy_error`` | ``False`` only (a training-time option) |

Each layer dict (``VptqLayerConfig`` / ``VQuantLinear.init_args``) becomes a ``VPTQ`` scheme with the
``@vptq`` method (VPTQ is a calibrated method; use ``scheme.format`` for data-free k-means):

| layer field | ``VPTQ`` field |
|---|---|
| ``vector_lens`` ``[outlier, main]`` | ``outlier_vector_len``, ``vector_len`` (-1: no outlier codebook) |
| ``num_centroids`` ``[outlier, main]`` | ``num_outlier_centroids``, ``num_centroids`` |
| ``num_res_centroids`` ``[-1, main]`` | ``num_res_centroids`` (-1: none; outliers have no residual codebook in VPTQ) |
| ``outlier_size``, ``group_num``, ``group_size`` (-1: derived) | the same |
| ``enable_norm``, ``enable_perm`` (default ``True`` in ``VptqLayerConfig``) | the same |
| ``in_features`` / ``out_features`` | checked against ``outlier_size + group_num * group_size`` (a layer of another shape is refused at quantize time through ``group_size``) |
| ``is_indice_packed`` | ``True`` only (as transformers requires) |
| ``norm_dim`` | ``0`` only (per input column: the one VPTQ's inference layer runs) |
| ``indices_as_float``, ``bias``, ``enable_proxy_error`` (``False``) | notes / the module decides |
| ``vector_quant_dim`` | ``"out"`` only |
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..methods import VPTQ as VPTQMethod
from ..schemes import VPTQ
from ..spec import Pattern, Spec
from ._base import Fields, hf_key, hf_module_patterns, reader, writer

NAME = "VptqConfig"
FIELDS = ("enable_proxy_error", "config_for_layers", "shared_layer_config", "modules_to_not_convert")
LAYER_FIELDS = ("vector_lens", "num_centroids", "num_res_centroids", "group_num", "group_size", "outlier_size",
                "indices_as_float", "enable_norm", "enable_perm", "is_indice_packed", "in_features", "out_features",
                "bias", "norm_dim", "enable_proxy_error", "vector_quant_dim")
DEFAULT_SKIP = ["lm_head"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(f: Fields, field: str, default: list) -> tuple[int, int]:
    value = f.take(field, default, check=lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and
                   all(_is_int(e) for e in v), valid="a list of two integers [outlier, main] (-1: none)")
    return int(value[0]), int(value[1])


def layer_scheme(d: Mapping[str, Any], where: str, notes: list[str]) -> VPTQ:
    """One layer dict -> its scheme (with the ``@vptq`` method); ``ValueError`` naming ``where.<field>``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a dict of VptqLayerConfig fields, got {d!r}")
    f = Fields(where, d, LAYER_FIELDS)
    ov, v = _pair(f, "vector_lens", [-1, -1])
    oc, c = _pair(f, "num_centroids", [-1, -1])
    orc, rc = _pair(f, "num_res_centroids", [-1, -1])
    outliers = f.take("outlier_size", 0, check=lambda x: _is_int(x) and x >= 0, valid="an integer >= 0")
    groups = f.take("group_num", 1, check=lambda x: _is_int(x) and x >= 1, valid="an integer >= 1")
    gs = f.take("group_size", -1, check=lambda x: _is_int(x) and (x >= 1 or x == -1),
                valid="an integer >= 1, or -1 (derived from in_features)")
    norm = f.take("enable_norm", True, choices=(True, False))
    perm = f.take("enable_perm", True, choices=(True, False))
    f.take("is_indice_packed", True, choices=(True,), valid="True (VptqLayerConfig requires packed indices)")
    f.take("norm_dim", 0, choices=(0,), valid="0 (a scale and bias per input column: the only norm VPTQ's "
                                              "inference layer applies)")
    f.take("vector_quant_dim", "out", choices=("out",), valid="'out' (VQuantLinear implements only that)")
    f.take("enable_proxy_error", False, choices=(False,), valid="False (proxy error is for training)")
    k = f.take("in_features", -1, check=lambda x: _is_int(x) and (x >= 1 or x == -1), valid="an integer >= 1 or -1")
    f.take("out_features", -1, check=lambda x: _is_int(x) and (x >= 1 or x == -1), valid="an integer >= 1 or -1")
    f.inert("indices_as_float", "bias", defaults={"indices_as_float": False})
    for unknown in sorted(set(f.d) - f.known):
        raise f.error(unknown, f"no version of VptqLayerConfig has this field; its fields: {', '.join(LAYER_FIELDS)}")
    if v < 1:
        raise f.error("vector_lens", f"{[ov, v]}: the main vector length must be >= 1")
    if orc != -1:
        raise f.error("num_res_centroids", f"{[orc, rc]}: VPTQ has no residual codebook for outliers; valid: [-1, n]")
    has_outlier_book = ov > 1 and oc > 0  # VQuantLinear's enable_outlier
    if outliers and not has_outlier_book:
        raise f.error("outlier_size", f"{outliers} outlier columns but no outlier codebook (vector_lens[0]={ov}, "
                      f"num_centroids[0]={oc}); valid: 0, or both set (vector_lens[0] > 1)")
    if has_outlier_book and not outliers:
        notes.append(f"{where}: an outlier codebook with outlier_size=0 has no columns; not used")
    if k != -1 and gs != -1 and outliers + groups * gs != k:
        raise f.error("group_size", f"outlier_size {outliers} + group_num {groups} x group_size {gs} != in_features {k}")
    if k != -1 and gs == -1:
        gs = (k - outliers) // groups if (k - outliers) % groups == 0 else gs
    try:
        scheme = VPTQ(vector_len=v, num_centroids=c, num_res_centroids=max(rc, 0), outlier_size=outliers,
                      outlier_vector_len=ov if outliers else None, num_outlier_centroids=oc if outliers else None,
                      group_num=groups, group_size=None if gs == -1 else gs, enable_norm=norm, enable_perm=perm)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    notes.extend(n.replace(f"{where}: ", f"{where}.", 1) for n in f.notes)
    return dataclasses.replace(scheme, method=VPTQMethod())


def _layer_dicts(f: Fields, field: str) -> dict:
    value = f.take(field, {}, check=lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and k for k in v),
                   valid="a dict {module name: layer config dict}")
    return dict(value)


@reader("vptq", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    f.take("enable_proxy_error", False, choices=(False,), valid="False (transformers requires it until training)")
    rules = []
    for field in ("config_for_layers", "shared_layer_config"):
        for name, d in _layer_dicts(f, field).items():
            rules.append((name, layer_scheme(d, f"{NAME}.{field}[{name!r}]", f.notes)))
    if not rules:
        raise f.error("config_for_layers", "no layer is configured (config_for_layers and shared_layer_config are "
                      "empty): nothing to quantize")
    skip = f.d.get("modules_to_not_convert")
    f.used.add("modules_to_not_convert")
    patterns = hf_module_patterns(DEFAULT_SKIP if skip is None else skip, f"{NAME}.modules_to_not_convert")
    return f.finish(Spec(default=None, skip=patterns, rules=rules))


# -- writing -----------------------------------------------------------------------------------------
def layer_dict(scheme: VPTQ, in_features: int = -1, out_features: int = -1) -> dict:
    """A scheme's ``VptqLayerConfig`` dict (``in_features`` / ``out_features`` when known)."""
    fmt = scheme.format
    if not isinstance(fmt, VPTQ) or fmt.compute_dtype is not None:
        raise ValueError(f"Spec.to_config('vptq'): {fmt} has no VptqConfig form; valid: vptq-... schemes "
                         "without compute_dtype")
    o = fmt.outlier_size
    gs = fmt.group_size
    if gs is None and in_features != -1:
        gs = (in_features - o) // fmt.group_num
    return {"vector_lens": [fmt.outlier_vector_len if o else -1, fmt.vector_len],
            "num_centroids": [fmt.num_outlier_centroids if o else -1, fmt.num_centroids],
            "num_res_centroids": [-1, fmt.num_res_centroids or -1], "outlier_size": o, "group_num": fmt.group_num,
            "group_size": -1 if gs is None else gs, "enable_norm": fmt.enable_norm, "enable_perm": fmt.enable_perm,
            "indices_as_float": False, "is_indice_packed": True, "in_features": in_features,
            "out_features": out_features}


@writer("vptq")
def write(spec: Spec) -> dict:
    if spec.default is not None:
        raise ValueError("Spec.to_config('vptq'): a VptqConfig names its layers; the spec has a default scheme "
                         f"({spec.default}); valid: rules with exact module names and no default")
    layers, shared = {}, {}
    for r in spec.rules:
        text = r.pattern.text
        if r.pattern.kind != "exact" or r.scheme is None:
            raise ValueError(f"Spec.to_config('vptq'): rule {text!r} -> {r.scheme} has no VptqConfig form; valid: "
                             "exact module names (with dots: config_for_layers; one name: shared_layer_config) "
                             "and vptq schemes")
        (layers if "." in text else shared)[text] = layer_dict(r.scheme)
    skip = []
    for s in spec.skip:
        key = hf_key(s)
        if key is None and Pattern(s).kind != "exact":
            raise ValueError(f"Spec.to_config('vptq'): skip pattern {s!r} has no VptqConfig form; valid: module names")
        skip.append(s if key is None else key)
    return {"quant_method": "vptq", "enable_proxy_error": False, "config_for_layers": layers,
            "shared_layer_config": shared, "modules_to_not_convert": skip}
