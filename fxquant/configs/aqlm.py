"""AQLM (transformers' ``AqlmConfig``; the ``quantization_config`` of the aqlm library's checkpoints).

| field | fxquant |
|---|---|
| ``num_codebooks`` (1), ``nbits_per_codebook`` (16), ``in_group_size`` (8), ``out_group_size`` (1) | ``aqlm-<num_codebooks>x<nbits_per_codebook>-g<in_group_size>[-o<out_group_size>]`` on every linear (defaults: AqlmConfig's, ``aqlm-1x16-g8``) |
| ``linear_weights_not_to_quantize`` (full names of weight tensors, ``"lm_head.weight"``) | ``Spec.skip``: one ``re:`` pattern naming the module of each ``<module>.weight`` entry (full match on the name or, as every fxquant pattern, a dotted suffix of it; an entry without ``.weight`` names the module itself); entries naming other tensors (norms, embeddings: the published checkpoints list them) skip nothing |

Codebooks and scales are fp16, as in the published checkpoints (the checkpoints hold them in the model
dtype; ``load_aqlm`` keeps whatever dtype they have).  No method is attached: the scheme's own fit (residual
k-means, beam search, least squares on the weight error) quantizes a float model; ``@aqlm`` with
``AQLM(calibrated=True)`` fits the output error instead.  The writer emits the five fields for a spec whose
default is an fp16 ``aqlm`` scheme and whose skips are module names; each skipped module is listed twice, as
``<module>.weight`` (the aqlm library's and transformers 4's meaning) and as ``<module>`` (transformers 5.25's
``replace_with_aqlm_linear`` matches the list against module names, so ``lm_head.weight`` alone would not keep
its ``lm_head`` in float).
"""
from __future__ import annotations

import re

from ..schemes import AQLM
from ..spec import Pattern, Spec
from ._base import Fields, reader, writer

NAME = "AqlmConfig"
FIELDS = ("in_group_size", "out_group_size", "num_codebooks", "nbits_per_codebook", "linear_weights_not_to_quantize")


def _int(f: Fields, field: str, default: int, lo: int, hi: int | None = None) -> int:
    valid = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
    return f.take(field, default, check=lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo
                  and (hi is None or v <= hi), valid=valid)


def _skip(f: Fields) -> list[str]:
    """``linear_weights_not_to_quantize`` as one ``re:`` skip pattern naming the modules exactly (one entry, so
    the many norm / embedding names of a published checkpoint make no "matched no linear layer" warning each;
    the warning still comes when no listed module is a linear)."""
    value = f.take("linear_weights_not_to_quantize", [], check=lambda v: isinstance(v, (list, tuple)) and
                   all(isinstance(e, str) and e for e in v), valid="a list of weight names such as 'lm_head.weight'")
    modules = list(dict.fromkeys(entry.removesuffix(".weight") for entry in value))
    return [_names_pattern(modules)] if modules else []


def _names_pattern(modules: list[str]) -> str:
    return "re:(?:" + "|".join(re.escape(m) for m in modules) + ")"


def _pattern_names(pattern: str) -> list[str] | None:
    """The module names :func:`_names_pattern` made ``pattern`` from (``None`` for any other pattern)."""
    if not (pattern.startswith("re:(?:") and pattern.endswith(")")):
        return None
    names = [re.sub(r"\\(.)", r"\1", part) for part in re.split(r"(?<!\\)\|", pattern[len("re:(?:"):-1])]
    return names if _names_pattern(names) == pattern else None


@reader("aqlm", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    scheme = AQLM(num_codebooks=_int(f, "num_codebooks", 1, 1),
                  nbits_per_codebook=_int(f, "nbits_per_codebook", 16, 1, 16),
                  in_group_size=_int(f, "in_group_size", 8, 1), out_group_size=_int(f, "out_group_size", 1, 1))
    return f.finish(Spec(default=scheme, skip=_skip(f)))


@writer("aqlm")
def write(spec: Spec) -> dict:
    scheme = spec.default
    if spec.rules:
        raise ValueError("Spec.to_config('aqlm'): per-layer rules have no AqlmConfig form; valid: a default aqlm "
                         "scheme and a skip list of module names")
    if not isinstance(scheme, AQLM) or scheme.param_dtype != AQLM().param_dtype or scheme.compute_dtype is not None:
        raise ValueError(f"Spec.to_config('aqlm'): {scheme} has no AqlmConfig; valid: aqlm-<M>x<B>-g<in>[-o<out>] "
                         "(fp16 codebooks, no compute_dtype)")
    skip = []
    for s in spec.skip:
        names = [s] if Pattern(s).kind == "exact" else _pattern_names(s)
        if names is None:
            raise ValueError(f"Spec.to_config('aqlm'): skip pattern {s!r} has no AqlmConfig form; valid: module names "
                             "(written as '<module>.weight')")
        skip.extend(names)
    # weight names (the aqlm library's meaning), then module names (transformers 5)
    skip = [f"{n}.weight" for n in skip] + skip
    return {"quant_method": "aqlm", "num_codebooks": scheme.num_codebooks,
            "nbits_per_codebook": scheme.nbits_per_codebook, "in_group_size": scheme.in_group_size,
            "out_group_size": scheme.out_group_size, "linear_weights_not_to_quantize": skip}
