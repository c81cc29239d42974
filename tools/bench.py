"""Latency of fxquant's linear ops (every format) vs fp32 / bf16 ``F.linear`` and peer libraries.

    python tools/bench.py                      # full run: M in {1, 16, 256}, 4096x4096 and 11008x4096
    python tools/bench.py --quick              # smoke run: one small shape, few repetitions
    python tools/bench.py --markdown           # table for docs/performance.md

Each row is a *case*: a name, the weight format it implements (``dense`` for the baselines), its
activation dtype, ``prepare(weight [N, K] fp32) -> state`` (run once per shape: quantization,
packing, torch.compile wrapping) and ``forward(state, x [M, K]) -> y [M, N]``.  New formats and
peers are new entries in a module of ``tools/bench_cases`` (one per format family); nothing else
changes.  A case that cannot run here (peer not
installed, no CPU kernel) raises, and its row shows ``n/a (reason)``.

Timing: all cases of one (shape, M) are measured in the same run, interleaved (a new random
order each round, seeded) so a noisy period hits every case alike and no case always follows the
same one; each sample is one call timed with ``perf_counter``, preceded by two untimed calls of the
same case ("hot": its weight as cached as it gets), or with ``--cold`` by a read of 128 MB (the
weight comes from memory, as in a model whose weights exceed the last-level cache).  Measured on
a Zen 5 EPYC (32 MB L3): after another case's weight, one warm call leaves an 8-16 MB weight only
partly in L3 (the same int4wo M=1 call 244 us after a switch, 202 us two calls later), so with a
fixed order each case's time depended on which case came before it.  Ratios are ``baseline median
/ case median`` (> 1 means the case is faster; ``--ratio-stat min`` uses minimums, which resist
preemption by other processes).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import os
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tools/, and fxquant/ if not installed
import fxquant.ops  # noqa: E402,F401  (registers torch.ops.fxquant.*)
from fxquant.formats import int4 as int4_fmt  # noqa: E402
from fxquant.ops import _cpu, int4wo, int8wo  # noqa: E402
from fxquant.kernels import native_cpu  # noqa: E402
from tools import bench_cases  # noqa: E402
from tools.bench_cases._common import Unavailable  # noqa: E402

TIE_BAND = 0.05  # a ratio within 5% under its target is reported as a tie: run-to-run noise here
HOT_WARM_LIMIT_S = 0.05  # slower calls stream far more than the last-level cache: no warm call
FLUSH_BYTES = 128 << 20  # > 32 MB L3 of the EPYC this was written on, for --cold
FP32, BF16 = torch.float32, torch.bfloat16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    fmt: str  # weight format, e.g. "int8wo"; "dense" for the F.linear baselines
    kind: str  # "baseline" | "fxquant" | "reference" | "peer"
    act_dtype: torch.dtype
    prepare: Callable[[torch.Tensor], Any]  # fp32 weight [N, K] -> state; once per shape
    forward: Callable[[Any, torch.Tensor], torch.Tensor]  # (state, x [M, K]) -> y [M, N]


CASES: list[Case] = []


def case(*, name: str, fmt: str, kind: str, act_dtype: torch.dtype,
         prepare: Callable[[torch.Tensor], Any]) -> Callable:
    """Register the decorated ``forward(state, x)`` as a benchmark row."""
    def register(forward):
        CASES.append(Case(name=name, fmt=fmt, kind=kind, act_dtype=act_dtype, prepare=prepare,
                          forward=forward))
        return forward
    return register


# ---- baselines ---------------------------------------------------------------------------------
FP32_LINEAR, BF16_LINEAR = "fp32 F.linear", "bf16 F.linear"


@case(name=FP32_LINEAR, fmt="dense", kind="baseline", act_dtype=FP32, prepare=lambda w: w)
@case(name=BF16_LINEAR, fmt="dense", kind="baseline", act_dtype=BF16, prepare=lambda w: w.to(BF16))
def _dense(w, x):
    return F.linear(x, w)


# ---- formats: one module per family in tools/bench_cases ---------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    case: str
    m: int
    vs: str  # another case's name (e.g. a baseline), or "peers" = the fastest peer of the case's format
    min_ratio: float


TARGETS: list[Target] = []
for _mod in bench_cases.MODULES:
    _cases = importlib.import_module(f"tools.bench_cases.{_mod}")
    for _c in _cases.CASES:
        case(**{k: v for k, v in _c.items() if k != "forward"})(_c["forward"])
    TARGETS += [Target(**t) for t in _cases.TARGETS]


# ---- measurement ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    case: Case
    n: int
    k: int
    m: int
    times: list[float] = dataclasses.field(default_factory=list)  # seconds
    na: str | None = None
    rel_err: float | None = None

    def stat(self, how: str) -> float:
        return statistics.median(self.times) if how == "median" else min(self.times)


def _label(c: Case) -> str:
    return f"{c.name} [{str(c.act_dtype).removeprefix('torch.').replace('float32', 'fp32').replace('bfloat16', 'bf16')}]"


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = msg if isinstance(e, Unavailable) else f"{type(e).__name__}: {msg}"
    return text[:90].replace("|", "/")


def _prepare_all(cases: list[Case], w: torch.Tensor) -> dict[str, Any]:
    """Run every case's ``prepare`` once for this weight; failures are stored as exceptions."""
    states = {}
    for c in cases:
        _progress(f"  prepare {_label(c)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                states[_label(c)] = c.prepare(w)
        except Exception as e:
            states[_label(c)] = e
    return states


def _measure(cases: list[Case], states: dict[str, Any], w: torch.Tensor, m: int,
             args: argparse.Namespace) -> list[Row]:
    """Time every case at one (shape, M), interleaved; returns rows in ``cases`` order."""
    (n, k), x = w.shape, torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
    y_ref = F.linear(x, w)
    rows, calls, reps, hot = [], {}, {}, {}
    for c in cases:
        row, st = Row(case=c, n=n, k=k, m=m), states[_label(c)]
        rows.append(row)
        if isinstance(st, BaseException):
            row.na = _reason(st)
            continue
        xc = x.to(c.act_dtype)
        fn = (lambda f, s, a: lambda: f(s, a))(c.forward, st, xc)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = fn()  # first call: compiles / JITs
                est = min(_timed(fn) for _ in range(2))
        except Exception as e:
            row.na = _reason(e)
            continue
        if y.shape == y_ref.shape:
            row.rel_err = ((y.float() - y_ref).norm() / y_ref.norm()).item()
        calls[id(row)], hot[id(row)] = fn, est < HOT_WARM_LIMIT_S
        reps[id(row)] = max(args.min_reps, min(args.reps, int(args.budget / est)))
    live = [r for r in rows if id(r) in calls]
    # --cold: a read of 128 MB (clean lines: a write flush would add its dirty lines' write-back to the
    # next call's traffic, which bandwidth-bound kernels feel most: int4wo M=1 4096x4096 ~1.6x slower)
    flush = torch.ones(FLUSH_BYTES // 8, dtype=torch.int64) if args.cold else None
    order = random.Random(m)
    gc.collect()
    gc.disable()
    try:
        for rnd in range(max(reps.values(), default=0)):
            todo = [r for r in live if reps[id(r)] > rnd]
            order.shuffle(todo)  # a new order each round: no case always follows the same one
            for r in todo:
                fn = calls[id(r)]
                if flush is not None:
                    flush.sum()
                elif hot[id(r)]:
                    fn()
                    fn()
                r.times.append(_timed(fn))
    finally:
        gc.enable()
    return rows


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- reporting ------------------------------------------------------------------------------------
def _fastest_peer(rows: list[Row], fmt: str, how: str) -> Row | None:
    peers = [r for r in rows if r.case.kind == "peer" and r.case.fmt == fmt and not r.na]
    return min(peers, key=lambda r: r.stat(how), default=None)


def _table(rows: list[Row], markdown: bool, how: str) -> str:
    head = ["shape NxK", "M", "case [act]", "format", "median µs", "min µs", "× bf16", "× fp32",
            "rel err", "reps"]
    body = []
    for key in dict.fromkeys((r.n, r.k, r.m) for r in rows):
        group = [r for r in rows if (r.n, r.k, r.m) == key]
        base = {r.case.name: r for r in group if r.case.kind == "baseline" and not r.na}
        for r in group:
            cells = [f"{r.n}x{r.k}", r.m, _label(r.case), r.case.fmt]
            if r.na:
                body.append(cells + [f"n/a ({r.na})", "", "", "", "", ""])
                continue
            ratio = [f"{base[b].stat(how) / r.stat(how):.2f}" if b in base else "" for b in (BF16_LINEAR, FP32_LINEAR)]
            err = "" if r.rel_err is None else f"{r.rel_err:.4f}"
            body.append(cells + [f"{r.stat('median') * 1e6:,.0f}", f"{r.stat('min') * 1e6:,.0f}", *ratio,
                                 err, len(r.times)])
    from tabulate import tabulate
    return tabulate(body, head, tablefmt="github" if markdown else "simple", disable_numparse=True)


def _summary(rows: list[Row], markdown: bool, how: str) -> str:
    """One line per (shape, format): the fxquant op's speed-up over bf16 ``F.linear`` at each M, and
    the fastest peer's (``×bf16 peer``), from the same rows as the full table."""
    ms = list(dict.fromkeys(r.m for r in rows))
    head = ["shape NxK", "format"] + [h for m in ms for h in (f"M={m} fxquant ×bf16", f"M={m} best peer ×bf16")]
    body = []
    for n, k in dict.fromkeys((r.n, r.k) for r in rows):
        fmts = dict.fromkeys(r.case.fmt for r in rows if r.case.kind == "fxquant")
        for f in fmts:
            line = [f"{n}x{k}", f]
            for m in ms:
                group = [r for r in rows if (r.n, r.k, r.m) == (n, k, m)]
                base = next((r for r in group if r.case.name == BF16_LINEAR and not r.na), None)
                mine = next((r for r in group if r.case.name == f"fxquant {f}" and not r.na), None)
                peer = _fastest_peer(group, f, how)
                cell = lambda r: "" if r is None or base is None else f"{base.stat(how) / r.stat(how):.2f}"
                line += [cell(mine), "" if peer is None else f"{cell(peer)} ({peer.case.name})"]
            body.append(line)
    from tabulate import tabulate
    return tabulate(body, head, tablefmt="github" if markdown else "simple", disable_numparse=True)


def _targets(rows: list[Row], how: str) -> list[str]:
    out = []
    for t in TARGETS:
        for n, k in dict.fromkeys((r.n, r.k) for r in rows if r.m == t.m):
            group = [r for r in rows if (r.n, r.k, r.m) == (n, k, t.m)]
            mine = next((r for r in group if r.case.name == t.case and not r.na), None)
            if mine is None:
                continue
            other = (_fastest_peer(group, mine.case.fmt, how) if t.vs == "peers"
                     else next((r for r in group if r.case.name == t.vs and not r.na), None))
            if other is None:
                out.append(f"- n/a  {t.case} M={t.m} {n}x{k} vs {t.vs}: nothing to compare with")
                continue
            ratio = other.stat(how) / mine.stat(how)
            alt = "min" if how == "median" else "median"
            verdict = ("MET   " if ratio >= t.min_ratio else
                       "TIE   " if ratio >= t.min_ratio * (1 - TIE_BAND) else "MISSED")
            out.append(f"- {verdict} {t.case} M={t.m} {n}x{k}: {ratio:.2f}× vs {_label(other.case)} "
                       f"(target ≥ {t.min_ratio:g}×; ratio of {alt}s {other.stat(alt) / mine.stat(alt):.2f}×)")
    return out


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (info.read_text().splitlines() if info.exists() else [])
             if ln.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _header(args: argparse.Namespace, load_before: float) -> list[str]:
    versions = []
    for dist in ("torch", "torchao", "bitsandbytes", "optimum-quanto"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    return [
        f"command: python tools/bench.py {' '.join(sys.argv[1:])}".rstrip(),
        f"cpu: {_cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"
        f" of {os.cpu_count()} logical cpus; 1-min load average {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after (other processes add noise)",
        f"versions: {', '.join(versions)}",
        f"fxquant CPU policy: dense dtype {str(_cpu.dense_dtype()).removeprefix('torch.')}, packed kernels "
        f"below M={_cpu.large_m_threshold()} (int8wo {int8wo.packed_max_rows()}, "
        f"int4wo {int4wo.packed_max_rows()}), "
        f"int4 native block_n {int4_fmt.native_cpu_block_n()}; fxquant native CPU GEMV kernels: "
        f"{native_cpu.status()}, {native_cpu.isa()}{' + bf16 dot' if native_cpu.has_bf16_dot() else ''} "
        f"(small M: int8wo ≤ {int8wo.native_max_rows()}, int4wo ≤ {int4wo.NATIVE_MAX_ROWS} rows"
        f"{f', ≤ {int4wo.NATIVE_MAX_ROWS_BF16DOT} with bf16 activations' if native_cpu.has_bf16_dot() else ''}, "
        "per-op limits in fxquant/ops/*.py)",
        f"timing: {'cold (128 MB read before each call)' if args.cold else 'hot (two untimed calls of the same case first)'}, "
        f"interleaved, ≤{args.reps} reps / ≤{args.budget:g} s per case; "
        f"ratio = baseline {args.ratio_stat} / case {args.ratio_stat}",
    ]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    fmts = sorted({c.fmt for c in CASES} - {"dense"})
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 256], help="activation rows")
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"], help="NxK (out x in)")
    p.add_argument("--formats", nargs="+", choices=fmts, default=fmts, help="weight formats to include")
    p.add_argument("--no-peers", action="store_true", help="skip torchao / bitsandbytes / quanto rows")
    p.add_argument("--reps", type=int, default=50, help="max timed calls per case (default 50)")
    p.add_argument("--min-reps", type=int, default=5, help="min timed calls per case (default 5)")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per case (default 1.5)")
    p.add_argument("--ratio-stat", choices=("median", "min"), default="median",
                   help="statistic the ratios use (min resists noise from other processes)")
    p.add_argument("--cold", action="store_true", help="flush the caches before every timed call")
    p.add_argument("--quick", action="store_true", help="smoke run: 1024x512, M 1 16, few reps")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.m, args.reps, args.min_reps, args.budget = ["1024x512"], [1, 16], 10, 3, 0.1
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
            raise ValueError
    except ValueError:
        p.error(f"--shapes takes NxK with positive ints, e.g. 11008x4096; got {args.shapes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    load_before = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    cases = [c for c in CASES if c.kind == "baseline" or
             (c.fmt in args.formats and not (args.no_peers and c.kind == "peer"))]
    rows = []
    with torch.no_grad():
        for n, k in args.shapes:
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
            _progress(f"[{n}x{k}] preparing {len(cases)} cases")
            states = _prepare_all(cases, w)
            for m in args.m:
                _progress(f"[{n}x{k}] M={m}: measuring")
                rows += _measure(cases, states, w, m, args)
            del states
    print("\n".join(_header(args, load_before)))
    print()
    print(f"summary (ratios of {args.ratio_stat}s; the fxquant row is the op on fp32 activations):")
    print(_summary(rows, args.markdown, args.ratio_stat))
    print()
    print(_table(rows, args.markdown, args.ratio_stat))
    print()
    print(f"targets (CPU, ratios of {args.ratio_stat}s measured in this run; TIE = within {TIE_BAND:.0%} "
          "below target):")
    print("\n".join(_targets(rows, args.ratio_stat)) or "- none applicable to the chosen M / formats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
