"""CPU speed of ``fxquant::linear_vptq`` against dense ``F.linear`` on the same (dequantized) weight.

    python tools/bench_vptq.py [--shapes 1536x576,4096x4096] [--ms 1,4,16,64] [--schemes vptq-v8-c256-r256,...]

The packed weights are built from random indices and codebooks (k-means is not what is timed).  Prints the
median and the minimum of repeated calls in microseconds, fp32 and bf16 activations.  Numbers depend on
the machine's load: compare ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch

import fxquant  # noqa: F401  (registers the ops)
from fxquant.formats import vptq as fmt
from fxquant.schemes import parse_scheme
from fxquant.schemes._base import QuantizedWeight


def random_packed(scheme: str, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    """A packed weight of ``scheme``'s layout with uniformly random indices and normal codebooks."""
    s = parse_scheme(scheme)
    lay = s.layout(n, k)
    g = torch.Generator().manual_seed(seed)
    dt = s.codebook_dtype
    idx = torch.randint(0, lay.num_centroids, (lay.group_num, lay.rows, lay.group_size), generator=g)
    res = (torch.randint(0, lay.num_res_centroids, idx.shape, generator=g) if lay.num_res_centroids else None)
    t = {"indices": fmt.pack_indices(fmt.merge(idx, res, lay.index_bits), lay.total_bits),
         "centroids": torch.randn(lay.group_num, lay.num_centroids * lay.vector_len, generator=g).to(dt) * 0.02}
    if res is not None:
        t["res_centroids"] = torch.randn(lay.group_num, lay.num_res_centroids * lay.vector_len, generator=g).to(dt) * 0.005
    if lay.outlier_size:
        t["outlier_indices"] = fmt.to_uint16_bits(torch.randint(0, lay.num_outlier_centroids,
                                                                (1, lay.outlier_rows, lay.outlier_size), generator=g))
        t["outlier_centroids"] = torch.randn(1, lay.num_outlier_centroids * lay.outlier_vector_len, generator=g).to(dt)
    if lay.enable_perm:
        t["perm"] = fmt.to_uint16_bits(torch.randperm(k, generator=g))
    if lay.enable_norm:
        t["weight_scale"] = (torch.rand(k, generator=g) + 0.5).to(dt)
        t["weight_bias"] = (torch.randn(k, generator=g) * 0.01).to(dt)
    return s.packed(t, n, k)


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
    ap.add_argument("--shapes", default="1536x576,4096x4096")
    ap.add_argument("--ms", default="1,4,16,64")
    ap.add_argument("--schemes", default="vptq-v4-c256-o16-perm,vptq-v8-c256-r256-norm-perm,vptq-v8-c65536-r256")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        n, k = map(int, shape.split("x"))
        for scheme in a.schemes.split(","):
            qw = random_packed(scheme, n, k)
            args, attrs = tuple(qw.tensors.values()), qw.attrs
            w = parse_scheme(scheme).dequantize(qw)
            for m in map(int, a.ms.split(",")):
                for dt in (torch.float32, torch.bfloat16):
                    x = torch.randn(m, k).to(dt)
                    wd = w.to(dt)
                    ours = timed(lambda: torch.ops.fxquant.linear_vptq(x, *args, None, **attrs), a.reps)
                    dense = timed(lambda: torch.nn.functional.linear(x, wd), a.reps)
                    print(f"{scheme:30s} {n}x{k} M={m:<4d} {str(dt)[6:]:8s} vptq {ours[0]:9.0f} / {ours[1]:9.0f} us   "
                          f"dense {dense[0]:9.0f} / {dense[1]:9.0f} us", flush=True)


if __name__ == "__main__":
    main()
