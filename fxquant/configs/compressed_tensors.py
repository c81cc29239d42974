"""compressed-tensors (its ``QuantizationConfig``; transformers' ``CompressedTensorsConfig``; llm-compressor).

| field | fxquant |
|---|---|
| ``config_groups`` (a ``QuantizationScheme`` per group, or a preset name -> targets) | one scheme per group, below |
| ``targets``: ``Linear`` (class name) | ``Spec.default`` |
| ``targets``: a module name / ``re:<regex>`` | a rule (``re:`` keeps compressed-tensors' ``re.match`` from the start of the name; fxquant also tries each dotted suffix); compressed-tensors' precedence: names, then regexes (each sorted), then the class |
| ``ignore`` (names, ``re:``) | ``Spec.skip`` |
| weights int, ``strategy`` group / channel, ``symmetric`` | ``int<b>wo-<g>[-sym]`` / ``uint<b>wo-<g>`` (channel: ``<g>`` = ``ch``; the same ``absmax / ((2**b - 1) / 2)`` grid; asymmetric: the offset stored as a bf16 value, not an integer zero point) |
| weights int8 channel sym + ``input_activations`` int8 token, dynamic | ``int8dq`` (weights on its ±127 grid) |
| weights float8 channel (+ dynamic float8 token activations) | ``float8wo`` (``float8dq-row-ubinf``: no activation bound, as compressed-tensors) |
| weights float8 tensor + dynamic float8 tensor activations | ``float8dq-ubinf`` |
| ``observer`` (min-max family), ``observer_kwargs``, ``zp_dtype``, ``scale_dtype`` (bf16 / fp16 / fp32), ``actorder`` ``weight`` / ``static`` (GPTQ's calibration order; no method here: round to nearest), per-group ``format`` | notes |
| ``format`` (``dense``, ``pack-quantized``, ``int-quantized``, ``float-quantized``, ``naive-quantized``, ...), ``quantization_status``, ``global_compression_ratio``, ``version``, ``run_compressed``, ``dequantize``, ``use_optimized_inference`` | notes (storage and loading) |
| static activations, output activations, ``kv_cache_scheme``, block / tensor-group / tensor int strategies, 4- / 6-bit floats (NVFP4, MX), ``actorder`` group, ``mse`` observers, sparsity / transforms, other class-name targets | ``ValueError`` |

Writing (``Spec.to_config("compressed-tensors")``) describes the format only: a scheme's method is not
part of it (the stored values are the method's; reading it back gives round-to-nearest schemes).
"""
from __future__ import annotations

import enum
import fnmatch
import math
import re
from collections import OrderedDict
from typing import Any

import torch

from ..schemes import Float8DynamicActivation, Float8WeightOnly, Int4WeightOnly, Int8DynamicActivation, \
    Int8WeightOnly, IntX
from ..spec import Pattern, Spec
from ._base import Fields, reader, writer

NAME = "CompressedTensorsConfig"
FIELDS = ("config_groups", "format", "quantization_status", "kv_cache_scheme", "global_compression_ratio", "ignore",
          "sparsity_config", "transform_config", "moe_sparsity_config", "version", "run_compressed", "dequantize",
          "use_optimized_inference", "quantization_config")
SCHEME_FIELDS = ("targets", "weights", "input_activations", "output_activations", "format")
ARGS_FIELDS = ("num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
               "scale_dtype", "zp_dtype", "observer", "observer_kwargs")
FORMATS = ("dense", "fakequant", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized",
           "mixed-precision", "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized",
           "mxfp8-quantized")
STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
MINMAX = ("minmax", "memoryless", "memoryless_minmax", "static_minmax")
CLASS_LINEAR = ("Linear", "LinearBase")  # LinearBase: vLLM's, which compressed-tensors matches as Linear
_INT = dict(type="int", symmetric=True, dynamic=False)
_W = {b: {"weights": dict(num_bits=b, strategy="group", group_size=128, **_INT)} for b in range(2, 9)}
_W8A8 = {"weights": dict(num_bits=8, strategy="channel", **_INT),
         "input_activations": dict(num_bits=8, strategy="token", type="int", symmetric=True, dynamic=True)}
_F8 = dict(num_bits=8, type="float", symmetric=True)
#: compressed-tensors' preset schemes (``config_groups={"W4A16": ["Linear"]}``) that fxquant can say
PRESETS = {**{f"W{b}A16": s for b, s in _W.items()},
           "W4A16_ASYM": {"weights": dict(num_bits=4, strategy="group", group_size=128, type="int", symmetric=False,
                                          dynamic=False)},
           "W8A8": _W8A8, "INT8": _W8A8, "UNQUANTIZED": {},
           "FP8_DYNAMIC": {"weights": dict(strategy="channel", dynamic=False, **_F8),
                           "input_activations": dict(strategy="token", dynamic=True, **_F8)},
           "FP8": {"weights": dict(strategy="tensor", dynamic=False, **_F8),
                   "input_activations": dict(strategy="tensor", dynamic=False, observer="static_minmax", **_F8)}}
VALID = ("int 1..8-bit weights per group / channel (weight only); int8 channel symmetric weights + dynamic int8 "
         "token activations; float8 channel weights (weight only, or + dynamic float8 token activations); float8 "
         "tensor weights + dynamic float8 tensor activations")


# -- reading -------------------------------------------------------------------------------------------
@reader("compressed-tensors", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    f.d = _plain(f.d)
    nested = f.take("quantization_config", None, check=lambda v: isinstance(v, dict), valid="a dict")
    if nested is not None:  # transformers' from_dict unwraps {"quantization_config": {...}}
        outer = {k: v for k, v in f.d.items() if k != "quantization_config"}
        f = Fields(NAME, {**outer, **nested}, FIELDS)
    groups = f.take("config_groups", None, check=lambda v: isinstance(v, dict) and len(v) > 0,
                    valid="a non-empty dict of group name -> QuantizationScheme (or preset name -> targets)")
    if groups is None:
        raise f.error("config_groups", "absent: nothing to quantize; valid: a dict of group name -> scheme")
    for field in ("kv_cache_scheme", "moe_sparsity_config"):
        f.take(field, None, check=lambda v: False, valid="None (fxquant quantizes linear weights only)")
    for field in ("sparsity_config", "transform_config"):
        f.take(field, None, check=lambda v: v == {}, valid="None or {} (fxquant applies no sparsity or transform)")
    fmt = f.take("format", "dense", choices=FORMATS)
    if fmt not in ("dense", "fakequant"):
        f.notes.append(f"{NAME}: format={fmt!r} accepted; it is how a checkpoint stores the weights, fxquant "
                       "stores its own")
    f.take("quantization_status", "initialized", choices=STATUSES)
    f.used.discard("quantization_status")
    f.inert("quantization_status", "global_compression_ratio", "version", "run_compressed", "dequantize",
            "use_optimized_inference", defaults={"quantization_status": "initialized", "dequantize": False,
                                                 "use_optimized_inference": False})
    targets: OrderedDict[str, Any] = OrderedDict()  # later groups take a shared target, as compressed-tensors
    for gname, group in groups.items():
        scheme, names = _group(f, gname, group)
        for t in names:
            targets[t] = scheme
    default = None
    for cls in reversed(CLASS_LINEAR):  # "Linear" sorts before "LinearBase": it wins
        if cls in targets:
            default = targets.pop(cls)
    ordered = sorted(targets, key=lambda t: (t.startswith("re:"), t))  # compressed-tensors' match_targets order
    rules = [(_pattern(t, f"{NAME}.config_groups targets"), targets[t]) for t in ordered]
    ignore = f.take("ignore", [], check=lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                    valid="a list of module names / 're:' regexes")
    skip = [_pattern(t, f"{NAME}.ignore") for t in ignore]
    return f.finish(Spec(default=default, rules=rules, skip=skip))


def _plain(value: Any) -> Any:
    """``value`` with every enum (compressed-tensors' ``QuantizationType`` ...) replaced by its value."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _group(f: Fields, gname: str, group: Any) -> tuple[Any, list[str]]:
    """``(scheme or None, targets)`` of one config group."""
    where = f"{NAME}.config_groups[{gname!r}]"
    if isinstance(group, list):  # a preset name -> its targets
        preset = PRESETS.get(str(gname).upper())
        if preset is None:
            raise ValueError(f"{where}: preset {gname!r} has no fxquant scheme; valid presets: {', '.join(PRESETS)} "
                             f"(or a scheme dict with {VALID})")
        group = {"targets": group, **preset}
    if not isinstance(group, dict):
        raise ValueError(f"{where}: expected a QuantizationScheme dict or a list of targets, got {group!r}")
    g = Fields(where, group, SCHEME_FIELDS)
    targets = g.take("targets", None, check=lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                     valid="a non-empty list of class names / module names / 're:' regexes")
    if targets is None:
        raise g.error("targets", "absent; valid: a non-empty list such as ['Linear']")
    g.take("output_activations", None, check=lambda v: False, valid="None (fxquant does not quantize outputs)")
    g.inert("format")
    weights = _args(g, "weights")
    inputs = _args(g, "input_activations")
    g.finish(Spec())
    f.notes.extend(g.notes)
    return _scheme(where, weights, inputs), targets


def _args(g: Fields, field: str) -> dict | None:
    """One ``QuantizationArgs`` dict, checked, with ``strategy`` inferred as compressed-tensors does."""
    d = g.take(field, None, check=lambda v: isinstance(v, dict), valid="a QuantizationArgs dict or None")
    if d is None:
        return None
    a = Fields(f"{g.name}.{field}", d, ARGS_FIELDS)
    out = {"num_bits": a.take("num_bits", 8, check=lambda v: isinstance(v, int) and not isinstance(v, bool),
                              valid="an integer"),
           "type": a.take("type", "int", check=lambda v: str(v).lower() in ("int", "float"), valid="'int', 'float'"),
           "symmetric": a.take("symmetric", True, choices=(True, False)),
           "dynamic": a.take("dynamic", False, choices=(True, False), valid="True, False (not 'local')")}
    out["type"] = out["type"].lower()
    group = a.take("group_size", None, check=lambda v: isinstance(v, int) and (v > 0 or v == -1),
                   valid="an integer > 0, or -1 (channel)")
    inferred = "tensor" if group is None else ("group" if group > 0 else "channel")
    out["strategy"] = str(a.take("strategy", inferred, choices=("tensor", "channel", "group", "token"),
                                 valid="tensor, channel, group, token (not block, tensor_group, attn_head)")).lower()
    out["group_size"] = group
    a.take("block_structure", None, check=lambda v: False, valid="None (block strategy is not supported)")
    order = a.take("actorder", None, check=lambda v: v is False or str(v).lower() in ("weight", "static"),
                   valid="None, 'weight', 'static' (group / dynamic orders need g_idx)")
    if order not in (None, False):
        a.notes.append(f"{a.name}: actorder={order!r} accepted: it orders GPTQ's columns during calibration and "
                       "leaves the format as it is; this config names no method, so fxquant rounds to nearest "
                       "(use method=GPTQ(act_order=True) to run GPTQ)")
    observer = a.take("observer", None, check=lambda v: str(v).lower() in MINMAX,
                      valid=", ".join(MINMAX) + " (fxquant's round to nearest is min-max; mse observers search clips)")
    if observer is not None and str(observer).lower() != "minmax":
        a.notes.append(f"{a.name}: observer={observer!r} accepted; fxquant's weights use min-max ranges")
    scale = a.take("scale_dtype", None, check=lambda v: str(v).removeprefix("torch.") in
                   ("bfloat16", "float16", "float32"), valid="bfloat16, float16, float32")
    if scale is not None:
        a.notes.append(f"{a.name}: scale_dtype={scale!r} accepted; fxquant stores its format's scale dtype "
                       "(bf16 for int weights, fp32 for float8)")
    a.inert("zp_dtype", "observer_kwargs", defaults={"observer_kwargs": {}})
    a.finish(Spec())
    g.notes.extend(a.notes)
    return out


def _scheme(where: str, w: dict | None, x: dict | None):
    """The fxquant scheme of weights ``w`` and input activations ``x`` (checked dicts)."""
    if w is None:
        if x is not None:
            raise ValueError(f"{where}: input_activations without weights is not supported; valid: {VALID}")
        return None
    if w["dynamic"]:
        raise ValueError(f"{where}.weights.dynamic=True is not supported; valid: False")
    if x is not None and not x["dynamic"]:
        raise ValueError(f"{where}.input_activations.dynamic=False (static activation scales from calibration) is "
                         f"not supported; valid: True (dynamic, per call)")
    bits, kind, strat, sym = w["num_bits"], w["type"], w["strategy"], w["symmetric"]
    act = None if x is None else (x["type"], x["num_bits"], x["strategy"], x["symmetric"])
    if kind == "int" and strat in ("group", "channel") and act is None:
        try:
            return IntX(bits=bits, group_size=w["group_size"] if strat == "group" else -1, symmetric=sym)
        except ValueError as e:
            raise ValueError(f"{where}.weights: {e}") from None
    if (kind, bits, strat, sym) == ("int", 8, "channel", True) and act == ("int", 8, "token", True):
        return Int8DynamicActivation()
    if (kind, bits, sym) == ("float", 8, True):
        if strat == "channel" and act is None:
            return Float8WeightOnly()
        if strat == "channel" and act == ("float", 8, "token", True):
            return Float8DynamicActivation(granularity="row", activation_scale_ub=math.inf)
        if strat == "tensor" and act == ("float", 8, "tensor", True):
            return Float8DynamicActivation(granularity="tensor", activation_scale_ub=math.inf)
    what = f"weights {kind}{bits} {strat} {'sym' if sym else 'asym'}"
    what += "" if x is None else f" with input activations {act[0]}{act[1]} {act[2]} {'sym' if act[3] else 'asym'}"
    raise ValueError(f"{where}: {what} has no fxquant scheme; valid: {VALID}")


def _pattern(target: str, where: str) -> str:
    """A compressed-tensors target / ignore entry as a spec pattern (see the module table)."""
    if target.startswith("re:"):
        body = target[3:]
        try:
            re.compile(body)
        except re.error as e:
            raise ValueError(f"{where}: {target!r} is not a valid regular expression: {e}") from None
        inner = _unwrap(r"\(\?:\.\*\\\.\)\?\(\?:(.*)\)\$", body)  # what the writer makes of a spec's re:
        return f"re:{inner}" if inner is not None else f"re:(?:{body}).*"
    if target.isidentifier() and target[:1].isupper():
        raise ValueError(f"{where}: class name {target!r} is not supported; valid: 'Linear', module names, "
                         "'re:' regexes")
    return target if Pattern(target).kind == "exact" else f"re:{re.escape(target)}"


# -- writing -------------------------------------------------------------------------------------------
def _target(pattern: str) -> str:
    """A spec pattern as a compressed-tensors target (same matches for names from the model root)."""
    kind = Pattern(pattern).kind
    if kind == "exact":
        return pattern
    body = pattern[3:] if kind == "re" else fnmatch.translate(pattern)
    inner = _unwrap(r"\(\?:(.*)\)\.\*", body) if kind == "re" else None  # the reader's form of a re: target
    return f"re:{inner}" if inner is not None else f"re:(?:.*\\.)?(?:{body})$"


def _unwrap(form: str, body: str) -> str | None:
    """The regex ``form`` wraps in ``body`` when it is a whole regex of its own (else ``None``)."""
    m = re.fullmatch(form, body)
    if m is None:
        return None
    try:
        re.compile(m.group(1))
    except re.error:
        return None
    return m.group(1)


def _args_of(scheme) -> dict:
    """A scheme's ``weights`` / ``input_activations`` (ValueError when compressed-tensors cannot say it)."""
    fmt = scheme.format
    where = f"Spec.to_config('compressed-tensors'): {fmt}"
    if fmt.compute_dtype is not None:
        raise ValueError(f"{where}: compute_dtype has no compressed-tensors field; valid: compute_dtype=None")
    if isinstance(fmt, IntX) and fmt.axis == 1:
        g = fmt.group_size
        return {"weights": dict(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, dynamic=False,
                                strategy="channel" if g == -1 else "group", group_size=None if g == -1 else g)}
    if isinstance(fmt, Int4WeightOnly):
        return {"weights": dict(num_bits=4, type="int", symmetric=False, dynamic=False, strategy="group",
                                group_size=fmt.group_size)}
    if isinstance(fmt, Int8WeightOnly):
        return {"weights": dict(PRESETS["W8A8"]["weights"], group_size=None)}
    if isinstance(fmt, Int8DynamicActivation):
        return {k: dict(v, group_size=None) for k, v in PRESETS["W8A8"].items()}
    if isinstance(fmt, Float8WeightOnly) and fmt.dtype == torch.float8_e4m3fn:
        return {"weights": dict(PRESETS["FP8_DYNAMIC"]["weights"], group_size=None)}
    if isinstance(fmt, Float8DynamicActivation):
        if fmt.activation_scale_ub != math.inf:
            raise ValueError(f"{where}: activation_scale_ub={fmt.activation_scale_ub} has no compressed-tensors "
                             "field; valid: inf (float8dq[-row]-ubinf)")
        strat = "channel" if fmt.granularity == "row" else "tensor"
        return {"weights": dict(strategy=strat, dynamic=False, group_size=None, **_F8),
                "input_activations": dict(strategy="token" if strat == "channel" else "tensor", dynamic=True,
                                          group_size=None, **_F8)}
    raise ValueError(f"{where} has no compressed-tensors scheme; valid: [u]int<b>wo-<g>/-ch (axis 1), int4wo-<g>, "
                     "int8wo, int8dq, float8wo, float8dq[-row]-ubinf")


def _check_order(spec: Spec) -> None:
    """compressed-tensors tries names, then regexes, each sorted: ``ValueError`` when that reorders two of
    the spec's rules with different schemes (first match wins in the spec)."""
    names = [_target(r.pattern.text) for r in spec.rules]
    order = sorted(range(len(names)), key=lambda i: (names[i].startswith("re:"), names[i]))
    pos = {i: p for p, i in enumerate(order)}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if pos[i] > pos[j] and spec.rules[i].scheme.format != spec.rules[j].scheme.format:
                raise ValueError(f"Spec.to_config('compressed-tensors'): compressed-tensors tries module names, then "
                                 f"regexes, each sorted, so {names[j]!r} would come before {names[i]!r}; valid: "
                                 f"rules with different schemes in that order ({[names[k] for k in order]})")


@writer("compressed-tensors")
def write(spec: Spec) -> dict:
    groups: dict[str, dict] = {}
    by_scheme: dict[Any, dict] = {}

    def add(scheme, target: str) -> None:
        key = scheme.format
        if key not in by_scheme:
            by_scheme[key] = {"targets": [], **_args_of(scheme), "format": None}
            groups[f"group_{len(groups)}"] = by_scheme[key]
        by_scheme[key]["targets"].append(target)

    for r in spec.rules:
        if r.scheme is None:
            raise ValueError(f"Spec.to_config('compressed-tensors'): rule {r.pattern.text!r} keeps layers in float "
                             "after other rules; valid: put them in the skip list (ignore)")
        add(r.scheme, _target(r.pattern.text))
    if spec.default is not None:
        add(spec.default, "Linear")
    if not groups:
        raise ValueError("Spec.to_config('compressed-tensors'): the spec quantizes nothing")
    _check_order(spec)
    return {"quant_method": "compressed-tensors", "config_groups": groups, "ignore": [_target(s) for s in spec.skip],
            "format": "dense", "quantization_status": "initialized", "kv_cache_scheme": None,
            "global_compression_ratio": None}
