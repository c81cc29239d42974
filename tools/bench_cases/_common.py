"""What every benchmark-case module shares: the ``Unavailable`` signal, peer imports, module calls."""
from __future__ import annotations

import importlib
from typing import Any

import torch


class Unavailable(Exception):
    """This case cannot run here; tools/bench.py shows its row as ``n/a (message)``."""


def need(module: str):
    """Import ``module`` (a peer library) or raise :class:`Unavailable` naming it."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install failing at import
        raise Unavailable(f"{module} not importable: {type(e).__name__}") from e


def row(name: str, fmt: str, kind: str, act_dtype: torch.dtype, prepare, forward) -> dict[str, Any]:
    """One benchmark row, with the fields of ``tools.bench.Case``."""
    return dict(name=name, fmt=fmt, kind=kind, act_dtype=act_dtype, prepare=prepare, forward=forward)


def call(module: torch.nn.Module, x: torch.Tensor) -> Any:
    """``forward`` of the peer rows: the prepared state is the peer's quantized module."""
    return module(x)
