"""linear_aqlm's CPU paths against a dense bf16 linear (docs/formats.md, "aqlm": which M uses which path).

    python tools/bench_aqlm_ops.py [--threads 2] [--reps 40]

Per shape and M (random codes, fp16 codebooks): the table GEMV (native, x rounded to bf16 in the kernel), the
blocked decode + fp32 GEMM (native row decoder), the op as dispatched (fp32 x, ``compute_dtype=None``), and bf16
``F.linear`` on a float weight of the same shape (what the model would run unquantized).  Median and minimum
microseconds of ``--reps`` calls; on a machine shared with other jobs compare the minimums.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fxquant.formats import aqlm as fmt
from fxquant.kernels import native_aqlm
from fxquant.ops import aqlm as op
from fxquant.ops._dequant_gemm import blocked_linear

SHAPES = [(1536, 576, 2, 8, 8), (576, 1536, 1, 8, 4), (576, 576, 2, 8, 8), (4096, 4096, 2, 8, 8),
          (4096, 4096, 1, 16, 8)]


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6, ts[0] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rows", default="1,4,8,16,64,256")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':22s} {'M':>4s} {'table':>15s} {'blocked fp32':>15s} {'op':>15s} {'bf16 dense':>15s}"
          "   (median / min us)")
    for n, k, nc, nbits, ig in SHAPES:
        codes = fmt.to_stored(torch.randint(0, 1 << nbits, (n, k // ig, nc), generator=g), nbits)
        cb = torch.randn(nc, 1 << nbits, 1, ig, generator=g).half()
        sc = torch.rand(n, 1, 1, 1, generator=g).half()
        attrs = dict(num_codebooks=nc, nbits_per_codebook=nbits, in_group_size=ig, out_group_size=1, out_features=n,
                     in_features=k)
        w = torch.randn(n, k, generator=g).bfloat16()
        decode, _, _ = op._block_decoder(codes, cb, sc, **attrs, dtype=torch.float32)
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            table = timed(lambda: native_aqlm.lut_gemv(x, codes, cb, sc, out_features=n, round_x=True), args.reps) \
                if nbits <= 8 else (float("nan"),) * 2
            blocked = timed(lambda: blocked_linear(xb.float(), n, k, decode, None, torch.float32), args.reps)
            full = timed(lambda: torch.ops.fxquant.linear_aqlm(x, codes, cb, sc, None, **attrs), args.reps)
            dense = timed(lambda: F.linear(xb, w), args.reps)
            cells = " ".join(f"{a:7.0f}/{b:<7.0f}" for a, b in (table, blocked, full, dense))
            print(f"{n}x{k} {nc}x{nbits}-g{ig}".ljust(22) + f" {m:4d} {cells}", flush=True)


if __name__ == "__main__":
    main()
