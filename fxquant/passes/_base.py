"""Types shared by the passes: the context, the result, and the per-site record.

A :class:`Site` is one decision of the *plan*: which linear, which scheme and why, and (after the
quantize pass) the packed weight.  It holds no reference into the traced graph except its
:class:`GraphRef`, which the graph emit (``compile``'s rewrite pass) uses and the in-place emit
(``quantize_``) drops before any weight is quantized, so the plan outlives the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from ..schemes import QuantizedWeight, Scheme
from ..spec import Spec


class PassError(RuntimeError):
    """A pass failed; the message names the pass and the passes run before it."""


class InputError(ValueError):
    """Bad user input a pass found (e.g. a method that needs calibration data got none): raised as is."""


@dataclass
class GraphRef:
    """Where a site is in the traced graph: the node and where its ``x`` / bias arguments are."""

    node: torch.fx.Node
    x_arg: int = 0  # index of x in node.args (read at rewrite time: earlier rewrites replace nodes)
    bias: Any = None  # arg index / kwarg name of the bias on node, dotted attr path (call_module), or None
    offs: Any = None  # a grouped matmul's (experts): arg index / kwarg name of each expert's end row


@dataclass
class Site:
    """One linear site: ``y = x @ W.T + b`` with ``W = param`` or ``param.T`` (``transposed``); for a
    mixture of experts (``experts`` > 0) ``W`` is ``[E, N, K]`` and the rows of x go to their expert's.

    Filled in by the passes in order: match (name ... weight_kind), resolve (scheme, rule),
    quantize (qweight, status, reason, rel_error, bytes), rewrite (``graph.node`` becomes the op call).
    """

    name: str
    kind: str  # pattern that matched: "aten.linear", "addmm", "mm", "matmul", "F.linear", "call_module"
    graph: GraphRef | None = None
    weight_attr: str | None = None  # dotted path of the weight tensor (same on the model and its trace)
    transposed: bool = False
    weight_kind: str = "parameter"  # "parameter" | "buffer" (a buffer or constant tensor: rules opt it in)
    out_shape: tuple[int, int] | None = None  # (N, K) of W (of each expert's W for a mixture of experts)
    experts: int = 0  # a mixture-of-experts weight ``[E, N, K]`` (kind "grouped_mm"): E, else 0
    weight_dtype: torch.dtype | None = None
    weight_storage: tuple | None = None  # (device, data_ptr) of the float weight's storage
    #: the float weight, weakly: its storage address means the same tensor only while it is alive
    weight_ref: Any = field(default=None, repr=False, compare=False)
    scheme: Scheme | None = None
    rule: str = ""
    status: str = "skipped"
    reason: str = ""
    qweight: QuantizedWeight | None = None
    rel_error: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    shared_with: str | None = None  # another site whose quantized buffers this one reuses
    #: AWQ's per-input-channel scale when it could not be folded: the op's input is ``x / input_scale``
    input_scale: torch.Tensor | None = field(default=None, repr=False)
    #: AWQ's per-input-channel scale ``s`` the stored weight carries (``W * s``), wherever ``1 / s`` went
    #: (the input, a norm, a linear's rows): what the site's output error divides the dequantized weight by
    awq_scale: torch.Tensor | None = field(default=None, repr=False)
    #: an AWQ inverse scale folded into this linear's output rows (``fxquant.passes.calibrate.Fold``:
    #: a later site's input scale): the weight quantized (or kept float) is ``W / scale[:, None]``
    out_fold: Any = field(default=None, repr=False)
    #: the method's per-layer result (method, parameters, time, weight and output errors)
    result: dict = field(default_factory=dict)

    @property
    def node(self) -> torch.fx.Node | None:
        return self.graph.node if self.graph is not None else None


@dataclass
class PassContext:
    """State the pipeline threads through the passes.

    ``read_weight(site)``: the float weight tensor of a site as stored (``[N, K]``, or ``[K, N]`` when
    ``site.transposed``); ``None`` reads it from the traced GraphModule.  ``on_quantized(site)``: called
    by the quantize pass right after each site is quantized (``quantize_`` lowers it into the module
    tree there, so float weights are freed layer by layer); ``None`` for ``compile``.
    """

    spec: Spec
    model: torch.nn.Module | None = None  # the user's model (read only), to resolve module types
    sites: list[Site] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    read_weight: Callable[[Site], torch.Tensor] | None = None
    on_quantized: Callable[[Site], None] | None = None
    #: iterable of model inputs for the calibrate pass (``None``: no data)
    calibration: Any = None
    #: AWQ scales folded into 1-D parameters (``fxquant.passes.calibrate.Fold``), applied by the emit
    folds: list = field(default_factory=list)
    #: whether a site's emit can divide its input by an AWQ scale, given all sites (``None``: every site can)
    input_scale_ok: Callable[[Site, list], bool] | None = None


@dataclass
class PassResult:
    gm: torch.fx.GraphModule | None
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
