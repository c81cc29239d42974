"""Command line: ``python -m fxquant demo`` and ``python -m fxquant inspect file.py:factory``."""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch


def _parse_spec(args: argparse.Namespace):
    from .spec import Spec

    text = args.spec
    if text and os.path.isfile(text):
        text = Path(text).read_text()
    if text and text.lstrip().startswith("{"):
        base = Spec.from_dict(json.loads(text))
    else:
        base = Spec(default=None if text in (None, "none", "None") else text)
    rules = list(base.rules)
    for r in args.rule or []:
        pat, sep, scheme = r.rpartition("=")
        if not sep:
            raise SystemExit(f"--rule {r!r}: expected PATTERN=SCHEME (SCHEME may be 'none')")
        rules.append((pat, None if scheme.lower() == "none" else scheme))
    return Spec(default=base.default, skip=tuple(base.skip) + tuple(args.skip or ()), rules=rules)


def load_factory(ref: str):
    """``path/to/file.py:factory`` -> ``(model, args, kwargs)`` from calling ``factory()``."""
    path, sep, name = ref.rpartition(":")
    if not sep or not path:
        raise SystemExit(f"expected path/to/file.py:factory, got {ref!r}")
    if not os.path.isfile(path):
        raise SystemExit(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).resolve().parent))
    spec.loader.exec_module(mod)
    if not hasattr(mod, name):
        raise SystemExit(f"{path} has no attribute {name!r}")
    result = getattr(mod, name)()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise SystemExit(f"{ref}() must return (model, example_inputs) or (model, example_inputs, example_kwargs)")
    model, args, *rest = result
    kwargs = rest[0] if rest else {}
    if isinstance(args, dict):
        args, kwargs = (), {**args, **kwargs}
    if not isinstance(args, tuple):
        args = (args,)
    return model, args, kwargs


def format_graph(gm: torch.fx.GraphModule, color: bool) -> str:
    """One line per node; fxquant op calls highlighted and annotated with site, scheme and rule."""
    lines = []
    for node in gm.graph.nodes:
        text = node.format_node() or str(node)
        info = node.meta.get("fxquant", {})
        if node.op == "call_function" and str(node.target).startswith("fxquant."):
            text = f"{text}    # {info.get('site')}: {info.get('scheme')} via {info.get('rule')}"
            if "awq_fold" in info:
                text = f"{text}; {info['awq_fold']}"
            text = f"\033[1;32m{text}\033[0m" if color else f">> {text}"
        elif "awq_fold" in info or "awq_input_scale" in info:  # AWQ's graph rewrites
            note = info.get("awq_fold") or f"{info.get('site')}: AWQ {info['awq_input_scale']}"
            text = f"{text}    # {note}"
            text = f"\033[1;33m{text}\033[0m" if color else f"~> {text}"
        else:
            text = f"   {text}" if not color else text
        lines.append(text)
    return "\n".join(lines)


def op_counts(gm: torch.fx.GraphModule) -> collections.Counter:
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module"))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import compile
    from .report import report

    spec = _parse_spec(args)
    model, ex_args, ex_kwargs = load_factory(args.factory)
    # methods that need data (GPTQ, AWQ, OneBit) calibrate on the factory's example inputs
    from .passes.calibration_inputs import Call

    calibration = [Call((ex_args, ex_kwargs))] if args.calibrate_on_example else None
    try:
        qm = compile(model, spec, ex_args, ex_kwargs, frontend=args.frontend, calibration=calibration)
    except ValueError as e:
        if calibration is None and "need calibration data" in str(e):
            raise SystemExit(f"{e}\n(the CLI calibrates on the factory's example inputs with --calibrate-on-example; "
                             "for real calibration data call fxquant.compile / quantize_ from Python)") from None
        raise
    rep = report(qm)
    print(rep)
    print("\nop counts (before -> after):")
    before, after = collections.Counter(rep.op_counts_before), op_counts(qm)
    rows = [(k, before.get(k, 0), after.get(k, 0)) for k in sorted(set(before) | set(after))
            if before.get(k, 0) != after.get(k, 0) or "linear" in k or "fxquant" in k]
    from tabulate import tabulate

    print(tabulate(rows, headers=["op", "before", "after"]))
    if not args.no_graph:
        print("\nrewritten graph:")
        print(format_graph(qm, color=args.color or (args.color is None and sys.stdout.isatty())))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    spec = _parse_spec(args) if (args.spec or args.rule or args.skip) else None
    run_demo(spec, size=args.size, seq_len=args.seq_len, reps=args.reps, threads=args.threads)
    return 0


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="default scheme (e.g. int8wo, int4wo-128), a JSON spec, or a JSON file")
    p.add_argument("--skip", action="append", help="pattern of layers to keep in float (repeatable)")
    p.add_argument("--rule", action="append", help="PATTERN=SCHEME, first match wins (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fxquant", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="quantize the built-in Llama-style model and print the report")
    _spec_args(d)
    d.add_argument("--size", default="small", choices=["small", "tiny"], help="demo model size")
    d.add_argument("--seq-len", type=int, default=64)
    d.add_argument("--reps", type=int, default=10)
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("inspect", help="compile FILE.py:FACTORY and print the report and rewritten graph")
    i.add_argument("factory", help="path/to/file.py:factory, factory() -> (model, example_inputs[, kwargs])")
    _spec_args(i)
    i.add_argument("--frontend", default="auto", choices=["auto", "export", "fx"])
    i.add_argument("--no-graph", action="store_true", help="print only the report and op counts")
    i.add_argument("--calibrate-on-example", action="store_true",
                   help="use the example inputs as the calibration data (for @gptq / @awq / @onebit specs)")
    i.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad spec / option: one clear line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
