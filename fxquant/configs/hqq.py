"""HQQ (transformers' ``HqqConfig`` and the ``hqq`` library's ``BaseQuantizeConfig``).

Two dict forms are read: the constructor's fields (``nbits``, ``group_size``, ``axis``,
``view_as_float``, ``dynamic_config``, ``skip_modules``: the seed's) and what ``HqqConfig.to_dict()``
writes to ``config.json`` (``quant_config`` = one ``BaseQuantizeConfig`` dict, or one per linear tag,
and ``skip_modules``).  A layer config becomes ``uint<nbits>wo-<group_size>[-axis0]@hqq``: HQQ's
min/max affine grid (codes ``0 .. 2^b - 1``, a float scale and zero per group) with the
half-quadratic zero-point optimisation (``fxquant.methods.HQQ()``, whose defaults are the library's
``lp_norm=0.7, beta=10, kappa=1.01, iters=20``).

| field | fxquant |
|---|---|
| ``nbits`` | ``bits`` of ``uint<b>wo``: 1, 2, 3, 4, 5, 6, 8 (HQQ's; 1.58 ternary has no fxquant grid) |
| ``group_size`` | ``group_size`` (HQQ: a multiple of 8); ``None``: one group per row (axis 1) or column (axis 0), ``-ch`` |
| ``axis`` | ``1`` (default): groups along the input; ``0``: HQQ's strided groups across output rows (``-axis0``) |
| ``optimize`` | ``True`` (always, from ``BaseQuantizeConfig``): ``@hqq``; ``False``: round to nearest |
| ``round_zero`` | with ``optimize``: a note (HQQ starts its optimisation from a rounded zero, fxquant from the exact one); without: ``False`` only |
| ``channel_wise`` | ``True`` only (``False`` is one min/max for the whole tensor) |
| ``view_as_float``, ``offload_meta`` | notes (storage / placement) |
| ``quant_zero``, ``quant_scale``, ``scale_quant_params``, ``zero_quant_params`` | off only (8-bit quantized meta-data is not an fxquant format) |
| ``dynamic_config`` / ``quant_config`` keyed by tag | ``Spec.rules``, one per tag (``None``: keep float); layers whose tag is not a key stay in float, as in transformers |
| ``skip_modules`` | ``Spec.skip`` by tag (default ``["lm_head"]``) |

A *linear tag* is the module name without its ``model``, ``layers`` and numeric parts
(``model.layers.31.self_attn.k_proj`` -> ``self_attn.k_proj``, transformers' ``name_to_linear_tag``);
a skip entry or a ``dynamic_config`` key names every linear with that tag.  fxquant writes a tag
as a ``re:`` pattern allowing those parts anywhere; like every spec pattern it also tries the
name's dotted suffixes, so a key that is only the tail of a tag (``"q_proj"`` for
``self_attn.q_proj``, which matches nothing in HQQ) matches here.  HQQ requires the group size to
divide the weight; fxquant pads a partial last group instead.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from ..methods import HQQ
from ..schemes import IntX
from ..schemes.intx import PER_CHANNEL
from ..spec import Pattern, Spec
from ._base import Fields, names, reader, writer

NAME = "HqqConfig"
TOP = ("nbits", "group_size", "axis", "view_as_float")  # HqqConfig's arguments for one config for all layers
FIELDS = ("quant_config", "skip_modules", "dynamic_config", *TOP)
BITS = (1, 2, 3, 4, 5, 6, 8)  # hqq's Quantizer.SUPPORTED_BITS without 1.58
DEFAULT_SKIP = ["lm_head"]
#: BaseQuantizeConfig's arguments (the constructor form of one layer's config) and their defaults
ARGS = {"nbits": 4, "group_size": 64, "quant_zero": False, "quant_scale": False, "offload_meta": False,
        "view_as_float": False, "axis": 1}
WEIGHT_PARAMS = ("nbits", "channel_wise", "group_size", "optimize", "round_zero", "axis", "view_as_float")
LAYER_KEYS = ("weight_quant_params", "scale_quant_params", "zero_quant_params", "offload_meta")
_FILL = r"(?:model|layers|[0-9]+)"  # the name parts a linear tag leaves out


def tag_pattern(tag: str, where: str) -> str:
    """The spec pattern of HQQ's linear tag ``tag``: names whose tag is ``tag``."""
    parts = tag.split(".") if isinstance(tag, str) else []
    if not parts or any(p in ("", "model", "layers") or p.isnumeric() for p in parts):
        raise ValueError(f"{where}: {tag!r} is not a linear tag; valid: a module name without its 'model', "
                         "'layers' and numeric parts, e.g. 'self_attn.q_proj', 'mlp.down_proj', 'lm_head'")
    body = rf"(?:\.{_FILL})*\.".join(re.escape(p) for p in parts)
    return rf"re:(?:{_FILL}\.)*{body}(?:\.{_FILL})*"


def pattern_tag(pattern: str) -> str | None:
    """The tag :func:`tag_pattern` turned into ``pattern`` (an exact name that is a tag: itself), else ``None``."""
    head, sep, tail = rf"re:(?:{_FILL}\.)*", rf"(?:\.{_FILL})*\.", rf"(?:\.{_FILL})*"
    if Pattern(pattern).kind == "exact":
        tag = pattern
    elif pattern.startswith(head) and pattern.endswith(tail):
        tag = ".".join(re.sub(r"\\(.)", r"\1", p) for p in pattern[len(head):-len(tail)].split(sep))
    else:
        return None
    try:
        regex = tag_pattern(tag, "")
    except ValueError:
        return None
    return tag if pattern in (tag, regex) else None


def _layer(cfg: Any, name: str) -> tuple[IntX, list[str]]:
    """One layer's HQQ config (``BaseQuantizeConfig``'s arguments or the dict it returns) -> its scheme
    and notes; ``name`` names it in messages (``HqqConfig.dynamic_config['self_attn.q_proj']``)."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{name}: {cfg!r} is not a layer config; valid: a BaseQuantizeConfig dict or its arguments")
    if "weight_quant_params" not in cfg:  # the arguments, as HqqConfig / dynamic_config take them
        f = Fields(name, cfg, ARGS)
        nbits = f.take("nbits", 4, choices=BITS)
        for q in ("quant_zero", "quant_scale"):
            f.take(q, False, choices=(False,), valid="False (quantized meta-data is not an fxquant format)")
        f.inert("offload_meta", "view_as_float", defaults={"offload_meta": False, "view_as_float": False})
        args = dict(nbits=nbits, group_size=cfg.get("group_size", 64), axis=f.take("axis", 1, choices=(0, 1)),
                    optimize=True, round_zero=nbits == 4)  # what BaseQuantizeConfig builds from them
        f.used.add("group_size")
        scheme = _scheme(args, f)
        f.finish(Spec())
        return scheme, f.notes
    f = Fields(name, cfg, LAYER_KEYS)
    wp = f.take("weight_quant_params", check=lambda v: isinstance(v, Mapping), valid="a dict")
    for meta in ("scale_quant_params", "zero_quant_params"):
        f.take(meta, check=lambda v: False, valid="None (quantized meta-data is not an fxquant format)")
    f.inert("offload_meta", defaults={"offload_meta": False})
    f.finish(Spec())
    w = Fields(f"{name}.weight_quant_params", wp, WEIGHT_PARAMS)
    nbits = w.take("nbits", 4, choices=BITS)
    w.take("channel_wise", True, choices=(True,), valid="True (False: one min/max for the whole tensor)")
    w.inert("view_as_float", defaults={"view_as_float": False})
    args = dict(nbits=nbits, group_size=wp.get("group_size"), axis=w.take("axis", 0, choices=(0, 1)),
                optimize=w.take("optimize", True, choices=(True, False)),
                round_zero=w.take("round_zero", False, choices=(True, False)))
    w.used.add("group_size")
    scheme = _scheme(args, w)
    w.finish(Spec())
    return scheme, f.notes + w.notes


def _scheme(a: dict, f: Fields) -> IntX:
    g = a["group_size"]
    if g is None:  # HQQ's min/max over the whole axis: one group per row (axis 1) or column (axis 0)
        g = PER_CHANNEL
    elif isinstance(g, bool) or not isinstance(g, int) or g < 8 or g % 8:
        raise f.error("group_size", f"{g!r} is not supported; valid: a positive multiple of 8 (HQQ's rule) or None "
                      "(one group per channel)")
    if a["round_zero"]:
        if not a["optimize"]:
            raise f.error("round_zero", "True without optimize is not supported: fxquant's uint grid keeps a float "
                          "zero; valid: False, or optimize=True")
        f.notes.append(f"{f.name}: round_zero=True (BaseQuantizeConfig's at 4 bits): HQQ starts its optimisation "
                       "from a rounded zero point, fxquant's HQQ from the exact min/max one (both then optimise it "
                       "as a float)")
    return IntX(bits=a["nbits"], group_size=g, axis=a["axis"], method=HQQ() if a["optimize"] else None)


@reader("hqq", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    top = [k for k in TOP if k in f]
    if "quant_config" in f and (top or "dynamic_config" in f):
        raise f.error((top or ["dynamic_config"])[0], "given with quant_config (what HqqConfig.to_dict() writes); "
                      "valid: one of the two forms")
    skip = [tag_pattern(s, f"{NAME}.skip_modules") for s in names(f.take("skip_modules", DEFAULT_SKIP),
                                                                    f"{NAME}.skip_modules")]
    if "quant_config" in f:
        field = "quant_config"
        qc = f.take(field, check=lambda v: isinstance(v, Mapping), valid="a dict")
        if "weight_quant_params" in qc:
            return _single(f, qc, f"{NAME}.quant_config", skip)
    elif f.d.get("dynamic_config") is not None:
        field = "dynamic_config"
        qc = f.take(field, check=lambda v: isinstance(v, Mapping), valid="a dict {linear tag: layer config}")
        f.inert(*TOP)  # HqqConfig builds every layer config from dynamic_config alone
    else:
        f.used.update((*TOP, "dynamic_config"))
        return _single(f, {k: f.d[k] for k in TOP if k in f}, NAME, skip)
    rules = []
    for tag, cfg in qc.items():
        pattern = tag_pattern(tag, f"{NAME}.{field}")
        if cfg is None:
            rules.append((pattern, None))
            continue
        scheme, notes = _layer(cfg, f"{NAME}.{field}[{tag!r}]")
        f.notes.extend(notes)
        rules.append((pattern, scheme))
    return f.finish(Spec(default=None, skip=skip, rules=rules))


def _single(f: Fields, cfg: Mapping, name: str, skip: list[str]) -> Spec:
    scheme, notes = _layer(cfg, name)
    f.notes.extend(notes)
    return f.finish(Spec(default=scheme, skip=skip))


def _layer_dict(scheme: Any, kind: str) -> dict:
    ok = (isinstance(scheme, IntX) and not scheme.symmetric and scheme.bits in BITS
          and (scheme.group_size == PER_CHANNEL or scheme.group_size % 8 == 0)
          and scheme.compute_dtype is None and (scheme.method is None or scheme.method == HQQ()))
    if not ok:
        raise ValueError(f"Spec.to_config({kind!r}): {scheme} has no HqqConfig; valid: uint<b>wo-<g>[-axis0] with "
                         f"b in {BITS}, g a multiple of 8 or ch, round to nearest or @hqq with HQQ's defaults")
    optimize = scheme.method is not None
    group = None if scheme.group_size == PER_CHANNEL else scheme.group_size
    wp = {"nbits": scheme.bits, "channel_wise": True, "group_size": group, "optimize": optimize,
          "round_zero": optimize and scheme.bits == 4, "axis": scheme.axis, "view_as_float": False}
    return {"weight_quant_params": wp, "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}


def _tags(patterns, kind: str, what: str) -> list[str]:
    out = []
    for p in patterns:
        tag = pattern_tag(p)
        if tag is None:
            raise ValueError(f"Spec.to_config({kind!r}): {what} pattern {p!r} has no HqqConfig form; valid: linear "
                             "tags (e.g. 'self_attn.q_proj', 'lm_head')")
        out.append(tag)
    return out


@writer("hqq")
def write(spec: Spec) -> dict:
    """``HqqConfig.to_dict()``'s form: ``quant_config`` (one layer config, or one per tag) and ``skip_modules``."""
    skip = _tags(spec.skip, "hqq", "skip")
    if not spec.rules:
        if spec.default is None:
            raise ValueError("Spec.to_config('hqq'): the spec has no default scheme and no rules")
        return {"quant_method": "hqq", "quant_config": _layer_dict(spec.default, "hqq"), "skip_modules": skip}
    if spec.default is not None:
        raise ValueError("Spec.to_config('hqq'): per-tag rules with a default scheme have no HqqConfig form (layers "
                         "whose tag is not in dynamic_config stay in float); valid: rules alone, or a default alone")
    tags = _tags([r.pattern.text for r in spec.rules], "hqq", "rule")
    qc = {t: None if r.scheme is None else _layer_dict(r.scheme, "hqq") for t, r in zip(tags, spec.rules)}
    return {"quant_method": "hqq", "quant_config": qc, "skip_modules": skip}
