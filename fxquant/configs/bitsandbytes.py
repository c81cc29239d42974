"""bitsandbytes (transformers' ``BitsAndBytesConfig``, diffusers' and the ``bnb_4bit_*`` fields).

| field | fxquant |
|---|---|
| ``load_in_8bit`` | ``bnb8-<llm_int8_threshold>`` on every linear: bitsandbytes' own LLM.int8 layout (int8 codes, fp32 row absmax ``SCB``; threshold 0 = no outlier columns) |
| ``load_in_4bit`` + ``bnb_4bit_quant_type`` nf4 / fp4 | ``nf4-64`` / ``fp4-64`` (bitsandbytes' blocksize 64) |
| ``bnb_4bit_use_double_quant`` | ``+dq`` (absmax quantized again, blocks of 256) |
| ``bnb_4bit_compute_dtype`` | the scheme's ``compute_dtype`` |
| ``llm_int8_skip_modules`` | ``Spec.skip`` (default: ``lm_head``, as transformers keeps the output head) |
| ``bnb_4bit_quant_storage``, ``llm_int8_enable_fp32_cpu_offload`` | notes (storage dtype / placement only) |
| ``llm_int8_has_fp16_weight`` | ``False`` only (training with fp16 master weights) |
"""
from __future__ import annotations

import torch

from ..schemes import FP4, NF4, Bnb8
from ..spec import Spec
from ._base import Fields, hf_module_patterns, reader, torch_dtype, writer

NAME = "BitsAndBytesConfig"
FIELDS = ("load_in_8bit", "load_in_4bit", "_load_in_8bit", "_load_in_4bit", "llm_int8_threshold",
          "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
          "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
          "bnb_4bit_quant_storage")
COMPUTE = ("float32", "bfloat16", "float16")
STORAGE = ("uint8", "int8", "float16", "bfloat16", "float32")
DEFAULT_SKIP = ["lm_head"]


def _flag(f: Fields, name: str) -> bool:
    value = f.take(name, None, choices=(True, False))
    private = f.take("_" + name, None, choices=(True, False))  # to_dict() writes both
    if value is not None and private is not None and private != value:
        raise f.error(name, f"{value!r} disagrees with _{name}={private!r}")
    return bool(value if value is not None else private)


@reader("bitsandbytes", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    eight, four = _flag(f, "load_in_8bit"), _flag(f, "load_in_4bit")
    if eight and four:
        raise f.error("load_in_4bit", "load_in_8bit and load_in_4bit are mutually exclusive; valid: one of them")
    if not (eight or four):
        raise f.error("load_in_4bit", "neither load_in_8bit nor load_in_4bit is set: nothing to quantize; "
                      "valid: load_in_8bit=True or load_in_4bit=True")
    threshold = f.take("llm_int8_threshold", 6.0, check=lambda v: isinstance(v, (int, float)) and
                       not isinstance(v, bool) and v >= 0, valid="a number >= 0 (0: no outlier columns)")
    skip = f.d.get("llm_int8_skip_modules")
    skip = DEFAULT_SKIP if skip is None else skip
    f.used.add("llm_int8_skip_modules")
    quant_type = f.take("bnb_4bit_quant_type", "fp4", choices=("fp4", "nf4"))
    double = f.take("bnb_4bit_use_double_quant", False, choices=(True, False))
    compute = f.take("bnb_4bit_compute_dtype", None)
    f.inert("llm_int8_has_fp16_weight", "llm_int8_enable_fp32_cpu_offload",
            defaults={"llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False},
            unless={"llm_int8_has_fp16_weight": (False,)})
    storage = f.take("bnb_4bit_quant_storage", None)
    if storage is not None and str(storage).removeprefix("torch.") != "uint8":
        torch_dtype(storage, f"{NAME}.bnb_4bit_quant_storage", [getattr(torch, s) for s in STORAGE])
        f.notes.append(f"{NAME}: bnb_4bit_quant_storage={storage!r} accepted; the packed bytes are the same "
                       "(fxquant stores them as uint8)")
    if eight:  # bnb8: what Linear8bitLt stores and computes (outlier columns only when threshold > 0)
        scheme = Bnb8(threshold=float(threshold))
        for name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            if f.d.get(name) not in (None, False, "fp4", "float32"):
                f.notes.append(f"{NAME}: {name}={f.d[name]!r} has no effect with load_in_8bit")
    else:
        dtype = None if compute is None else torch_dtype(compute, f"{NAME}.bnb_4bit_compute_dtype",
                                                         [getattr(torch, c) for c in COMPUTE])
        cls = NF4 if quant_type == "nf4" else FP4
        scheme = cls(blocksize=64, double_quant=double, compute_dtype=dtype)
        if f.d.get("llm_int8_threshold") not in (None, 6.0):
            f.notes.append(f"{NAME}: llm_int8_threshold has no effect with load_in_4bit")
    spec = Spec(default=scheme, skip=hf_module_patterns(skip, f"{NAME}.llm_int8_skip_modules"))
    return f.finish(spec)


@writer("bitsandbytes")
def write(spec: Spec) -> dict:
    from ._base import default_only

    scheme, skip = default_only(spec, "bitsandbytes")
    d = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": skip}
    if isinstance(scheme, Bnb8) and scheme.compute_dtype is None and scheme.method is None:
        return {**d, "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": scheme.threshold}
    if isinstance(scheme, (NF4, FP4)) and scheme.blocksize == 64 and scheme.method is None:
        dtype = scheme.compute_dtype
        return {**d, "load_in_8bit": False, "load_in_4bit": True, "bnb_4bit_quant_type": scheme.quant_type,
                "bnb_4bit_use_double_quant": scheme.double_quant, "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_compute_dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
    raise ValueError(f"Spec.to_config('bitsandbytes'): {scheme} has no BitsAndBytesConfig; valid: bnb8[-<t>] "
                     "(bitsandbytes' 8-bit layout; llm.int8 / int8dq store bf16 scales), nf4-64[+dq], fp4-64[+dq]")
