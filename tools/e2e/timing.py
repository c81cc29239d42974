"""Timing HF ``generate`` (decode and prefill), compiling a model the HF way, counting graphs, and
profiling decode steps: the measuring half of tools/bench_e2e.py.

Decode time comes from a forward hook on the model that stamps ``perf_counter`` when each forward
returns.  ``generate(prompt, max_new_tokens=n, min_new_tokens=n)`` runs 1 prefill forward (its
logits give the first new token) and n - 1 decode forwards; the decode time per token is
``(stamp[n - 1] - stamp[0]) / (n - 1)``: every decode forward plus everything ``generate`` does per
step (logits processors, argmax, cache bookkeeping, input preparation), and nothing of the prefill.
Prefill time is one ``generate(prompt, max_new_tokens=1)`` call timed whole (the prefill forward, the
few ms of ``generate``'s setup, one token's selection).
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch


def generate_kwargs(model: torch.nn.Module, mode: str, cache_len: int) -> dict[str, Any]:
    """Greedy batch-1 ``generate`` arguments.  ``compiled`` uses the static cache of ``cache_len`` slots
    (the caller passes what ``generate`` would size it to: prompt + new tokens; decode and prefill get
    one each, compiled in the warm-up, so nothing recompiles in a timed call); ``eager`` keeps the
    default dynamic cache."""
    pad = model.config.pad_token_id
    kw: dict[str, Any] = dict(do_sample=False, num_beams=1, pad_token_id=0 if pad is None else pad)
    if mode == "compiled":
        kw.update(cache_implementation="static", max_cache_len=cache_len)
    return kw


def compile_forward(model: torch.nn.Module) -> None:
    """Compile ``model.forward`` in place, as the HF docs do with the static cache (``dynamic=False``:
    one graph per input shape).  ``fullgraph`` stays off so that a peer with graph breaks still runs;
    the breaks are counted (:func:`compile_stats`)."""
    model.forward = torch.compile(model.forward, dynamic=False)


def compile_stats() -> tuple[int, int]:
    """``(graphs compiled, graph breaks)`` so far in this process (dynamo's counters)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, kw: dict[str, Any]) -> torch.Tensor:
    # transformers sizes a new static cache to the largest it ever made on this model (to spare a
    # recompilation when a later call needs more): after the 513-slot prefill call every decode call
    # would attend over 513 slots.  Each call gets the cache a first call of its size would get (both
    # sizes are compiled in the warm-up; the timed calls count any graph compiled in them).
    if kw.get("cache_implementation") == "static" and hasattr(model, "_previous_max_cache_length"):
        model._previous_max_cache_length = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)


def decode_seconds_per_token(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, kw: dict[str, Any]) -> float:
    """Seconds per decode step of one ``generate`` call (see the module docstring); ``new_tokens`` >= 2."""
    stamps: list[float] = []
    hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        out = _generate(model, ids, new_tokens, kw)
    finally:
        hook.remove()
    if out.shape[1] != ids.shape[1] + new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens in {len(stamps)} forwards, "
                           f"expected {new_tokens}")
    return (stamps[-1] - stamps[0]) / (new_tokens - 1)


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor, kw: dict[str, Any]) -> float:
    """Seconds of one ``generate(ids, max_new_tokens=1)``."""
    t0 = time.perf_counter()
    _generate(model, ids, 1, kw)
    return time.perf_counter() - t0


def warm_up(model: torch.nn.Module, decode_ids: torch.Tensor, prefill_ids: torch.Tensor, kw: dict[str, Any],
            kw_prefill: dict[str, Any] | None = None) -> None:
    """Untimed calls of every shape the timed calls use: the prefill at both prompt lengths and a few
    decode steps (compiles every graph under ``torch.compile``; builds the native kernels and
    touches every weight eagerly)."""
    _generate(model, decode_ids, 3, kw)
    _generate(model, prefill_ids, 1, kw if kw_prefill is None else kw_prefill)


def profile_decode(model: torch.nn.Module, ids: torch.Tensor, steps: int, kw: dict[str, Any], top: int = 30) -> str:
    """torch.profiler over ``steps`` decode steps of one ``generate`` (the prefill and 2 warm steps are
    skipped by the schedule): a summary line (time per step, and the part spent outside every op:
    Python, module calls, generate's loop), then the top ``top`` ops by self CPU time, grouped by
    input shapes (so lm_head, attention projections and the MLP show apart), as text."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                 schedule=schedule(wait=1, warmup=2, active=steps, repeat=1)) as prof:
        hook = model.register_forward_hook(lambda *_: prof.step())
        try:
            _generate(model, ids, steps + 4, kw)
        finally:
            hook.remove()
    events = prof.key_averages()
    step = next((e for e in events if e.key.startswith("ProfilerStep")), None)
    summary = "" if step is None else (
        f"per decode step: {step.cpu_time_total / steps / 1e3:.2f} ms, of which outside any op (Python, "
        f"module calls, generate's loop) {step.self_cpu_time_total / steps / 1e3:.2f} ms\n")
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50, max_shapes_column_width=70)
    return summary + table
