"""Latency of ``torch.ops.fxquant.linear_gguf`` per GGUF type vs bf16 ``F.linear``, one layer.

    python tools/bench_gguf_ops.py                 # 2048x2048, 5632x2048 and 2048x5632 (N x K), M = 1 and 64
    python tools/bench_gguf_ops.py --quick         # one small shape, few repetitions
    python tools/bench_gguf_ops.py --types q4_k q8_0 --m 1 8 16 32

Activations are bf16 (``compute_dtype=None``: the result is rounded to bf16, as bf16 ``F.linear``'s).
The weight bytes are random with small finite fp16 scales (speed does not depend on the values; the
k-quants cannot be quantized here).  All cases of one (shape, M) are measured in the same run,
interleaved in a new random order each round, each sample one call after one untimed warm call of
the same case; ratios are ``bf16 median / case median`` (> 1: the case is faster).  On a machine
shared with other jobs, medians move between runs: compare ratios of one run.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxquant.ops  # noqa: E402,F401  (registers torch.ops.fxquant.*)
from fxquant.formats import gguf as fmt  # noqa: E402
from fxquant.kernels import native_cpu  # noqa: E402

#: byte offsets of each type's fp16 fields (fxquant/formats/gguf_legacy.py, gguf_kquants.py)
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
              "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, row_bytes]`` of random codes with finite fp16 scales in [0, 0.01)."""
    q = fmt.QTYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // q.block_size, q.type_size), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qtype]:
        scale = (torch.rand(n, k // q.block_size, generator=g) * 0.01).to(torch.float16)
        raw[:, :, off:off + 2] = scale.view(torch.uint8).reshape(n, -1, 2)
    return raw.reshape(n, -1)


def _cases(qtypes: list[str], n: int, k: int) -> dict:
    w = torch.randn(n, k, dtype=torch.bfloat16)
    cases = {"bf16 F.linear": lambda x: F.linear(x, w)}
    for name in qtypes:
        blocks = random_blocks(name, n, k)
        cases[f"gguf-{name}"] = lambda x, b=blocks, t=name: torch.ops.fxquant.linear_gguf(x, b, None, t, n, k)
    return cases


def _measure(cases: dict, m: int, k: int, rounds: int, seed: int) -> dict[str, list[float]]:
    x = torch.randn(m, k, dtype=torch.bfloat16)
    times = {name: [] for name in cases}
    rng = random.Random(seed)
    order = list(cases)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = cases[name]
            fn(x)
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=list(fmt.QTYPES), choices=list(fmt.QTYPES))
    p.add_argument("--m", nargs="+", type=int, default=[1, 64])
    p.add_argument("--shapes", nargs="+", default=["2048x2048", "5632x2048", "2048x5632"], help="NxK (out x in)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one 512x512 layer, 5 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds = ["512x512"], 5
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__}, {args.threads} threads, native kernels: {native_cpu.status()} "
          f"({native_cpu.isa()}), load average {load:.1f} (a shared machine: compare ratios within one run)")
    print(f"| shape NxK | M | case | median us | min us | bf16 / case (median) | (min) |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        cases = _cases(args.types, n, k)
        for m in args.m:
            times = _measure(cases, m, k, args.rounds, seed=m)
            base_med, base_min = statistics.median(times["bf16 F.linear"]), min(times["bf16 F.linear"])
            for name, ts in times.items():
                med, mn = statistics.median(ts), min(ts)
                print(f"| {n}x{k} | {m} | {name} | {med * 1e6:.0f} | {mn * 1e6:.0f} | {base_med / med:.2f} | "
                      f"{base_min / mn:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
