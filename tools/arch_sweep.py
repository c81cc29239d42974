#!/usr/bin/env python
"""Robustness sweep of fxquant over tiny random-weight Hugging Face architectures.

    python tools/arch_sweep.py --markdown                      # every arch x float32 / bfloat16 x 8 specs
    python tools/arch_sweep.py --archs gpt2 mixtral --dtypes float32 --specs int4wo-64@awq
    python tools/arch_sweep.py --worker t5 bfloat16 --specs nf4   # one arch in this process: JSON lines

Protocol: each architecture of ``ARCHS`` (2 layers, hidden 128, vocab 512, seeded random weights;
``llama_odd`` is 100 / 200 / 300 wide: partial groups everywhere) runs in its own worker process per
dtype (``--jobs`` at once, one torch thread each), which writes a JSON line per case to ``--out``.
Each spec (``skip=["lm_head"]``) quantizes a fresh copy of the float model with ``fxquant.quantize_``
(GPTQ / AWQ calibrated on 4 batches of 2 x 96 random tokens, wider than the batch-1 trace); it passes if

- quantize_ traced with torch.export and quantized every linear site but lm_head; any other >= 2-D
  non-embedding parameter left float is a 3+-D one the report's notes count (MoE experts: ok, noted);
- logits (1 x 16 tokens) are finite and their relative error against float is within ``TOL[spec]`` x
  that of an independent round-to-nearest fake quantization of the same sites (int8 specs: int8
  per-row absmax; others: uint4 min-max per group, the spec's size or 64), + ``FLOOR[dtype]``;
  a 3 x 5 batch runs, finite;
- greedy ``generate`` (8 tokens) with the dynamic cache, the static cache, and a batch of 2 whose row 0
  is left padded runs, finite, its step logits within max(``CACHE_LIM[dtype]``, 10 x the float model's
  difference) of one forward over the generated sequence (row 0 alone and unpadded for the padded batch);
- ``fxquant.compile`` of the float model (``use_cache=False``) makes the same per-layer decisions (report
  rows), leaves the float model untouched, and its outputs (1 x 16, 1 x 5) equal quantize_'s within
  ``COMPILE_LIM[dtype]`` (GPT-2's AWQ included: input scales on Conv1D weights).

The table: per arch and spec ``ok`` or the first failed check (the dtype named when not both; "+": more
failed), each failure numbered with its messages and a one-case repro command below; the notes column
names the report notes seen (e.g. "experts float (note)").

Latest results (AMD Zen 4, 2 threads; torch 2.13.0, transformers 5.25.0), ``--jobs 2``:

- ``python tools/arch_sweep.py --markdown`` (2026-12-07, before MoE experts were quantized and before
  the MoE families olmoe / gpt_oss / phimoe / granitemoe / llama4 were added): 26 archs x 2 dtypes x 8
  specs, 416 cases, 632 s wall: all ok.  Closest to a bound: logit error 0.87 of it (bert_cls float32
  int8wo); generate's step logits 0.23 of theirs; compile's outputs equal quantize_'s exactly.
- ``python tools/arch_sweep.py --archs mixtral qwen2_moe qwen3_moe olmoe gpt_oss phimoe granitemoe llama4
  --markdown`` (2026-12-07, expert weights quantized by every spec, GPTQ / AWQ expert by expert; 128 cases,
  252 s): every case ok but one, granitemoe float32 int8wo, logit error 0.0308 against a bound of 0.0143
  (reference 0.0098).  That is a routing flip, not a wrong layer: quantizing layer 0's v_proj alone already
  gives 0.028 (reference 0.0063) while that layer's output matches its dequantized weight (0.0068 relative,
  the weight's own error), and layer 0's router then picks another expert for some token (its logits differ
  by 0.0019: a near tie in a random model); it stays with fp32 compute (0.0304).  Note: "layers grow" (4-row
  routers padded to row tiles).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's fxquant, if not installed

SPECS = ["int8wo", "int4wo-64", "int4wo-128", "nf4", "int8dq", "uint4wo-64@hqq", "int4wo-64@gptq", "int4wo-64@awq"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
V = 512
L = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         vocab_size=V, max_position_embeddings=128)
MHA = {**L, "num_key_value_heads": 4}
GPT = dict(n_embd=128, n_layer=2, n_head=4, vocab_size=V, n_positions=128)
NOKV = {k: v for k, v in L.items() if k != "num_key_value_heads"}
#: name -> (model class, config class, config kwargs, kind: causal / encoder / seq2seq)
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", L, "causal"),
    "llama_odd": ("LlamaForCausalLM", "LlamaConfig", {**L, "hidden_size": 100, "intermediate_size": 200,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300}, "causal"),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**L, "sliding_window": 64}, "causal"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", L, "causal"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {**L, "head_dim": 32}, "causal"),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", MHA, "causal"),
    "phi": ("PhiForCausalLM", "PhiConfig", MHA, "causal"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", GPT, "causal"),
    "opt": ("OPTForCausalLM", "OPTConfig", {**NOKV, "ffn_dim": 256, "word_embed_proj_dim": 128}, "causal"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", NOKV, "causal"),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=V, max_position_embeddings=128), "causal"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**L, "head_dim": 32}, "causal"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {**L, "head_dim": 32, "sliding_window": 8}, "causal"),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {**L, "head_dim": 32, "sliding_window": 8}, "causal"),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", L, "causal"),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {**L, "num_local_experts": 4, "num_experts_per_tok": 2},
                "causal"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {**L, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256}, "causal"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {**L, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 128}, "causal"),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", {**L, "num_experts": 4, "num_experts_per_tok": 2}, "causal"),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", {**L, "num_local_experts": 4, "num_experts_per_tok": 2,
                "head_dim": 32, "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}, "causal"),
    "phimoe": ("PhimoeForCausalLM", "PhimoeConfig", {**L, "num_local_experts": 4, "num_experts_per_tok": 2}, "causal"),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", {**L, "num_local_experts": 4,
                   "num_experts_per_tok": 2}, "causal"),
    "llama4": ("Llama4ForCausalLM", "Llama4TextConfig", {**L, "num_local_experts": 4, "num_experts_per_tok": 1,
               "head_dim": 32, "intermediate_size_mlp": 256}, "causal"),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", {**GPT, "rotary_dim": 16}, "causal"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(hidden_size=128, n_layer=2, n_head=4, vocab_size=V), "causal"),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig", GPT, "causal"),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", L, "causal"),
    "starcoder2": ("Starcoder2ForCausalLM", "Starcoder2Config", L, "causal"),
    "bert": ("BertModel", "BertConfig", NOKV, "encoder"),
    "bert_cls": ("BertForSequenceClassification", "BertConfig", {**NOKV, "num_labels": 3}, "encoder"),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
           vocab_size=V, decoder_start_token_id=0), "seq2seq"),
}
#: logit error bound: TOL.get(spec, 1.5) x the round-to-nearest reference's error + FLOOR[dtype]; the RTN
#: formats track the reference, other grids and methods less closely, int8dq also rounds activations
TOL = {"int8wo": 1.25, "int4wo-64": 1.25, "int4wo-128": 1.25, "int8dq": 4.0}
FLOOR = {"float32": 2e-3, "bfloat16": 1e-2}
#: generate's steps vs a full forward (a quantized layer rounds differently at M = 1 and M = T rows) ...
CACHE_LIM = {"float32": 1e-2, "bfloat16": 5e-2}
#: ... and compile vs quantize_ (the same kernels)
COMPILE_LIM = {"float32": 1e-4, "bfloat16": 1e-2}
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
           return_dict_in_generate=True)


# ---- models and inputs --------------------------------------------------------------------------
def make_model(arch: str, dtype: torch.dtype):
    model_cls, config_cls, kwargs, kind = ARCHS[arch]
    cfg = getattr(transformers, config_cls)(**kwargs)
    if kind != "encoder":
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).to(dtype).eval(), kind


def inputs(kind: str, vocab: int, b: int = 1, t: int = 16, seed: int = 1, decoder_t: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(input_ids=torch.randint(3, vocab, (b, t), generator=g))
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.randint(3, vocab, (b, decoder_t), generator=g)
    return kw


def logits(model, **kw) -> torch.Tensor:
    """The model's main output: logits, else the last hidden state."""
    with torch.no_grad():
        o = model(**kw)
    if isinstance(o, torch.Tensor):
        return o
    return next((getattr(o, k) for k in ("logits", "last_hidden_state") if getattr(o, k, None) is not None), o[0])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def attempt(fn, *args, **kw):
    """``(fn(...), None)``, or ``(None, "Error: message")`` if it raised."""
    try:
        return fn(*args, **kw), None
    except Exception as e:  # noqa: BLE001 - every failure is a result of the sweep
        frames = traceback.extract_tb(e.__traceback__)
        at = next((f for f in reversed(frames) if "/fxquant/" in f.filename), frames[-1])
        return None, f"{type(e).__name__}: {str(e)[:400]} (at {Path(at.filename).name}:{at.lineno})"


# ---- the independent round-to-nearest reference ---------------------------------------------------
def fake_int8(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return (w / s).round().clamp(-127, 127) * s


def fake_uint4(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    x = torch.cat([w, w[:, -1:].expand(n, -k % group)], 1).reshape(n, -1, group)  # last group: edge padded
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = (hi - lo).clamp_min(1e-10) / 15
    return (((x - lo) / s).round().clamp(0, 15) * s + lo).reshape(n, -1)[:, :k]


def reference_error(fm, rep, spec: str, ex: dict, float_out: torch.Tensor) -> float:
    """Logit error of the float model with the weights of ``rep``'s quantized sites fake-quantized."""
    group = re.search(r"-(\d+)", spec)
    fn = fake_int8 if spec.startswith("int8") else lambda w: fake_uint4(w, int(group.group(1)) if group else 64)
    m = copy.deepcopy(fm)
    with torch.no_grad():
        for row in rep.quantized:
            if row.shape is not None and len(row.shape) == 3:  # experts: the row's E x N x K
                w = m.get_parameter(row.fqn)
                kn = tuple(w.shape) != tuple(row.shape)  # stored [E, K, N] (gpt-oss, Llama 4)
                for e in range(w.shape[0]):
                    w32 = w[e].detach().float()
                    w[e].copy_(fn(w32.T).T if kn else fn(w32))
                continue
            path = row.fqn if row.fqn.endswith(".weight") else row.fqn + ".weight"
            w = m.get_parameter(path)
            conv1d = type(m.get_submodule(path.rsplit(".", 1)[0])).__name__ == "Conv1D"  # GPT-2: [K, N]
            w32 = w.detach().float()
            w.copy_(fn(w32.T).T if conv1d else fn(w32))
    return rel(logits(m, **ex), float_out)


# ---- checks run in the worker ---------------------------------------------------------------------
def step_vs_full(model, kind: str, prompt: torch.Tensor, sequences: torch.Tensor, steps: torch.Tensor) -> float:
    """Generate's per-step logits vs one forward over the prompt and the generated tokens (no cache)."""
    if kind == "seq2seq":
        full = logits(model, input_ids=prompt, decoder_input_ids=sequences)[:, :-1]
    else:
        full = logits(model, input_ids=sequences)[:, prompt.shape[1] - 1:-1]
    return rel(steps, full)


def generate_checks(model, kind: str, vocab: int) -> dict:
    """mode -> {"diff": per-step logits vs full forward} or {"error": ...}; modes dynamic, static, padded."""
    def run(mode):
        if mode == "padded":  # batch 2, row 0 left padded by 5; compared alone and unpadded
            ids = inputs(kind, vocab, b=2, seed=2)["input_ids"]
            mask = torch.ones_like(ids)
            ids[0, :5], mask[0, :5] = 0, 0
            with torch.no_grad():
                g = model.generate(input_ids=ids, attention_mask=mask, **GEN)
            seq = g.sequences[:1] if kind == "seq2seq" else g.sequences[:1, 5:]
            prompt, steps = ids[:1, 5:], torch.stack(g.logits, 1)[:1]
        else:
            prompt = inputs(kind, vocab)["input_ids"]
            with torch.no_grad():
                g = model.generate(input_ids=prompt, **GEN, **({"cache_implementation": "static"}
                                                             if mode == "static" else {}))
            seq, steps = g.sequences, torch.stack(g.logits, 1)
        return dict(finite=bool(torch.isfinite(steps).all()), diff=step_vs_full(model, kind, prompt, seq, steps))

    runs = {mode: attempt(run, mode) for mode in ("dynamic", "static", "padded")}
    return {mode: res or dict(error=err) for mode, (res, err) in runs.items()}


def run_case(fm, kind: str, spec_str: str, ex: dict, float_out: torch.Tensor, calib: list) -> dict:
    import fxquant
    from fxquant.inplace import planning_kwargs
    from fxquant.modules import PackedWeight

    spec = fxquant.Spec(default=spec_str, skip=["lm_head"])
    qkw = dict(calibration=calib) if re.search(r"@(gptq|awq)", spec_str) else {}
    vocab, r = fm.config.vocab_size, {}
    m, r["quantize"] = attempt(fxquant.quantize_, copy.deepcopy(fm), spec, example_kwargs=ex, **qkw)
    if m is None:
        return r
    rep = fxquant.report(m)
    embeddings = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Embedding)}
    r.update(frontend=rep.frontend, sites=len(rep.rows), notes=rep.notes,
             skipped=[f"{x.fqn} ({x.reason})" for x in rep.skipped if not x.fqn.startswith("lm_head")
                      and "take rtn, hqq, gptq and awq" not in x.reason],
             experts_float=[x.fqn for x in rep.skipped if "take rtn, hqq, gptq and awq" in x.reason],
             float_left={n: p.ndim for n, p in m.named_parameters() if p.ndim >= 2 and not n.startswith("lm_head")
                         and not n.endswith("bias")  # gpt-oss: per-expert biases [E, N]
                         and not isinstance(p, PackedWeight) and n.rsplit(".", 1)[0] not in embeddings})
    outs, r["forward"] = attempt(lambda: (logits(m, **ex), logits(m, **inputs(kind, vocab, b=3, t=5, seed=5))))
    if outs is None:
        return r
    r.update(finite=all(bool(torch.isfinite(o).all()) for o in outs), err=rel(outs[0], float_out),
             ref_err=reference_error(fm, rep, spec_str.split("@")[0], ex, float_out))
    if kind != "encoder":
        r["gen"] = generate_checks(m, kind, vocab)
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    ckw = planning_kwargs(fm, ex)  # use_cache=False where the forward takes it (by name or **kwargs)
    qm, r["compile"] = attempt(fxquant.compile, fm, spec, example_kwargs=ckw, **qkw)
    if qm is not None:
        a, b = ([(x.fqn, x.status, x.scheme, x.rule, x.reason, x.method) for x in rp.rows]
                for rp in (rep, fxquant.report(qm)))
        r["compile_rows_differ"] = [[x, y] for x, y in zip(a, b) if x != y] or (len(a) != len(b))
        r["compile_touched_float"] = any(not torch.equal(v, before[k]) for k, v in fm.state_dict().items())
        short = {**inputs(kind, vocab, t=5, seed=5), **{k: v for k, v in ckw.items() if k == "use_cache"}}
        r["compile_diff"] = {}
        for name, kw in (("1x16", ckw), ("1x5", short)):
            c, e = attempt(logits, qm, **kw)
            r["compile_diff"][name] = e or rel(c, logits(m, **kw))
    return r


def worker(arch: str, dtype_name: str, specs: list[str]) -> None:
    torch.set_num_threads(1)
    fm, kind = make_model(arch, DTYPES[dtype_name])
    vocab = fm.config.vocab_size
    ex = inputs(kind, vocab)
    float_out = logits(fm, **ex)
    base = dict(arch=arch, dtype=dtype_name)
    print(json.dumps({**base, "spec": "float", "finite": bool(torch.isfinite(float_out).all()),
                      "gen": generate_checks(fm, kind, vocab) if kind != "encoder" else None}), flush=True)
    calib = [inputs(kind, vocab, b=2, t=96, seed=100 + i, decoder_t=96) for i in range(4)]
    for spec in specs:
        t0 = time.time()
        r, err = attempt(run_case, fm, kind, spec, ex, float_out, calib)
        r = r or dict(harness=err)
        print(json.dumps({**base, "spec": spec, **r, "seconds": round(time.time() - t0, 1)}, default=str), flush=True)


# ---- verdicts and the table -----------------------------------------------------------------------
def note_label(note: str) -> str:
    for pattern, label in ((r"^left float: \d+ weight tensors of 3", "experts float"),
                           (r"quantized layers are larger than in float", "layers grow"),
                           (r"^calibration gave \d+ tokens, fewer", "few calibration tokens"),
                           (r"matched no linear layer", "a skip entry matched nothing")):
        if re.search(pattern, note):
            return f"{label} (note)"
    return f"{note[:60]} (note)"


def verdict(d: dict | None, fl: dict | None) -> tuple[list[tuple[str, str]], list[str]]:
    """([(short label, message)] of the failed checks, the labels of the report's notes)."""
    if d is None:
        return [("no result", "no JSON line: the worker died or timed out (see its .err file)")], []
    if d.get("harness") or d["quantize"]:
        return [("quantize_ raised" if d.get("quantize") else "harness error", d.get("harness") or d["quantize"])], []
    fails, dtype = [], d["dtype"]
    fail = lambda label, message=None: fails.append((label, message or label))  # noqa: E731
    notes = [note_label(n) for n in d["notes"]]
    if d["frontend"] != "export":
        fail(f"frontend {d['frontend']}")
    if d["skipped"]:
        fail("sites skipped", "; ".join(d["skipped"]))
    flat, deep = [n for n, k in d["float_left"].items() if k == 2], [n for n, k in d["float_left"].items() if k > 2]
    if flat:
        fail("2-D weights float", "float 2-D weights, not report sites: " + ", ".join(flat))
    noted = sum(int(re.match(r"left float: (\d+)", n)[1]) for n in d["notes"] if n.startswith("left float: "))
    noted += len(d.get("experts_float", []))  # report rows: experts under AWQ, float with the reason
    if d.get("experts_float"):
        notes.append("experts float (awq: reason)")
    if deep and noted != len(deep):
        fail("experts float, not noted", f"{len(deep)} 3+-D weights float ({', '.join(deep)}), notes count {noted}")
    if d["forward"]:
        fail("forward raised", d["forward"])
        return fails, notes
    if not d["finite"]:
        fail("non-finite logits")
    bound = TOL.get(d["spec"], 1.5) * d["ref_err"] + FLOOR[dtype]
    if d["err"] > bound:
        fail(f"err {d['err']:.3f} > {bound:.3f}",
             f"logit error {d['err']:.4f} > {bound:.4f} (round-to-nearest reference {d['ref_err']:.4f})")
    for mode, g in (d.get("gen") or {}).items():
        fg = ((fl or {}).get("gen") or {}).get(mode, {})
        lim = max(CACHE_LIM[dtype], 10 * fg.get("diff", 0))
        if "error" in g:
            fail(f"generate {mode} raised" + (" (float too)" if "error" in fg else ""), g["error"])
        elif not g["finite"]:
            fail(f"generate {mode} non-finite")
        elif g["diff"] > lim:
            fail(f"{mode} cache {g['diff']:.1e}", f"generate {mode}: steps vs full forward {g['diff']:.2e} > "
                 f"{lim:.1e} (float model {fg.get('diff', float('nan')):.1e})")
    if d["compile"]:
        fail("compile raised", d["compile"])
        return fails, notes
    if d["compile_rows_differ"]:
        fail("compile decisions differ", f"report rows (quantize_, compile): {d['compile_rows_differ']}"[:500])
    if d["compile_touched_float"]:
        fail("compile changed the float model")
    for shape, v in d["compile_diff"].items():
        if isinstance(v, str):
            fail(f"compile {shape} raised", v)
        elif v > COMPILE_LIM[dtype]:
            fail(f"compile != quantize_ {v:.1e}", f"compile vs quantize_ outputs at {shape}: {v:.2e} > "
                 f"{COMPILE_LIM[dtype]:g}")
    return fails, notes


def load(out: Path) -> dict:
    cases = (json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines())
    return {(d["arch"], d["dtype"], d["spec"]): d for d in cases}


def table(res: dict, args: argparse.Namespace) -> str:
    from tabulate import tabulate

    short = {"float32": "fp32", "bfloat16": "bf16"}
    body, footnotes = [], []
    for arch in args.archs:
        row, notes = [arch], []
        for spec in args.specs:
            cells = {}
            for dt in args.dtypes:
                fails, labels = verdict(res.get((arch, dt, spec)), res.get((arch, dt, "float")))
                notes += [n for n in labels if n not in notes]
                if fails:
                    footnotes.append(f"[{len(footnotes) + 1}] {arch} {dt} {spec}: " + " | ".join(m for _, m in fails)
                                     + f"\n    repro: python tools/arch_sweep.py --worker {arch} {dt} --specs {spec}")
                    cells[dt] = f"{fails[0][0]}{' +' if len(fails) > 1 else ''} [{len(footnotes)}]"
            row.append("ok" if not cells else cells[args.dtypes[0]] if len(cells) == len(args.dtypes) == 1 else
                       "; ".join(f"{short.get(dt, dt)}: {c}" for dt, c in cells.items()))
        body.append(row + ["; ".join(notes)])
    text = tabulate(body, ["arch", *args.specs, "notes"], tablefmt="github" if args.markdown else "simple")
    return "\n".join([text, *footnotes])


# ---- driver ---------------------------------------------------------------------------------------
def sweep(args: argparse.Namespace) -> None:
    """Run one worker process per (arch, dtype), ``--jobs`` at a time; JSON lines to ``--out``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    todo, running, t0 = [(a, d) for a in args.archs for d in args.dtypes], [], time.time()
    while todo or running:
        while todo and len(running) < args.jobs:
            arch, dt = todo.pop(0)
            stem = args.out / f"{arch}_{dt}"
            with open(f"{stem}.jsonl", "w") as out, open(f"{stem}.err", "w") as err:
                cmd = [sys.executable, __file__, "--worker", arch, dt, "--specs", *args.specs]
                running.append((subprocess.Popen(cmd, stdout=out, stderr=err, env=env), arch, dt, time.time()))
        time.sleep(0.5)
        for item in list(running):
            p, arch, dt, start = item
            if p.poll() is None and time.time() - start > args.timeout:
                p.kill()
                p.wait()
            if p.poll() is not None:
                running.remove(item)
                print(f"[{time.time() - t0:6.0f}s] {arch} {dt}: exit {p.returncode} after {time.time() - start:.0f}s",
                      flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS), metavar="ARCH",
                   help=f"default all: {', '.join(ARCHS)}")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--specs", nargs="+", default=SPECS, help=f"default: {' '.join(SPECS)}")
    p.add_argument("--jobs", type=int, default=2, help="worker processes at once (default 2)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker before it is killed (default 900)")
    p.add_argument("--out", type=Path, help="directory for the per-case JSON lines (default: a new temporary one)")
    p.add_argument("--markdown", action="store_true", help="markdown table")
    p.add_argument("--worker", nargs=2, metavar=("ARCH", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.specs)
        return 0
    args.out = args.out or Path(tempfile.mkdtemp(prefix="arch_sweep-"))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"per-case JSON lines: {args.out}", flush=True)
    t0 = time.time()
    sweep(args)
    print(f"\n{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, transformers {transformers.__version__}, cpu "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.jobs} jobs x 1 thread; wall {time.time() - t0:.0f} s\n")
    print(table(load(args.out), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
