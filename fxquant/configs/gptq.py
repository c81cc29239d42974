"""GPTQ (transformers' ``GPTQConfig``; AutoGPTQ / GPTQModel ``quantize_config`` fields).

| field | fxquant |
|---|---|
| ``bits``, ``group_size``, ``sym`` | ``int<b>wo-<g>`` (4 bits: ``int4wo-<g>-sym``) when ``sym``, else ``uint<b>wo-<g>``; ``group_size=-1`` is one group per output row, ``-ch`` (``int4wo-ch-sym``, ``int8wo-ch``: the ±127.5 grid GPTQ uses, not ``int8wo``'s ±127) |
| ``damp_percent`` | ``GPTQ.damp_percent`` (absent: the config's default 0.1, not ``GPTQ()``'s 0.01) |
| ``desc_act`` | ``GPTQ.act_order`` with static groups: group parameters fitted before the pass, no ``g_idx`` (a note says so) |
| ``act_group_aware`` (GPTQModel's group-aware order, on in transformers 5) | also ``act_order=True`` (the same no-``g_idx`` layout; a note says the order differs in detail) |
| ``true_sequential`` | ``GPTQ.true_sequential`` |
| ``dataset`` | a list of texts: ``Spec.calibration_texts``; ``"wikitext2"`` / ``"c4"`` / ``"c4-new"``: a note (nothing is downloaded: pass ``calibration=``) |
| ``block_name_to_quantize``, ``modules_in_block_to_quantize`` | rules: only the linears of the numbered blocks (``<block>.<i>.<name>``) are quantized, the rest stay float |
| (no block fields) | every linear but ``lm_head`` (optimum quantizes the blocks only; ``lm_head: true``, a GPTQModel field, quantizes it too) |
| ``tokenizer``, ``batch_size``, ``pad_token_id``, ``model_seqlen``, ``cache_block_outputs``, ``module_name_preceding_first_block``, ``backend``, ``use_exllama``, ``disable_exllama``, ``exllama_config``, ``max_input_length``, ``use_cuda_fp16``, ``format`` / ``checkpoint_format``, ``meta``, ``is_marlin_format``, ``model_name_or_path``, ``model_file_base_name`` | notes (calibration plumbing, kernels, storage) |
| ``static_groups`` | a note when ``false`` with ``desc_act`` (fxquant's groups are always static) |
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..methods import GPTQ
from ..schemes import IntX
from ..spec import Spec
from ._base import Fields, hf_module_patterns, reader, writer

NAME = "GPTQConfig"
FIELDS = ("bits", "tokenizer", "dataset", "group_size", "damp_percent", "desc_act", "act_group_aware", "sym",
          "true_sequential", "format", "checkpoint_format", "meta", "backend", "use_cuda_fp16", "model_seqlen",
          "block_name_to_quantize", "module_name_preceding_first_block", "batch_size", "pad_token_id",
          "use_exllama", "disable_exllama", "max_input_length", "exllama_config", "cache_block_outputs",
          "modules_in_block_to_quantize",
          # AutoGPTQ / GPTQModel quantize_config fields seen in config.json files
          "static_groups", "lm_head", "model_name_or_path", "model_file_base_name", "is_marlin_format")
#: the fields every GPTQ-family config (GPTQConfig, and AwqConfig which inherits them in transformers 5)
#: accepts without effect on the weights, with their defaults (no note at the default)
INERT = {"tokenizer": None, "batch_size": 1, "pad_token_id": None, "model_seqlen": None, "cache_block_outputs": True,
         "module_name_preceding_first_block": None, "backend": "auto", "use_exllama": None,
         "disable_exllama": None, "exllama_config": None, "max_input_length": None, "use_cuda_fp16": False,
         "meta": None}
DATASETS = ("wikitext2", "c4", "c4-new")
DEFAULT_DAMP = 0.1  # GPTQConfig's default
LM_HEAD = hf_module_patterns(["lm_head"], NAME)


def skips_lm_head_first(skip: list[str]) -> int:
    """How many leading entries of ``skip`` say "lm_head" (transformers' meaning, always kept float): the
    pattern ``Spec.from_config`` writes, or one written by hand (``"lm_head"``); 0 when none does."""
    if skip[:len(LM_HEAD)] == LM_HEAD:
        return len(LM_HEAD)
    return 1 if skip and skip[0] == "lm_head" else 0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def grid_scheme(f: Fields, bits: int, group: int, symmetric: bool, sym_field: str) -> IntX:
    """The IntX scheme of ``bits`` / ``group_size`` / symmetric (``ValueError`` naming the field)."""
    try:
        return IntX(bits=bits, group_size=group, symmetric=symmetric)
    except ValueError as e:
        raise f.error(sym_field, f"{bits} bits with {sym_field}={f.d.get(sym_field)!r}: {e}") from None


def read_grid(f: Fields) -> tuple[int, int]:
    """``(bits, group_size)`` of a GPTQ-family config."""
    bits = f.take("bits", 4, check=lambda v: _is_int(v) and 1 <= v <= 8, valid="an integer in 1..8 (GPTQ: 2, 3, 4, 8)")
    group = f.take("group_size", 128, check=lambda v: _is_int(v) and (v >= 1 or v == -1),
                   valid="an integer >= 1, or -1 (one group per output row)")
    return bits, group


def read_dataset(f: Fields) -> tuple[str, ...]:
    """``dataset``: a list of texts (the calibration texts) or a data set name (a note)."""
    def ok(v):
        return (isinstance(v, str) and v in DATASETS) or (
            isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(t, str) for t in v))

    valid = "a non-empty list of texts, or one of " + ", ".join(map(repr, DATASETS))
    ds = f.take("dataset", None, check=ok, valid=valid)
    if isinstance(ds, str):
        f.notes.append(f"{f.name}: dataset={ds!r} accepted by name: fxquant downloads no data set; pass the "
                       "calibration inputs with calibration= when quantizing")
        return ()
    return tuple(ds or ())


def read_where(f: Fields, scheme) -> dict:
    """``default`` / ``skip`` / ``rules`` from the block fields (see the module table)."""
    def groups_ok(v):
        return (isinstance(v, (list, tuple)) and len(v) > 0 and all(
            isinstance(g, (list, tuple)) and len(g) > 0 and all(isinstance(n, str) and n for n in g) for g in v))

    block = f.take("block_name_to_quantize", None, check=lambda v: isinstance(v, str) and v != "",
                   valid="a module name such as 'model.layers'")
    groups = f.take("modules_in_block_to_quantize", None, check=groups_ok,
                    valid="a list of lists of module names, e.g. [['self_attn.q_proj'], ['mlp.down_proj']]")
    lm_head = f.take("lm_head", False, choices=(True, False))
    if block is None and groups is None:
        return dict(default=scheme, skip=() if lm_head else LM_HEAD)
    names = [n for g in groups for n in g] if groups else [None]
    rules = [(block_pattern(block, n), scheme) for n in names]
    if groups and len(groups) > 1:
        f.notes.append(f"{f.name}: modules_in_block_to_quantize: the lists' order is the quantization order; "
                       "fxquant's true_sequential already calibrates each layer on the quantized layers before it")
    if lm_head:
        rules.append((LM_HEAD[0], scheme))
    return dict(default=None, rules=rules)


def block_pattern(block: str | None, name: str | None) -> str:
    """The rule pattern of module ``name`` (``None``: every module) in the numbered blocks of ``block``
    (``None``: any numbered block, ``<...>.<i>.<name>``)."""
    head = re.escape(block) + r"\." if block else ""
    return f"re:{head}\\d+\\.{'.*' if name is None else re.escape(name)}"


def read_inert(f: Fields, extra: dict | None = None) -> None:
    """Accept the GPTQ-family fields that do not change the weights (notes when not at default)."""
    defaults = {**INERT, **(extra or {})}
    f.inert(*defaults, defaults=defaults)


@reader("gptq", name=NAME, fields=FIELDS)
def read(f: Fields) -> Spec:
    bits, group = read_grid(f)
    sym = f.take("sym", True, choices=(True, False))
    scheme = grid_scheme(f, bits, group, sym, "sym")
    damp = f.take("damp_percent", DEFAULT_DAMP, check=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                  and 0 < v < 1, valid="a number in (0, 1)")
    desc_act = f.take("desc_act", False, choices=(True, False))
    gar = f.take("act_group_aware", False, choices=(True, False))
    static = f.take("static_groups", None, choices=(True, False))
    if desc_act and static is False:
        f.notes.append(f"{NAME}: desc_act=True with static_groups=False: fxquant's act_order always fits the group "
                       "parameters before the pass (static groups, no g_idx), so the groups differ from a g_idx "
                       "checkpoint's")
    elif desc_act:
        f.notes.append(f"{NAME}: desc_act=True: columns in decreasing Hessian-diagonal order with static groups "
                       "(no g_idx)")
    elif gar:
        f.notes.append(f"{NAME}: act_group_aware=True (GPTQModel's group-aware order): fxquant visits the columns "
                       "in decreasing Hessian-diagonal order with static groups (act_order=True; no g_idx "
                       "either); the order differs from GPTQModel's in detail")
    true_seq = f.take("true_sequential", True, choices=(True, False))
    method = GPTQ(damp_percent=float(damp), act_order=bool(desc_act or gar), true_sequential=true_seq)
    texts = read_dataset(f)
    where = read_where(f, dataclasses.replace(scheme, method=method))
    fmt = f.take("format", "gptq", check=lambda v: isinstance(v, str), valid="a format name (gptq, gptq_v2, ...)")
    ckpt = f.take("checkpoint_format", fmt, check=lambda v: isinstance(v, str), valid="a format name")
    for name, value in (("format", fmt), ("checkpoint_format", ckpt)):
        if value.lower() != "gptq" and name in f:
            f.notes.append(f"{NAME}: {name}={value!r} accepted; it is the checkpoint's storage layout, fxquant "
                           "stores its own")
    read_inert(f, {"is_marlin_format": False, "model_name_or_path": None, "model_file_base_name": None})
    return f.finish(Spec(calibration_texts=texts, **where))


# -- writing -----------------------------------------------------------------------------------------
def one_scheme(spec: Spec, kind: str, method_name: str):
    """The one scheme ``spec`` quantizes with (``ValueError`` when there are several / none or its
    method is not ``method_name``)."""
    schemes = {r.scheme for r in spec.rules} | ({spec.default} if spec.default is not None else set())
    if None in schemes or len(schemes) != 1:
        raise ValueError(f"Spec.to_config({kind!r}): a {kind} config quantizes every chosen layer with one scheme; "
                         f"the spec has {sorted(map(str, schemes))}")
    scheme = next(iter(schemes))
    if scheme.method is None or scheme.method.name != method_name:
        raise ValueError(f"Spec.to_config({kind!r}): {scheme} is not quantized with {method_name.upper()}; valid: "
                         f"a scheme with method={method_name.upper()}(...) (e.g. 'int4wo-128-sym@{method_name}')")
    fmt = scheme.format
    if not isinstance(fmt, IntX) or fmt.axis != 1 or fmt.compute_dtype is not None:
        why = (f" ({fmt} stores a float zero point per group, torchao's int4 layout; a {kind} checkpoint stores an "
               f"integer one: uint4wo-{fmt.group_size}, or int4wo-{fmt.group_size}-sym)"
               if type(fmt).__name__ == "Int4WeightOnly" else "")
        raise ValueError(f"Spec.to_config({kind!r}): {fmt} has no {kind} form{why}; valid: int<b>wo-<g>[-sym], "
                         "uint<b>wo-<g>, <g> = ch (axis 1, no compute_dtype)")
    return scheme


def write_where(spec: Spec, kind: str) -> dict:
    """``block_name_to_quantize`` / ``modules_in_block_to_quantize`` (the inverse of :func:`read_where`)."""
    if spec.default is not None:
        skip = list(spec.skip)
        if skips_lm_head_first(skip) != len(skip) or not skip or spec.rules:
            raise ValueError(f"Spec.to_config({kind!r}): a {kind} config quantizes every linear but lm_head; the "
                             f"spec skips {list(spec.skip)} and has {len(spec.rules)} rules; valid: skip=['lm_head' "
                             "pattern] and no rules, or rules in the numbered blocks only (see docs/configs.md)")
        return {"block_name_to_quantize": None, "modules_in_block_to_quantize": None}
    if spec.skip:
        raise ValueError(f"Spec.to_config({kind!r}): skip {list(spec.skip)} has no {kind} form with block rules")
    blocks, names = set(), []
    for r in spec.rules:
        block, name = _unblock(r.pattern.text)
        if block is False:
            raise ValueError(f"Spec.to_config({kind!r}): rule {r.pattern.text!r} has no {kind} form; valid: "
                             "'re:<block>\\.\\d+\\.<module>' rules (modules_in_block_to_quantize)")
        blocks.add(block)
        names.append(name)
    if len(blocks) != 1 or (None in names and len(names) > 1):
        raise ValueError(f"Spec.to_config({kind!r}): the rules name {len(blocks)} blocks / a whole block and modules; "
                         "valid: one block, its modules or all of it")
    block = blocks.pop()
    if names == [None] and block is None:
        raise ValueError(f"Spec.to_config({kind!r}): a rule for every numbered block has no {kind} form; valid: "
                         "a default scheme with skip=['lm_head']")
    return {"block_name_to_quantize": block, "modules_in_block_to_quantize": None if names == [None] else [names]}


def _unblock(pattern: str) -> tuple[Any, str | None]:
    """``(block or None, module or None)`` of a :func:`block_pattern`, else ``(False, None)``."""
    body = pattern.removeprefix("re:")
    head, sep, tail = body.partition(r"\d+\.")
    if not pattern.startswith("re:") or not sep:
        return False, None
    block = _unescape(head[:-2]) if head.endswith(r"\.") else (None if head == "" else False)
    name = None if tail == ".*" else _unescape(tail)
    if block is False or block_pattern(block, name) != pattern:
        return False, None
    return block, name


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


@writer("gptq")
def write(spec: Spec) -> dict:
    scheme = one_scheme(spec, "gptq", "gptq")
    m = scheme.method
    if m.block_size != 128:
        raise ValueError(f"Spec.to_config('gptq'): GPTQ.block_size={m.block_size} has no GPTQConfig field; valid: 128")
    return {"quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.symmetric,
            "damp_percent": m.damp_percent, "desc_act": m.act_order, "act_group_aware": False,
            "true_sequential": m.true_sequential, "dataset": list(spec.calibration_texts) or None,
            **write_where(spec, "gptq")}
