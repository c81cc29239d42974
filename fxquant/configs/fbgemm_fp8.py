"""FBGEMM fp8 (transformers' ``FbgemmFp8Config``): float8 e4m3 weights per output row, activations
quantized per row (per token) on every call with their amax bounded.

| field | fxquant |
|---|---|
| (always) | ``float8dq-row``: e4m3fn weights with an fp32 scale per row, e4m3fn activations per row |
| ``activation_scale_ub`` | the scheme's ``activation_scale_ub`` (default 1200.0; another bound is ``float8dq-row-ub<bound>``) |
| ``modules_to_not_convert`` | ``Spec.skip`` (``None``: ``lm_head``, as transformers skips the output embedding) |
"""
from __future__ import annotations

import math

from ..schemes import Float8DynamicActivation
from ..spec import Spec
from ._base import Fields, default_only, hf_module_patterns, reader, writer

NAME = "FbgemmFp8Config"
FIELDS = ("activation_scale_ub", "modules_to_not_convert")
DEFAULT_SKIP = ["lm_head"]
DEFAULT_UB = 1200.0


def _bound(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and v > 0


@reader("fbgemm_fp8", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    ub = f.take("activation_scale_ub", DEFAULT_UB, check=_bound, valid="a number > 0 (default 1200.0)")
    skip = f.take("modules_to_not_convert", DEFAULT_SKIP)
    scheme = Float8DynamicActivation(granularity="row", activation_scale_ub=float(ub))
    spec = Spec(default=scheme, skip=hf_module_patterns(skip, f"{NAME}.modules_to_not_convert"))
    return f.finish(spec)


@writer("fbgemm_fp8")
def write(spec: Spec) -> dict:
    scheme, skip = default_only(spec, "fbgemm_fp8")
    if not (isinstance(scheme, Float8DynamicActivation) and scheme.granularity == "row" and scheme.method is None
            and scheme.compute_dtype is None):
        raise ValueError(f"Spec.to_config('fbgemm_fp8'): {scheme} has no FbgemmFp8Config; valid: "
                         "float8dq-row[-ub<bound>]")
    return {"quant_method": "fbgemm_fp8", "activation_scale_ub": scheme.activation_scale_ub,
            "modules_to_not_convert": skip}
