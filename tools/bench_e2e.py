"""End-to-end HF ``generate`` speed of fxquant's formats vs bf16 / fp32 and peer libraries (CPU).

    python tools/bench_e2e.py                                   # the full protocol (hours: see below)
    python tools/bench_e2e.py --models smollm2 --modes eager --new-tokens 16 --reps 2   # a quick look
    python tools/bench_e2e.py --models tinyllama-1.1b --profile int4wo-128             # top ops per decode step
    python tools/bench_e2e.py --json out.json                   # also write every sample (docs/performance.md)

Protocol: batch 1, greedy, ``min_new_tokens = max_new_tokens``.  *Decode*: a 128-token prompt, 128
new tokens; tokens/s = 1 / (seconds per decode step), a step's time taken between the ends of
consecutive forwards (a forward hook), so the prefill is excluded and generate's own per-token work
is included (``tools/e2e/timing.py``).  *Prefill*: a 512-token prompt, ``generate`` with
``max_new_tokens=1`` timed whole; tokens/s = 512 / seconds.  Models (``tools/e2e/models.py``): the
real SmolLM2-135M in bf16 and a random-weight Llama with TinyLlama-1.1B's shapes (lm_head untied).
Modes: ``eager`` (default dynamic cache) and ``compiled`` (``model.forward = torch.compile(...)``,
static caches sized as ``generate`` sizes them, one for the decode calls and one for the prefill; graphs are compiled in untimed warm-up calls, and the graphs
compiled during the timed calls are counted: 0 means no recompilation per token or per call).
Rows (``tools/e2e/variants.py``): bf16, fp32, fxquant ``quantize_`` with each scheme, ``gguf`` (SmolLM2's
own Q4_1 GGUF file loaded packed by ``fxquant.from_gguf``; bf16 / fp32 are transformers' dequantize-at-load
model of that file), and the peers (torchao, optimum-quanto, bitsandbytes) through their own APIs; a row
that fails shows its error.

Timing: each variant is made from a fresh deep copy of the bf16 model and freed after its rows;
its timed calls are interleaved with those of a bf16 reference model kept for the whole mode (a new
seeded random order of {variant, bf16} x {decode, prefill} per round), so each ratio compares two
models measured in the same minutes of a shared machine.  Ratios are ``bf16 median / variant median``
of the paired samples; the bf16 row pools all its samples.  Under ``compiled``, dynamo is reset
after each variant (its caches hold the freed model, and compiled code of earlier models would pile up
against dynamo's recompile limit), so the bf16 reference recompiles, untimed, for the next one.

Full default run, estimated from short runs on the 2-core VM while it was quiet (bf16 1.1B eagerly:
6.5 decode / 180 prefill tokens/s): 2-2.5 h.  tinyllama-1.1b eager ~40 min (the slow eager peers,
e.g. torchao int8 at ~2 tokens/s, and fp32 take most of it), compiled ~50 min (per row: 3 graphs
compiled and the bf16 reference's 3 recompiled, ~1-2 min with a warm inductor cache); SmolLM2
~30-40 min, mostly compiling.  Peak memory ~9-11 GB (bf16 model, bf16 reference, one variant).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import json
import os
import random
import statistics
import sys
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tools/, and fxquant/ if not installed
from tools.e2e import models, timing  # noqa: E402
from tools.e2e.variants import BY_NAME, VARIANTS, Variant, weight_bytes  # noqa: E402

MODES = ("eager", "compiled")
TARGET_MODEL = "tinyllama-1.1b"
# (fxquant row, mode, minimum decode speed-up over bf16 of the same run and mode)
DECODE_TARGETS = [("int4wo-128", "eager", 3.2), ("int4wo-128", "compiled", 3.5), ("int8wo", "eager", 1.9),
                  ("nf4", "eager", 3.0)]


@dataclasses.dataclass
class Result:
    model: str
    mode: str
    row: str
    kind: str
    bits: int
    weight_bytes: int = 0
    decode_s: list[float] = dataclasses.field(default_factory=list)  # seconds per decode step, one per rep
    prefill_s: list[float] = dataclasses.field(default_factory=list)  # seconds per prefill call
    ref_decode_s: list[float] = dataclasses.field(default_factory=list)  # the paired bf16 samples
    ref_prefill_s: list[float] = dataclasses.field(default_factory=list)
    graphs_warmup: int = 0  # graphs dynamo compiled in the variant's warm-up calls
    graphs_timed: int = 0  # ... during the timed calls (variant and bf16 reference): should be 0
    graph_breaks: int = 0
    error: str | None = None

    def decode_x(self, how: str = "median") -> float:
        return _stat(self.ref_decode_s, how) / _stat(self.decode_s, how)

    def prefill_x(self, how: str = "median") -> float:
        return _stat(self.ref_prefill_s, how) / _stat(self.prefill_s, how)


def _stat(xs: list[float], how: str) -> float:
    return statistics.median(xs) if how == "median" else min(xs)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rss_gb() -> float:
    """Resident memory of this process now (Linux), in GB; 0 where /proc is missing."""
    statm = Path("/proc/self/statm")
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9 if statm.exists() else 0.0


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160].replace("|", "/")


# ---- measuring --------------------------------------------------------------------------------
class Bench:
    """One (model, mode): a bf16 reference, prompts, ``generate`` arguments; measures variants."""

    def __init__(self, base: torch.nn.Module, tokenizer, model_name: str, mode: str, args: argparse.Namespace,
                 reference: bool = True):
        self.base, self.model_name, self.mode, self.args = base, model_name, mode, args
        self.decode_ids = models.prompt(base, tokenizer, args.prompt_len)
        self.prefill_ids = models.prompt(base, tokenizer, args.prefill_len)
        # static caches sized as generate sizes them (prompt + new tokens): decode attends over the
        # slots it needs, prefill gets its own cache (and graph, compiled in the warm-up)
        self.kw = timing.generate_kwargs(base, mode, args.prompt_len + args.new_tokens)
        self.kw_prefill = timing.generate_kwargs(base, mode, args.prefill_len + 1)
        self.ref = base if mode == "eager" or not reference else self._compiled(copy.deepcopy(base))
        self.order = random.Random(f"{model_name}/{mode}")
        if mode == "eager" and reference:
            timing.warm_up(self.ref, self.decode_ids, self.prefill_ids, self.kw, self.kw_prefill)

    @staticmethod
    def _compiled(model: torch.nn.Module) -> torch.nn.Module:
        timing.compile_forward(model)
        return model

    def make(self, v: Variant) -> torch.nn.Module:
        """A fresh copy of the bf16 model made into ``v`` (compiled in the compiled mode), warmed up."""
        model = v.make(copy.deepcopy(self.base), self.decode_ids)
        if self.mode == "compiled":
            self._compiled(model)
        timing.warm_up(model, self.decode_ids, self.prefill_ids, self.kw, self.kw_prefill)
        return model

    def measure(self, v: Variant) -> Result:
        res = Result(model=self.model_name, mode=self.mode, row=v.name, kind=v.kind, bits=v.bits)
        inductor_config = torch._inductor.config.save_config()  # torchao's quantize_ changes it globally
        try:
            if self.mode == "compiled":  # compiled after the reset that ended the previous row
                timing.warm_up(self.ref, self.decode_ids, self.prefill_ids, self.kw, self.kw_prefill)
            g0, b0 = timing.compile_stats()
            model = self.make(v)
            g1, b1 = timing.compile_stats()
            res.graphs_warmup, res.graph_breaks, res.weight_bytes = g1 - g0, b1 - b0, weight_bytes(model)
            self._rounds(model, res)
            res.graphs_timed = timing.compile_stats()[0] - g1
        except Exception as e:  # a row that cannot run shows why, and the run goes on
            res.error = _error(e)
        finally:
            torch._inductor.config.load_config(inductor_config)
            model = None
            if self.mode == "compiled":  # dynamo's caches hold the model: free it before the next copy
                torch._dynamo.reset()
            gc.collect()
        return res

    def _rounds(self, model: torch.nn.Module, res: Result) -> None:
        a = self.args

        def decode(m: torch.nn.Module) -> float:
            return timing.decode_seconds_per_token(m, self.decode_ids, a.new_tokens, self.kw)

        def prefill(m: torch.nn.Module) -> float:
            return timing.prefill_seconds(m, self.prefill_ids, self.kw_prefill)

        calls = [(res.decode_s, decode, model), (res.prefill_s, prefill, model),
                 (res.ref_decode_s, decode, self.ref), (res.ref_prefill_s, prefill, self.ref)]
        for rnd in range(a.reps):
            self.order.shuffle(calls)  # a new order each round: noise and cache state hit both models alike
            for out, call, m in calls:
                out.append(call(m))
            _progress(f"    round {rnd + 1}/{a.reps}: decode {1 / res.decode_s[-1]:.1f} tok/s "
                      f"(bf16 {1 / res.ref_decode_s[-1]:.1f}), prefill {a.prefill_len / res.prefill_s[-1]:.0f} tok/s "
                      f"(bf16 {a.prefill_len / res.ref_prefill_s[-1]:.0f})")


def _bf16_row(results: list[Result], ref: torch.nn.Module, model_name: str, mode: str) -> Result:
    """The bf16 row: every paired reference sample of this (model, mode)."""
    row = Result(model=model_name, mode=mode, row="bf16", kind="baseline", bits=16, weight_bytes=weight_bytes(ref))
    for r in results:
        row.decode_s += r.ref_decode_s
        row.prefill_s += r.ref_prefill_s
    row.ref_decode_s, row.ref_prefill_s = row.decode_s, row.prefill_s
    if not row.decode_s:
        row.error = "no sample: pick another row with --rows (bf16 is the reference every row is timed against)"
    return row


def run_model(model_name: str, variants: list[Variant], args: argparse.Namespace) -> list[Result]:
    _progress(f"[{model_name}] building the bf16 model")
    base, tokenizer = models.build(model_name)
    out = []
    for mode in args.modes:
        _progress(f"[{model_name} / {mode}] preparing the bf16 reference")
        bench = Bench(base, tokenizer, model_name, mode, args)
        results = []
        for v in variants:
            if v.name == "bf16":
                continue
            _progress(f"[{model_name} / {mode}] {v.name} (process RSS before: {_rss_gb():.1f} GB)")
            results.append(bench.measure(v))
            if results[-1].error:
                _progress(f"    failed: {results[-1].error}")
        out += [_bf16_row(results, bench.ref, model_name, mode), *results]
        del bench
        torch._dynamo.reset()
        gc.collect()
    return out


# ---- reporting --------------------------------------------------------------------------------
def _table(results: list[Result], args: argparse.Namespace) -> str:
    from tabulate import tabulate

    head = ["row", "kind", "bits", "weights MB", "x bf16 bytes", "decode tok/s", "x bf16", "prefill tok/s", "x bf16",
            "graphs warm/timed", "breaks", "reps"]
    bf16 = next((r for r in results if r.row == "bf16"), None)
    body, errors = [], []
    for r in results:
        cells = [r.row, r.kind, r.bits]
        if r.error:
            errors.append(f"[{len(errors) + 1}] {r.row}: {r.error}")
            body.append(cells + [f"failed [{len(errors)}]"] + [""] * (len(head) - 4))
            continue
        size = f"{r.weight_bytes / bf16.weight_bytes:.3f}" if bf16 and bf16.weight_bytes else ""
        graphs = f"{r.graphs_warmup}/{r.graphs_timed}" if r.mode == "compiled" and r.row != "bf16" else ""
        body.append(cells + [f"{r.weight_bytes / 1e6:,.1f}", size,
                             f"{1 / _stat(r.decode_s, 'median'):.2f}", f"{r.decode_x():.2f}",
                             f"{args.prefill_len / _stat(r.prefill_s, 'median'):.1f}", f"{r.prefill_x():.2f}",
                             graphs, r.graph_breaks if r.mode == "compiled" and r.row != "bf16" else "",
                             len(r.decode_s)])
    table = tabulate(body, head, tablefmt="github" if args.markdown else "simple", disable_numparse=True)
    return "\n".join([table, *errors])


def _verdict(ratio: float, target: float) -> str:
    return "MET   " if ratio >= target else "MISSED"


def _targets(results: list[Result]) -> list[str]:
    """The CPU targets on tinyllama-1.1b, each from ratios measured in this run (medians; ratio of
    minimums in brackets).  Peer comparisons divide the two rows' speed-ups over their paired bf16."""
    ok = {(r.mode, r.row): r for r in results if r.model == TARGET_MODEL and not r.error}
    if not any(r.model == TARGET_MODEL for r in results):
        return [f"- n/a: the targets are on {TARGET_MODEL}, not measured in this run"]
    lines = []
    for row, mode, target in DECODE_TARGETS:
        r = ok.get((mode, row))
        lines.append(f"- n/a    decode {row} {mode}: not measured" if r is None else
                     f"- {_verdict(r.decode_x(), target)} decode {row} {mode}: {r.decode_x():.2f}x bf16 "
                     f"(target >= {target:g}x; mins {r.decode_x('min'):.2f}x)")
    for mode in MODES:
        mine = [r for (m, _), r in ok.items() if m == mode and r.kind == "fxquant"]
        for r in mine:
            for p in (p for (m, _), p in ok.items() if m == mode and p.kind == "peer" and p.bits == r.bits):
                x, xm = r.decode_x() / p.decode_x(), r.decode_x("min") / p.decode_x("min")
                lines.append(f"- {_verdict(x, 1.0)} decode {r.row} {mode} vs {p.row}: {x:.2f}x (mins {xm:.2f}x)")
            lines.append(f"- {_verdict(r.prefill_x(), 1.0)} prefill {r.row} {mode}: {r.prefill_x():.2f}x bf16 "
                         f"(target >= 1x; mins {r.prefill_x('min'):.2f}x)")
    return lines


def _header(args: argparse.Namespace, load_before: float) -> list[str]:
    versions = []
    for dist in ("torch", "transformers", "torchao", "optimum-quanto", "bitsandbytes"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    return [f"command: python tools/bench_e2e.py {' '.join(args.argv)}".rstrip(),
            f"cpu: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads of {os.cpu_count()} "
            f"logical cpus; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
            f"versions: {', '.join(versions)}",
            f"protocol: batch 1 greedy; decode {args.prompt_len}-token prompt + {args.new_tokens} new tokens "
            f"(prefill excluded); prefill {args.prefill_len}-token prompt, max_new_tokens=1; {args.reps} reps, "
            "each interleaved with a bf16 reference; ratios = bf16 median / row median"]


def _profile(args: argparse.Namespace) -> int:
    model_name, mode = args.models[0], args.modes[0]
    base, tokenizer = models.build(model_name)
    bench = Bench(base, tokenizer, model_name, mode, args, reference=False)
    model = bench.make(BY_NAME[args.profile])
    print(f"{model_name} / {mode} / {args.profile}: {args.profile_steps} decode steps "
          f"after a {args.prompt_len}-token prompt, top ops by self CPU time")
    print(timing.profile_decode(model, bench.decode_ids, args.profile_steps, bench.kw))
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [v.name for v in VARIANTS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(models.MODELS), default=["smollm2", TARGET_MODEL])
    p.add_argument("--rows", nargs="+", choices=names, default=names, metavar="ROW", help=f"rows: {', '.join(names)}")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--no-peers", action="store_true", help="skip the torchao / quanto / bitsandbytes rows")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: new tokens per generate (default 128)")
    p.add_argument("--prompt-len", type=int, default=128, help="decode: prompt tokens (default 128)")
    p.add_argument("--prefill-len", type=int, default=512, help="prefill: prompt tokens (default 512)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per row (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--json", type=Path, help="also write every result and sample to this file")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    p.add_argument("--profile", choices=names, metavar="ROW",
                   help="instead of the benchmark: torch.profiler over decode steps of ROW (first model and mode)")
    p.add_argument("--profile-steps", type=int, default=8, help="decode steps profiled (default 8)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.new_tokens < 2 or min(args.prompt_len, args.prefill_len, args.reps, args.profile_steps) < 1:
        p.error("--new-tokens must be >= 2; --prompt-len, --prefill-len, --reps, --profile-steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        return _profile(args)
    load_before = os.getloadavg()[0]
    variants = [v for v in VARIANTS if v.name in args.rows and not (args.no_peers and v.kind == "peer")]
    results = []
    with torch.no_grad():
        for name in args.models:
            results += run_model(name, variants, args)
    print("\n".join(_header(args, load_before)))
    for name in args.models:
        for mode in args.modes:
            print(f"\n{name} / {mode} (x bf16: against the bf16 reference timed in the same rounds as the row; "
                  "the bf16 row pools all those samples):")
            print(_table([r for r in results if (r.model, r.mode) == (name, mode)], args))
    targets = _targets(results)
    print(f"\ntargets ({TARGET_MODEL}, CPU, ratios measured in this run):")
    print("\n".join(targets))
    if args.json:
        report = dict(header=_header(args, load_before), args={k: str(v) for k, v in vars(args).items()},
                      results=[dataclasses.asdict(r) for r in results], targets=targets)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
