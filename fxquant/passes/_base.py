"""Types shared by the passes: the context, the result, and the per-site record."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from ..schemes import QuantizedWeight, Scheme
from ..spec import Spec


class PassError(RuntimeError):
    """A pass failed; the message names the pass and the passes run before it."""


@dataclass
class Site:
    """One linear site: ``y = x @ W.T + b`` with ``W = param`` or ``param.T`` (``transposed``).

    Filled in by the passes in order: match (name ... bias), resolve (scheme, rule),
    quantize (qweight, status, reason, rel_error, bytes), rewrite (op node).
    """

    name: str
    kind: str  # pattern that matched: "aten.linear", "addmm", "mm", "matmul", "F.linear", "call_module"
    node: torch.fx.Node | None
    x_arg: int = 0  # index of x in node.args (read at rewrite time: earlier rewrites replace nodes)
    weight_attr: str | None = None  # dotted attribute path of the weight tensor on the GraphModule
    transposed: bool = False
    bias: Any = None  # arg index / kwarg name of the bias on node, dotted attr path (call_module), or None
    out_shape: tuple[int, int] | None = None  # (N, K) of W
    weight_dtype: torch.dtype | None = None
    weight_storage: tuple | None = None  # (device, data_ptr) of the float weight's storage
    scheme: Scheme | None = None
    rule: str = ""
    status: str = "skipped"
    reason: str = ""
    qweight: QuantizedWeight | None = None
    rel_error: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    shared_with: str | None = None  # another site whose quantized buffers this one reuses


@dataclass
class PassContext:
    """State the pipeline threads through the passes."""

    spec: Spec
    model: torch.nn.Module | None = None  # the user's model (read only), to resolve module types
    sites: list[Site] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool = False


def node_arg(node: torch.fx.Node, where: Any) -> Any:
    """``node.args[where]`` for an int, ``node.kwargs.get(where)`` for a str, ``None`` for None."""
    if where is None:
        return None
    if isinstance(where, int):
        return node.args[where] if where < len(node.args) else None
    return node.kwargs.get(where)


def get_attr_path(root: torch.nn.Module, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def meta(node: torch.fx.Node) -> dict:
    """The ``node.meta["fxquant"]`` dict (created on first use)."""
    return node.meta.setdefault("fxquant", {})
