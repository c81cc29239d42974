"""optimum-quanto (transformers' ``QuantoConfig``: ``weights``, ``activations``; diffusers'
``QuantoConfig``: ``weights_dtype``).

| field | fxquant |
|---|---|
| ``weights`` / ``weights_dtype`` ``"int8"`` | ``int8wo``: symmetric, one scale per output row (quanto's ``qint8``, absmax / 127) |
| ``"int4"`` / ``"int2"`` | ``uint4wo-128`` / ``uint2wo-128``: quanto's ``qint4`` / ``qint2`` are min/max affine codes ``0 .. 2^b - 1`` in groups of 128 along the input (scale ``(max - min) / (2^b - 1)``, shift ``-min``), fxquant's ``uint<b>wo`` grid |
| ``"float8"`` | ``float8wo``: e4m3fn, one scale per output row (quanto's ``qfloat8`` = ``qfloat8_e4m3fn``, absmax / 448) |
| ``activations`` | ``None`` only: quanto's activation quantization is static (per-tensor scales from a calibration pass) and transformers refuses it too |
| ``modules_to_not_convert`` | ``Spec.skip`` (``None``: ``lm_head``, as transformers skips the output embedding) |

What is exact: the grids (codes, levels, groups) are quanto's.  quanto keeps scales in the
weight's dtype rounded to nearest; fxquant rounds them up to bf16 (and the ``uint`` offset to
bf16), so a code can differ by one step where a value sits near a rounding boundary.  quanto picks
the ``qint4`` / ``qint2`` group size per layer: 128 when it divides ``in_features`` (> 128), else
96, 64 or 32, else one group per row; fxquant uses 128 for every layer (padding a partial last
group), the same groups whenever ``in_features`` is a multiple of 128 above 128.
"""
from __future__ import annotations

from ..schemes import Float8WeightOnly, Int8WeightOnly, IntX
from ..spec import Spec
from ._base import Fields, default_only, hf_module_patterns, reader, writer

NAME = "QuantoConfig"
FIELDS = ("weights", "weights_dtype", "activations", "modules_to_not_convert")
DEFAULT_SKIP = ["lm_head"]
GROUP = 128  # quanto's qint4 / qint2 group size (QModuleMixin) when it divides in_features
SCHEMES = {"int8": Int8WeightOnly(), "int4": IntX(bits=4, group_size=GROUP), "int2": IntX(bits=2, group_size=GROUP),
           "float8": Float8WeightOnly()}


@reader("quanto", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    weights = f.take("weights", None, choices=SCHEMES)
    dtype = f.take("weights_dtype", None, choices=SCHEMES)  # diffusers' name of the same field
    if weights is not None and dtype is not None and weights != dtype:
        raise f.error("weights_dtype", f"{dtype!r} disagrees with weights={weights!r}; valid: one of them")
    act = f.take("activations", None, choices=(None, "int8", "float8"))
    if act is not None:
        raise f.error("activations", f"{act!r} is not supported: quanto quantizes activations with static "
                      "per-tensor scales from a calibration pass, which fxquant does not do (nor does transformers); "
                      "valid: None (weight-only); dynamic int8 / float8 activations are TorchAoConfig's int8dq / "
                      "float8dq")
    skip = f.take("modules_to_not_convert", DEFAULT_SKIP)
    spec = Spec(default=SCHEMES[weights or dtype or "int8"],
                skip=hf_module_patterns(skip, f"{NAME}.modules_to_not_convert"))
    if weights in ("int4", "int2") or dtype in ("int4", "int2"):
        f.notes.append(f"{NAME}: quanto chooses the qint4/qint2 group size per layer (128 when it divides "
                       "in_features > 128, else 96/64/32, else per row); fxquant uses 128 for every layer")
    return f.finish(spec)


@writer("quanto")
def write(spec: Spec) -> dict:
    """transformers' form (``weights``); diffusers reads ``weights_dtype``, the same values."""
    scheme, skip = default_only(spec, "quanto")
    for name, s in SCHEMES.items():
        if scheme == s:
            return {"quant_method": "quanto", "weights": name, "activations": None, "modules_to_not_convert": skip}
    raise ValueError(f"Spec.to_config('quanto'): {scheme} has no QuantoConfig; valid: "
                     f"{', '.join(str(s) for s in SCHEMES.values())}")
