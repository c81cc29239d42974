"""``python -m fxquant demo``: quantize the built-in Llama-style model and show what it costs."""
from __future__ import annotations

import statistics
import time

import torch

from .api import compile
from .models import tiny_llama
from .report import report
from .spec import Spec

DEFAULT_SPEC = Spec(default="int4wo-128", skip=["lm_head"], rules={r"re:model\.layers\.0\..*": "int8wo"})


def _latency_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


SIZES = {
    "small": {},  # ~54M params: the default demo
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2),
}


def run_demo(spec: Spec | str | None = None, *, size: str = "small", seq_len: int = 64, reps: int = 10,
             seed: int = 0, threads: int | None = None, out=print) -> dict:
    """Compile the demo model with ``spec`` (default :data:`DEFAULT_SPEC`) and print the report,
    memory saved, output error vs float and eager latency.  Returns the measured numbers."""
    if threads:
        torch.set_num_threads(threads)
    spec = Spec.coerce(spec) if spec is not None else DEFAULT_SPEC
    if size not in SIZES:
        raise ValueError(f"demo size {size!r} is not valid; choose one of {', '.join(SIZES)}")
    model = tiny_llama(seed, **SIZES[size])
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)
    out(f"model: TinyLlama {model.config}  ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")
    out(f"spec:  {spec.to_json()}")
    t0 = time.perf_counter()
    qm = compile(model, spec, (ids,))
    out(f"compile: {time.perf_counter() - t0:.1f} s\n")
    rep = report(qm)
    out(str(rep))

    with torch.no_grad():
        ref, got = model(ids), qm(ids)
        rel = ((got - ref).norm() / ref.norm()).item()
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        ids2 = torch.randint(0, model.config.vocab_size, (3, 17), generator=gen)
        rel2 = ((qm(ids2) - model(ids2)).norm() / model(ids2).norm()).item()
        out(f"\noutput vs float: relative logits error {rel:.4f}, top-1 agreement {top1:.3f} "
            f"(batch 3 x seq 17, unseen shape: error {rel2:.4f})")
        timings = {}
        for label, x in (("1 token", ids[:, :1]), (f"{seq_len} tokens", ids)):
            f_ms = _latency_ms(lambda: model(x), reps)
            q_ms = _latency_ms(lambda: qm(x), reps)
            timings[label] = (f_ms, q_ms)
            out(f"eager latency, {label}: float {f_ms:.1f} ms, quantized {q_ms:.1f} ms "
                f"({f_ms / q_ms:.2f}x)")
    out(f"memory: {rep.model_bytes_before / 2**20:.1f} MiB -> {rep.model_bytes_after / 2**20:.1f} MiB "
        f"({rep.model_bytes_before / max(rep.model_bytes_after, 1):.2f}x smaller, "
        f"{(rep.model_bytes_before - rep.model_bytes_after) / 2**20:.1f} MiB saved)")
    return {"rel_error": rel, "top1": top1, "timings": timings, "report": rep}
