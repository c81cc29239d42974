"""EETQ (transformers' ``EetqConfig``): int8 weight-only, per output channel.

| field | fxquant |
|---|---|
| ``weights`` | ``"int8"`` (the only value EETQ has) -> ``int8wo`` (symmetric, one scale per output row) |
| ``modules_to_not_convert`` | ``Spec.skip`` (``None``: ``lm_head``, as transformers skips the output embedding) |

EETQ scales each row by ``absmax / 127`` in fp16; fxquant's ``int8wo`` scale is ``absmax / 127``
rounded up to bf16, so a code can differ by one step where the division lands near a half.
"""
from __future__ import annotations

from ..schemes import Int8WeightOnly
from ..spec import Spec
from ._base import Fields, default_only, hf_module_patterns, reader, writer

NAME = "EetqConfig"
FIELDS = ("weights", "modules_to_not_convert")
DEFAULT_SKIP = ["lm_head"]


@reader("eetq", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    f.take("weights", "int8", choices=("int8",))
    skip = f.take("modules_to_not_convert", DEFAULT_SKIP)
    spec = Spec(default=Int8WeightOnly(), skip=hf_module_patterns(skip, f"{NAME}.modules_to_not_convert"))
    return f.finish(spec)


@writer("eetq")
def write(spec: Spec) -> dict:
    scheme, skip = default_only(spec, "eetq")
    if scheme != Int8WeightOnly():
        raise ValueError(f"Spec.to_config('eetq'): {scheme} has no EetqConfig; valid: int8wo")
    return {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": skip}
