"""Latency of ``linear_affine`` / ``linear_affine_perm`` (GPTQ / AWQ / compressed-tensors layers) vs fp32 and
bf16 ``F.linear`` and ``int4wo``'s native kernels, one layer.

    python tools/bench_affine_ops.py                  # 4096x4096 and 11008x4096, M = 1, 8, 32
    python tools/bench_affine_ops.py --quick          # one small shape, few repetitions
    python tools/bench_affine_ops.py --m 1 16 --shapes 4096x4096

Activations are fp32 (``compute_dtype=None``: rounded to bf16 once on AVX512-BF16 CPUs, fp32 result).
All cases of one (shape, M) are measured in the same run, interleaved in a new random order each round,
each sample one call after one untimed warm call; medians and minimums in ms.  On a machine shared with
other jobs medians move between runs: compare within one run.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxquant.ops  # noqa: E402,F401  (registers torch.ops.fxquant.*)
from fxquant.kernels import native_cpu  # noqa: E402
from fxquant.ops import affine_perm  # noqa: E402
from fxquant.schemes import parse_scheme  # noqa: E402


def cases(n: int, k: int, m: int) -> dict:
    """name -> zero-argument callable, for one shape and M."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    x = torch.randn(m, k)
    wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
    out = {"fp32 F.linear": lambda: F.linear(x, w), "bf16 F.linear": lambda: F.linear(xb, wb)}
    for scheme in ("affine4-g128-fp16", "affine8-g128-fp16", "int4wo-128"):
        qw = parse_scheme(scheme).quantize(w)
        op, args = getattr(torch.ops.fxquant, qw.op), tuple(qw.tensors.values())
        out[scheme] = lambda op=op, args=args, a=qw.attrs: op(x, *args, None, **a)
    t = parse_scheme("affine4-g128-fp16").quantize(w).tensors
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    pq = affine_perm.packed(t["qweight"], t["scale"], t["zero_point"], perm, bits=4, group_size=128,
                            symmetric=False, n=n, k=k)
    pargs = tuple(pq.tensors.values())
    out["affine4-g128-fp16+perm"] = lambda: torch.ops.fxquant.linear_affine_perm(x, *pargs, None, **pq.attrs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "11008x4096"], help="NxK")
    ap.add_argument("--m", nargs="*", type=int, default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="1024x1024, M = 1, 5 rounds")
    a = ap.parse_args()
    if a.quick:
        a.shapes, a.m, a.rounds = ["1024x1024"], [1], 5
    print(f"threads {torch.get_num_threads()}, native kernels: {native_cpu.status()} {native_cpu.isas()}")
    for shape in a.shapes:
        n, k = map(int, shape.split("x"))
        for m in a.m:
            fns = cases(n, k, m)
            times: dict = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name in random.sample(list(fns), len(fns)):
                    fns[name]()
                    t0 = time.perf_counter()
                    fns[name]()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            print(f"\n{n}x{k}, M={m}: median / min ms")
            for name, ts in times.items():
                print(f"  {name:24s} {statistics.median(ts):9.2f} {min(ts):9.2f}")


if __name__ == "__main__":
    main()
