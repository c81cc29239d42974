"""AWQ (transformers' ``AwqConfig``; AutoAWQ's ``quant_config``).

| field | fxquant |
|---|---|
| ``bits``, ``group_size`` | ``<b>`` bits, groups of ``<g>`` (``-1``: one group per output row, ``-ch``) |
| ``zero_point`` | ``true`` (default): ``uint<b>wo-<g>`` (min / max with an offset; fxquant stores the offset as a bf16 value, not an integer zero point); ``false``: ``int<b>wo-<g>`` (4 bits: ``int4wo-<g>-sym``) |
| (the method) | ``AWQ()`` (AutoAWQ's grid: ``n_grid=20``, ``max_shrink=0.5``, clip search on) |
| ``modules_to_not_convert`` | ``Spec.skip`` with transformers' meaning, after ``lm_head`` (always kept in float, as transformers does) |
| ``dataset`` | as GPTQConfig's: a list of texts is ``Spec.calibration_texts``, a data set name a note |
| ``block_name_to_quantize``, ``modules_in_block_to_quantize`` | as GPTQConfig's (rules in the numbered blocks) |
| ``version`` / ``format`` (gemm, gemv, gemv_fast, llm-awq, exllama, ipex, marlin), ``backend``, ``do_fuse``, ``fuse_max_seq_len``, ``modules_to_fuse``, ``exllama_config`` | notes (kernels, fusing, storage) |
| the GPTQ fields transformers 5 ``AwqConfig`` inherits: ``sym`` (``zero_point`` decides), ``damp_percent``, ``desc_act``, ``act_group_aware``, ``true_sequential``, ``tokenizer``, ``batch_size``, ... | notes (AWQ does not use them) |
"""
from __future__ import annotations

import dataclasses

from ..methods import AWQ
from ..spec import Spec
from . import gptq
from ._base import Fields, hf_key, hf_module_patterns, names, reader, writer

NAME = "AwqConfig"
_GPTQ_ONLY = ("static_groups", "lm_head", "model_name_or_path", "model_file_base_name", "is_marlin_format")
FIELDS = tuple(f for f in gptq.FIELDS if f not in _GPTQ_ONLY) + (
    "zero_point", "modules_to_not_convert", "version", "do_fuse", "fuse_max_seq_len", "modules_to_fuse")
FORMATS = ("gemm", "gemv", "gemv_fast", "llm-awq", "exllama", "ipex", "marlin")
#: GPTQ algorithm fields AwqConfig inherits in transformers 5 (AWQ does not use them), with their defaults
UNUSED = {"sym": True, "damp_percent": gptq.DEFAULT_DAMP, "desc_act": False, "act_group_aware": True,
          "true_sequential": True}


@reader("awq", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    bits, group = gptq.read_grid(f)
    zero_point = f.take("zero_point", True, choices=(True, False))
    scheme = gptq.grid_scheme(f, bits, group, not zero_point, "zero_point")
    scheme = dataclasses.replace(scheme, method=AWQ())
    texts = gptq.read_dataset(f)
    where = gptq.read_where(f, scheme)
    skip = names(f.take("modules_to_not_convert", None), f"{NAME}.modules_to_not_convert")
    where["skip"] = (gptq.LM_HEAD if where["default"] is not None else []) + \
        hf_module_patterns(skip, f"{NAME}.modules_to_not_convert")
    for field in ("format", "version"):
        value = f.take(field, "gemm", choices=FORMATS)
        if value != "gemm":
            f.notes.append(f"{NAME}: {field}={value!r} accepted; it is the checkpoint's kernel layout, fxquant "
                           "stores its own")
    for field, default in UNUSED.items():
        value = f.take(field, default)
        if value != default:
            f.notes.append(f"{NAME}: {field}={value!r} accepted; AWQ does not use it (zero_point chooses the grid)")
    f.inert("checkpoint_format")  # GPTQConfig's alias of format; AwqConfig.to_dict drops it
    gptq.read_inert(f, {"do_fuse": None, "fuse_max_seq_len": None, "modules_to_fuse": None, "backend": "auto"})
    return f.finish(Spec(calibration_texts=texts, **where))


@writer("awq")
def write(spec: Spec) -> dict:
    if spec.rules or spec.default is None:
        raise ValueError("Spec.to_config('awq'): per-layer rules have no AwqConfig form; valid: a default scheme "
                         "and a skip list (lm_head included)")
    scheme = gptq.one_scheme(spec, "awq", "awq")
    if scheme.method != AWQ():
        raise ValueError(f"Spec.to_config('awq'): {scheme.method} has no AwqConfig fields; valid: AWQ() "
                         "(n_grid=20, max_shrink=0.5, clip=True)")
    skip = list(spec.skip)
    head = gptq.skips_lm_head_first(skip)
    if not head:
        raise ValueError("Spec.to_config('awq'): AwqConfig always keeps lm_head in float; valid: a spec whose "
                         "skip list starts with 'lm_head' (or the pattern Spec.from_config writes for it)")
    keys = [hf_key(s) for s in skip[head:]]
    if None in keys:
        raise ValueError(f"Spec.to_config('awq'): skip {skip} has no AwqConfig form; valid: transformers module "
                         "keys (as Spec.from_config reads modules_to_not_convert)")
    return {"quant_method": "awq", "bits": scheme.bits, "group_size": scheme.group_size,
            "zero_point": not scheme.symmetric, "version": "gemm", "modules_to_not_convert": keys or None,
            "dataset": list(spec.calibration_texts) or None}
