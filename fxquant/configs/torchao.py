"""torchao (transformers' and diffusers' ``TorchAoConfig``).

Both dict forms are read: the string ``quant_type`` with ``quant_type_kwargs`` that the seeds
document (function names and diffusers' shorthands; the constructor's form, the arguments beside
``quant_type`` as in ``TorchAoConfig("int4wo", group_size=32)``, is read as ``quant_type_kwargs``), and the serialised torchao config newer
versions write, ``{"quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_data": {...}}}}``
(``FqnToConfig`` included).  The string form is what ``Spec.to_config("torchao")`` writes.

| ``quant_type`` (string / ``_type``) | fxquant |
|---|---|
| ``int4wo``, ``int4_weight_only`` / ``Int4WeightOnlyConfig`` | ``int4wo-<group_size>`` (default 128; 32, 64, 128, 256): min/max asymmetric with a float zero (tinygemm's grid) |
| ``int8wo``, ``int8_weight_only`` / ``Int8WeightOnlyConfig`` | ``int8wo`` (per row); ``group_size`` / ``PerGroup(g)``: ``int8wo-<g>`` |
| ``int8dq``, ``int8_dynamic_activation_int8_weight`` / ``Int8DynamicActivationInt8WeightConfig`` | ``int8dq`` |
| ``float8wo`` (diffusers: **e5m2**), ``float8wo_e5m2`` | ``float8wo-e5m2`` |
| ``float8_weight_only``, ``float8wo_e4m3`` / ``Float8WeightOnlyConfig`` | ``float8wo`` (``weight_dtype`` e4m3fn / e5m2, per row) |
| ``float8dq``, ``float8dq_e4m3``, ``float8dq_e4m3_tensor`` (seed: ``float8_e4m3_tensor``), ``float8_dynamic_activation_float8_weight`` / ``Float8DynamicActivationFloat8WeightConfig`` | ``float8dq-ubinf`` (per tensor; torchao bounds no activation amax unless ``activation_value_ub``) |
| ``float8dq_e4m3_row`` (seed: ``float8_e4m3_row``), ``granularity`` PerRow | ``float8dq-row-ubinf`` |
| ``fp<X>_e<A>m<B>`` (seed spelling ``fpX_eAwB`` too), ``fp<X>`` (e = X // 2), ``fpx_weight_only`` | ``fp<X>_e<A>m<B>`` |
| ``uint1wo`` .. ``uint7wo``, ``uintx_weight_only`` (``dtype``) | ``uint<b>wo-<group_size>`` (default 64); ``use_hqq``: ``@hqq`` |
| ``IntxWeightOnlyConfig`` (symmetric, ``PerGroup(g)`` / ``PerAxis(0)``) | ``int<b>wo-<g>`` / ``int<b>wo-ch`` |
| ``FqnToConfig`` | ``Spec.rules``: exact names, then ``re:`` keys in order, ``_default`` as the default |
| ``int4dq``, ``float8_static_activation_float8_weight``, ``autoquant`` | ``ValueError``: no fxquant scheme (int8 x int4, static scales, a kernel benchmark) |
| ``modules_to_not_convert`` | ``Spec.skip`` (``None``: ``lm_head``) |
| ``include_input_output_embeddings`` | ``False`` only (fxquant quantizes linear layers, not ``nn.Embedding``) |

Fields that only choose storage, kernels or compiler settings are notes: ``layout`` (tensor-core /
CPU tiles), ``inner_k_tiles``, ``int4_packing_format`` (plain / tile_packed_to_4d / preshuffled),
``int4_tile_packed_ntile``, ``pack_dim``, ``intx_packing_format``, ``mm_config``,
``kernel_preference``, ``alg_id``, ``set_inductor_config``, ``version``, ``untie_embedding_weights``.
Fields that change the grid are honoured (``use_hqq`` / ``int4_choose_qparams_algorithm="hqq"`` ->
``@hqq``, fxquant's HQQ with the library's defaults) or refused (an integer zero-point domain,
``preserve_zero``, ``plain_int32`` packing, asymmetric activations, ``reduce_range``,
``weight_only_decode``, per-tensor int8, ``activation_value_lb``, sparse float8 packing).

Exactness (tests/configs/test_torchao.py compares with torchao's own quantization): ``int4wo`` and
the float formats are torchao's grids with fxquant's bf16 scales rounded up (a code may move one
step); torchao's ``int8_weight_only`` scales by ``amax / 127.5`` with codes -128..127, fxquant's
``int8wo`` by ``amax / 127`` (-127..127): each within half its step of the weight.  torchao's
``uintx_weight_only`` without ``use_hqq`` uses an integer zero point with 0 inside the range; fxquant's
``uint`` grid is the min/max one with a float offset (a note says so).  torchao leaves a layer whose
``in_features`` is not a multiple of ``group_size`` in float; fxquant pads its last group.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import torch

from ..methods import HQQ
from ..schemes import (Float8DynamicActivation, Float8WeightOnly, FPx, Int4WeightOnly, Int8DynamicActivation,
                       Int8WeightOnly, IntX, Scheme)
from ..schemes.intx import PER_CHANNEL
from ..spec import Spec
from ._base import Fields, default_only, hf_module_patterns, reader, writer

NAME = "TorchAoConfig"
FIELDS = ("quant_type", "quant_type_kwargs", "modules_to_not_convert", "include_input_output_embeddings",
          "untie_embedding_weights")
DEFAULT_SKIP = ["lm_head"]
INERT = ("set_inductor_config", "version")  # every config's; each type adds its own storage / kernel fields
F8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


# -- values as the two forms spell them --------------------------------------------------------------
def _enum(v: Any) -> Any:
    """A torchao enum (``{"_type": ..., "_data": "PLAIN"}``, the enum, ``"plain"``) -> lower-case name."""
    if isinstance(v, Mapping) and "_data" in v:
        v = v["_data"]
    v = getattr(v, "name", v)
    return v.lower() if isinstance(v, str) else v


def _dtype(v: Any) -> str | None:
    """``torch.float8_e5m2`` / ``"torch.float8_e5m2"`` / ``{"_type": "torch.dtype", "_data": ...}`` -> name."""
    if isinstance(v, Mapping) and "_data" in v:
        v = v["_data"]
    return None if v is None else str(v).removeprefix("torch.")


def _granularity(v: Any) -> tuple | None:
    """``PerRow`` / ``PerTensor`` / ``PerGroup(g)`` / ``PerAxis(a)`` in any form -> ``("row",)`` ... ;
    a pair (activation, weight) -> a tuple of those."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(_granularity(x) for x in v)
    kind, data = (v.get("_type"), v.get("_data") or {}) if isinstance(v, Mapping) else (type(v).__name__, vars(v))
    kind = {"PerRow": "row", "PerTensor": "tensor", "PerGroup": "group", "PerAxis": "axis"}.get(kind, kind)
    arg = data.get("group_size", data.get("axis"))
    return (kind,) if arg is None else (kind, arg)


def _weight_granularity(f: Fields, *allowed: str) -> tuple | None:
    g = _granularity(f.take("granularity"))
    if g is not None and isinstance(g[0], tuple):  # (activation, weight): fxquant uses one for both
        if g[0] != g[1]:
            raise f.error("granularity", f"{g!r}: activation and weight granularities differ; valid: the same one")
        g = g[0]
    if g is not None and g[0] not in allowed:
        raise f.error("granularity", f"{g!r} is not supported; valid: {', '.join(allowed)}")
    return g


def _choice(f: Fields, field: str, default: str, ok: tuple[str, ...], why: str = "") -> str:
    value = _enum(f.take(field, default))
    if value not in ok:
        raise f.error(field, f"{f.d[field]!r} is not supported{why}; valid: {', '.join(ok)}")
    return value


def _off(f: Fields, field: str, why: str) -> None:
    """``field`` must be off (``None`` / ``False``)."""
    if f.take(field) not in (None, False):
        raise f.error(field, f"{f.d[field]!r} is not supported: {why}; valid: None or False")


# -- one builder per torchao config: Fields over its arguments -> the scheme ----------------------------------
def _layout(v: Any) -> str | None:
    """A layout as either form spells it (``["TensorCoreTiledLayout", {...}]``, ``{"_type": ...}``, object)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return v[0] if v else None
    return v.get("_type") if isinstance(v, Mapping) else type(v).__name__


def _int4(f: Fields) -> Scheme:
    g = f.take("group_size", 128, choices=(32, 64, 128, 256))
    algo = _choice(f, "int4_choose_qparams_algorithm", "tinygemm", ("tinygemm", "hqq"))
    hqq = f.take("use_hqq", False, choices=(True, False)) or algo == "hqq"
    for field in ("int4_packing_format", "packing_format"):  # 0.14+ / 0.13 names of the same field
        _choice(f, field, "plain", ("plain", "tile_packed_to_4d", "preshuffled"),
                " (plain_int32 has an integer zero point, others are not int4wo)")
    _choice(f, "zero_point_domain", "none", ("none", "float"), " (an integer zero point is not the int4wo grid)")
    _off(f, "preserve_zero", "the int4wo grid does not force 0 onto a code")
    if _layout(f.take("layout")) not in (None, "TensorCoreTiledLayout", "Int4CPULayout"):
        raise f.error("layout", f"{f.d['layout']!r} is not supported; valid: TensorCoreTiledLayout, Int4CPULayout")
    return Int4WeightOnly(group_size=g, method=HQQ() if hqq else None)


def _int8wo(f: Fields) -> Scheme:
    g = f.take("group_size", None, check=lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
               valid="None (per row) or an integer >= 1")
    gran = _weight_granularity(f, "row", "group")
    if gran is not None and gran[0] == "group":
        if g is not None and g != gran[1]:
            raise f.error("granularity", f"PerGroup({gran[1]}) disagrees with group_size={g}")
        g = gran[1]
    return Int8WeightOnly() if g is None else IntX(bits=8, group_size=g, symmetric=True)


def _int8dq(f: Fields) -> Scheme:
    _choice(f, "act_mapping_type", "symmetric", ("symmetric",), " (fxquant's int8dq activations are symmetric)")
    _off(f, "weight_only_decode", "fxquant's int8dq quantizes the activations at every batch size")
    _off(f, "reduce_range", "the weight and activation ranges are the full int8 ones")
    _weight_granularity(f, "row")
    if _layout(f.take("layout")) not in (None, "PlainLayout"):
        raise f.error("layout", f"{f.d['layout']!r} is not supported (sparse / other layouts); valid: PlainLayout")
    return Int8DynamicActivation()


def _float8wo(f: Fields) -> Scheme:
    dt = _dtype(f.take("weight_dtype", "float8_e4m3fn"))
    if dt not in F8:
        raise f.error("weight_dtype", f"{f.d['weight_dtype']!r} is not supported; valid: {', '.join(F8)}")
    _weight_granularity(f, "row")
    return Float8WeightOnly(dtype=F8[dt])


def _float8dq(f: Fields) -> Scheme:
    for field in ("activation_dtype", "weight_dtype"):
        if _dtype(f.take(field, "float8_e4m3fn")) != "float8_e4m3fn":
            raise f.error(field, f"{f.d[field]!r} is not supported; valid: float8_e4m3fn")
    gran = _weight_granularity(f, "tensor", "row") or ("tensor",)
    ub = f.take("activation_value_ub", math.inf, check=lambda v: isinstance(v, (int, float)) and v > 0
                and not isinstance(v, bool),
                valid="None (no bound) or a number > 0")
    _off(f, "activation_value_lb", "fxquant bounds the activation amax from above only")
    _choice(f, "packing_format", "plain", ("plain",), " (sparse float8 is not an fxquant format)")
    return Float8DynamicActivation(granularity=gran[0], activation_scale_ub=float(ub))


def _fpx(f: Fields) -> Scheme:
    e, m = f.take("ebits"), f.take("mbits")
    try:
        return FPx(exponent_bits=e, mantissa_bits=m)
    except (ValueError, TypeError) as err:
        raise f.error("ebits", f"ebits={e!r}, mbits={m!r}: {err}") from None


def _uintx(f: Fields) -> Scheme:
    dt = _dtype(f.take("dtype"))
    bits = int(dt[4:]) if dt and re.fullmatch(r"uint[1-8]", dt) else None
    if bits is None:
        raise f.error("dtype", f"{f.d.get('dtype')!r} is not supported; valid: torch.uint1 .. torch.uint8")
    g = f.take("group_size", 64, check=lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
               valid="an integer >= 1")
    hqq = f.take("use_hqq", False, choices=(True, False))
    if not hqq:
        f.notes.append(f"{f.name}: torchao's uintx grid (use_hqq=False) has an integer zero point with 0 inside "
                       f"the range; fxquant's uint{bits}wo-{g} is the min/max grid with a float offset (codes differ)")
    return IntX(bits=bits, group_size=g, method=HQQ() if hqq else None)


def _intx(f: Fields) -> Scheme:
    dt = _dtype(f.take("weight_dtype", "int8"))
    if not (dt and re.fullmatch(r"int[2-8]", dt)):
        raise f.error("weight_dtype", f"{f.d.get('weight_dtype')!r} is not supported; valid: torch.int2 .. torch.int8")
    gran = _weight_granularity(f, "group", "axis") or ("axis", 0)
    _choice(f, "mapping_type", "symmetric", ("symmetric",), " (torchao's asymmetric intx has an integer zero point)")
    _choice(f, "intx_choose_qparams_algorithm", "affine", ("affine",))
    return IntX(bits=int(dt[3:]), group_size=gran[1] if gran[0] == "group" else PER_CHANNEL, symmetric=True)


#: torchao config class -> (builder, the arguments it reads, those that only choose storage / kernels: notes);
#: every argument any version of the class has
TYPES: dict[str, tuple[Callable[[Fields], Scheme], tuple[str, ...], tuple[str, ...]]] = {
    "Int4WeightOnlyConfig": (_int4, ("group_size", "layout", "use_hqq", "zero_point_domain", "preserve_zero",
                                     "packing_format", "int4_packing_format", "int4_choose_qparams_algorithm"),
                             ("layout", "inner_k_tiles", "int4_packing_format", "packing_format",
                              "int4_tile_packed_ntile")),
    "Int8WeightOnlyConfig": (_int8wo, ("group_size", "granularity"), ()),
    "Int8DynamicActivationInt8WeightConfig": (_int8dq, ("layout", "act_mapping_type", "weight_only_decode",
                                                        "granularity", "reduce_range"), ("layout",)),
    "Float8WeightOnlyConfig": (_float8wo, ("weight_dtype", "granularity"), ()),
    "Float8DynamicActivationFloat8WeightConfig": (_float8dq, (
        "activation_dtype", "weight_dtype", "granularity", "packing_format", "activation_value_lb",
        "activation_value_ub"), ("mm_config", "kernel_preference", "alg_id")),
    "FPXWeightOnlyConfig": (_fpx, ("ebits", "mbits"), ()),
    "UIntXWeightOnlyConfig": (_uintx, ("dtype", "group_size", "use_hqq"), ("pack_dim",)),
    "IntxWeightOnlyConfig": (_intx, ("weight_dtype", "granularity", "mapping_type", "intx_choose_qparams_algorithm"),
                             ("scale_dtype", "intx_packing_format")),
}
REFUSED = {
    "int4dq": "int8 dynamic activations x int4 weights: no fxquant scheme (int4wo-<g> is weight-only)",
    "Int8DynamicActivationInt4WeightConfig": "int8 dynamic activations x int4 weights: no fxquant scheme",
    "Float8StaticActivationFloat8WeightConfig": "a static (calibrated) activation scale: fxquant's float8dq is dynamic",
    "autoquant": "autoquant benchmarks kernels per layer on the GPU: name one quant_type instead",
}
REFUSED["int8_dynamic_activation_int4_weight"] = REFUSED["int4dq"]
REFUSED["float8_static_activation_float8_weight"] = REFUSED["Float8StaticActivationFloat8WeightConfig"]


def _strings() -> dict[str, tuple[str, dict]]:
    """Every string ``quant_type`` of transformers / diffusers -> (config class, arguments it fixes)."""
    e5, e4 = {"weight_dtype": "float8_e5m2"}, {"weight_dtype": "float8_e4m3fn"}
    s = {"int4wo": ("Int4WeightOnlyConfig", {}), "int4_weight_only": ("Int4WeightOnlyConfig", {}),
         "int8wo": ("Int8WeightOnlyConfig", {}), "int8_weight_only": ("Int8WeightOnlyConfig", {}),
         "int8dq": ("Int8DynamicActivationInt8WeightConfig", {}),
         "int8_dynamic_activation_int8_weight": ("Int8DynamicActivationInt8WeightConfig", {}),
         "float8wo": ("Float8WeightOnlyConfig", e5), "float8wo_e5m2": ("Float8WeightOnlyConfig", e5),
         "float8wo_e4m3": ("Float8WeightOnlyConfig", e4), "float8_weight_only": ("Float8WeightOnlyConfig", {}),
         "fpx_weight_only": ("FPXWeightOnlyConfig", {}), "uintx_weight_only": ("UIntXWeightOnlyConfig", {})}
    dq = "Float8DynamicActivationFloat8WeightConfig"
    for name in ("float8dq", "float8dq_e4m3", "float8_dynamic_activation_float8_weight"):
        s[name] = (dq, {})
    for gran, typ in (("tensor", "PerTensor"), ("row", "PerRow")):
        for name in (f"float8dq_e4m3_{gran}", f"float8_e4m3_{gran}"):  # the code's name, the seed's
            s[name] = (dq, {"granularity": {"_type": typ, "_data": {}}})
    for x in range(3, 8):
        for e in range(1, x):
            s[f"fp{x}_e{e}m{x - e - 1}"] = s[f"fp{x}_e{e}w{x - e - 1}"] = ("FPXWeightOnlyConfig",
                                                                           {"ebits": e, "mbits": x - e - 1})
        s[f"fp{x}"] = ("FPXWeightOnlyConfig", {"ebits": x // 2, "mbits": x - 1 - x // 2})
    for b in range(1, 8):
        s[f"uint{b}wo"] = ("UIntXWeightOnlyConfig", {"dtype": f"uint{b}"})
    return s


STRINGS = _strings()
VALID = ", ".join(s for s in STRINGS if not re.fullmatch(r"fp\d.*|uint\dwo", s)) + \
    ", fp<X>_e<A>m<B> (X = A + B + 1 in 3..7), fp<X>, uint1wo .. uint7wo"


def _build(typ: str, data: Mapping, name: str, notes: list[str]) -> Scheme:
    """torchao config ``typ`` with arguments ``data`` -> scheme; ``name`` names them in messages."""
    if typ in REFUSED:
        raise ValueError(f"{name}: {typ!r} is not supported: {REFUSED[typ]}")
    if typ not in TYPES:
        raise ValueError(f"{name}: {typ!r} is not supported; valid: {', '.join(TYPES)}, FqnToConfig")
    build, args, inert = TYPES[typ]
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: {data!r} is not a dict of {typ}'s arguments")
    f = Fields(name, data, (*args, *inert, *INERT))
    scheme = build(f)
    _inert(f, (*inert, *INERT))
    f.finish(Spec())
    notes.extend(f.notes)
    return scheme


#: values of the storage / kernel fields that are their defaults (no note)
QUIET = {"set_inductor_config": (True,), "version": (1, 2), "pack_dim": (-1,), "alg_id": (0,), "inner_k_tiles": (8,),
         "int4_packing_format": ("plain",), "packing_format": ("plain",), "int4_tile_packed_ntile": (8,),
         "kernel_preference": ("auto",), "intx_packing_format": ("unpacked_to_int8",),
         "mm_config": ({"emulate": False, "use_fast_accum": True, "pad_inner_dim": False},)}


def _inert(f: Fields, fields: tuple[str, ...]) -> None:
    """As ``Fields.inert``, with either form's spelling of the defaults (``{"_data": "PLAIN"}`` = ``"plain"``)."""
    for name in fields:
        f.used.add(name)
        value = f.d.get(name)
        if value is not None and _enum(value) not in QUIET.get(name, ()):
            f.notes.append(f"{f.name}: {name}={value!r} accepted; it does not change the quantized weights")


def _serialized(obj: Any, where: str, notes: list[str]) -> Scheme:
    if not (isinstance(obj, Mapping) and "_type" in obj and set(obj) <= {"_type", "_version", "_data"}):
        raise ValueError(f"{where}: {obj!r} is not a serialised torchao config; valid: "
                         '{"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {...}}')
    return _build(obj["_type"], obj.get("_data") or {}, f"{where}[{obj['_type']}]", notes)


def _fqn(data: Mapping, where: str, notes: list[str]) -> tuple[Scheme | None, list]:
    """``FqnToConfig``'s ``fqn_to_config`` -> (default, rules): exact names first, then ``re:`` keys in order."""
    table = data.get("fqn_to_config") or data.get("module_fqn_to_config") or {}
    extra = sorted(set(data) - {"fqn_to_config", "module_fqn_to_config", "version"})
    if extra or not isinstance(table, Mapping):
        raise ValueError(f"{where}.{extra[0] if extra else 'fqn_to_config'}: not an FqnToConfig field / dict; "
                         "valid: fqn_to_config, module_fqn_to_config, version")
    default, exact, regex = None, [], []
    for key, cfg in table.items():
        scheme = None if cfg is None else _serialized(cfg, f"{where}.fqn_to_config[{key!r}]", notes)
        if key == "_default":
            default = scheme
        else:
            (regex if key.startswith("re:") else exact).append((key if key.startswith("re:") else
                                                                key.removesuffix(".weight"), scheme))
    return default, exact + regex


@reader("torchao", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    qt = f.take("quant_type")
    kwargs = f.take("quant_type_kwargs", {}, check=lambda v: isinstance(v, Mapping), valid="a dict")
    extra = {k: v for k, v in f.d.items() if k not in f.known}
    if isinstance(qt, str) and extra and "quant_type_kwargs" not in f:  # TorchAoConfig("int4wo", group_size=32)
        kwargs = extra  # the old constructor's kwargs.get("quant_type_kwargs", kwargs)
        f.known.update(extra)
        f.used.update(extra)
    skip = hf_module_patterns(f.take("modules_to_not_convert", DEFAULT_SKIP), f"{NAME}.modules_to_not_convert")
    f.take("include_input_output_embeddings", False, choices=(False,),
           valid="False (fxquant quantizes linear layers; an nn.Embedding is not one)")
    f.inert("untie_embedding_weights", defaults={"untie_embedding_weights": False})
    rules = []
    if isinstance(qt, str):
        if qt in REFUSED:
            raise f.error("quant_type", f"{qt!r} is not supported: {REFUSED[qt]}")
        if qt not in STRINGS:
            raise f.error("quant_type", f"{qt!r} is not supported; valid: {VALID}")
        typ, fixed = STRINGS[qt]
        default = _build(typ, {**fixed, **kwargs}, f"{NAME}({qt!r}).quant_type_kwargs", f.notes)
    elif isinstance(qt, Mapping):
        if set(qt) != {"default"}:
            raise f.error("quant_type", f"keys {sorted(qt)}: valid: one key, 'default' (as TorchAoConfig writes)")
        if kwargs:
            raise f.error("quant_type_kwargs", "given with a serialised quant_type; valid: {} (the arguments are "
                          "in _data)")
        obj = qt["default"]
        if isinstance(obj, Mapping) and obj.get("_type") in ("FqnToConfig", "ModuleFqnToConfig"):
            default, rules = _fqn(obj.get("_data") or {}, f"{NAME}.quant_type[{obj['_type']}]", f.notes)
        else:
            default = _serialized(obj, f"{NAME}.quant_type", f.notes)
    else:
        raise f.error("quant_type", f"{qt!r} is not supported; valid: a string ({VALID}) or the serialised "
                      "{'default': {'_type': ..., '_data': ...}}")
    return f.finish(Spec(default=default, skip=skip, rules=rules))


def _string_form(s: Any) -> tuple[str, dict] | None:
    """The string ``quant_type`` and kwargs that read back as scheme ``s`` (``None``: there is none)."""
    if s.compute_dtype is not None or (s.method is not None and s.method != HQQ()):
        return None
    hqq = {"use_hqq": True} if s.method is not None else {}
    if isinstance(s, Int4WeightOnly):
        return "int4_weight_only", {"group_size": s.group_size, **hqq}
    if isinstance(s, IntX) and not s.symmetric and s.axis == 1 and s.bits < 8 and s.group_size > 0:
        return f"uint{s.bits}wo", {"group_size": s.group_size, **hqq}
    if hqq:
        return None
    if isinstance(s, Int8WeightOnly):
        return "int8_weight_only", {}
    if isinstance(s, IntX) and s.symmetric and s.bits == 8 and s.axis == 1 and s.group_size > 0:
        return "int8_weight_only", {"group_size": s.group_size}
    if isinstance(s, Int8DynamicActivation):
        return "int8_dynamic_activation_int8_weight", {}
    if isinstance(s, Float8WeightOnly):
        return "float8wo_e5m2" if s.dtype == torch.float8_e5m2 else "float8wo_e4m3", {}
    if isinstance(s, Float8DynamicActivation):
        ub = {} if math.isinf(s.activation_scale_ub) else {"activation_value_ub": s.activation_scale_ub}
        return f"float8dq_e4m3_{s.granularity}", ub
    if isinstance(s, FPx):
        return str(s), {}
    return None


@writer("torchao")
def write(spec: Spec) -> dict:
    """The string form (``quant_type`` + ``quant_type_kwargs``), which both transformers and diffusers wrote."""
    scheme, skip = default_only(spec, "torchao")
    form = _string_form(scheme)
    if form is None:
        raise ValueError(f"Spec.to_config('torchao'): {scheme} has no TorchAoConfig string form; valid: "
                         "int4wo-<g>[@hqq], int8wo, int8wo-<g>, int8dq, float8wo[-e5m2], float8dq[-row][-ub<b>], "
                         "fp<X>_e<A>m<B>, uint<b>wo-<g>[@hqq] (b < 8)")
    return {"quant_method": "torchao", "quant_type": form[0], "quant_type_kwargs": form[1],
            "modules_to_not_convert": skip, "include_input_output_embeddings": False,
            "untie_embedding_weights": False}
