"""Match pass: find every linear site in the graph and record it in ``ctx.sites``.

Patterns (``W`` is the ``[N, K]`` weight, ``param`` a get_attr tensor, ``param.T`` any 2-D
transpose of it: ``.t()``, ``.T``, ``.mT``, ``permute(1, 0)``, ``transpose(0, 1)``, ``swapaxes``):
- ``aten.linear(x, W[, b])`` and ``F.linear`` in FX graphs;
- ``aten.addmm(b, x, W.T)`` / ``aten.mm(x, W.T)``: against ``param.T`` (W = param) or a raw
  ``[K, N]`` param (W = param.T, e.g. GPT-2's Conv1D);
- ``aten.matmul(x, param)`` / ``x @ param`` / ``torch.matmul``: same two cases;
- ``call_module`` of an ``nn.Linear`` (FX graphs).
A site is named by the FQN of the ``nn.Linear`` whose forward calls it (``nn_module_stack``), so a
tied ``lm_head`` is ``lm_head``; other sites are named by their weight's attribute path.  A linear
whose weight is not a parameter/buffer is recorded as skipped with the reason.  A weight that is a
buffer or a constant tensor rather than an ``nn.Parameter`` (a fixed projection, a lookup matrix)
is recorded with ``weight_kind="buffer"``: the resolve pass quantizes it only when a rule names it.
"""
from __future__ import annotations

import operator
import re
import weakref

import torch
import torch.fx
import torch.nn.functional as F

from .. import experts
from ._base import GraphRef, PassContext, PassResult, Site, get_attr_path, meta, node_arg

aten = torch.ops.aten

_LINEAR_TARGETS = {aten.linear.default: "aten.linear", F.linear: "F.linear", torch._C._nn.linear: "F.linear"}
_MM_TARGETS = {aten.mm.default: "mm", aten.matmul.default: "matmul", torch.matmul: "matmul",
               operator.matmul: "matmul", torch.mm: "mm"}
_ADDMM_TARGETS = {aten.addmm.default: "addmm", torch.addmm: "addmm"}
# ops that swap the two dims of a 2-D tensor (``W.T`` exports as ``aten.numpy_T``, ``W.mT`` as ``aten.mT``)
_SWAPS = {aten.t.default, aten.t_copy.default, aten.numpy_T.default, aten.mT.default, aten.mH.default,
          aten.adjoint.default, torch.t, torch.adjoint}
_LAST_TWO = {aten.mT.default, aten.mH.default, aten.adjoint.default, torch.adjoint}  # on any dims
_TRANSPOSES = {aten.transpose.int, aten.transpose_copy.int, aten.swapaxes.default, aten.swapdims.default,
               torch.transpose, torch.swapaxes, torch.swapdims}


def _param(gm: torch.fx.GraphModule, node, ndim: int = 2) -> tuple[str, bool] | None:
    """``(attr_path, transposed)`` if ``node`` is an ``ndim``-D get_attr tensor (2-D: a linear weight, 3-D:
    a mixture-of-experts weight) or that tensor with its last two dims swapped (``.t()``, ``.T``, ``.mT``,
    ``.mH`` / adjoint (real), ``transpose`` / ``swapaxes``, ``permute``; ``.t()`` / ``.T`` only when 2-D)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        t = get_attr_path(gm, node.target)
        return (node.target, False) if isinstance(t, torch.Tensor) and t.dim() == ndim else None
    base = node.args[0] if node.args else None
    last_two = [ndim - 2, ndim - 1]
    swapped = [*range(ndim - 2), ndim - 1, ndim - 2]
    transposes = False
    if node.op == "call_function":
        if node.target in _SWAPS:  # .t() and .T reverse every dim: the last two only on a 2-D tensor
            transposes = ndim == 2 or node.target in _LAST_TWO
        elif node.target in (aten.permute.default, aten.permute_copy.default, torch.permute):
            transposes = [d % ndim for d in node.args[1]] == swapped
        elif node.target in _TRANSPOSES:
            transposes = sorted(d % ndim for d in node.args[1:3]) == last_two
        elif node.target is getattr and node.args[1] in ("T", "mT", "mH", "H"):
            transposes = ndim == 2 or node.args[1] in ("mT", "mH")
    elif node.op == "call_method":
        if node.target in ("t", "adjoint"):
            transposes = ndim == 2 or node.target == "adjoint"
        elif node.target == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            transposes = [d % ndim for d in dims] == swapped
        elif node.target in ("transpose", "swapaxes", "swapdims"):
            transposes = sorted(d % ndim for d in node.args[1:3]) == last_two
    if not transposes:
        return None
    inner = _param(gm, base, ndim)
    return (inner[0], not inner[1]) if inner else None


def _expert_param(gm: torch.fx.GraphModule, node) -> tuple[str, bool] | None:
    """:func:`_param` of a 3-D (mixture-of-experts) weight."""
    return _param(gm, node, 3)


def weight_view(gm: torch.fx.GraphModule, node) -> tuple[str, bool] | None:
    """:func:`_param` of a linear weight or of a mixture-of-experts one."""
    return _param(gm, node) or _param(gm, node, 3)


def _experts_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Site | None:
    """``grouped_mm(x, M, offs)`` against a 3-D parameter: ``M = param.mT`` (W = param, ``[E, N, K]``) or
    ``M = param`` (W = param.mT: stored ``[E, K, N]``).  Named by the parameter's path."""
    if node.op != "call_function" or not experts.is_grouped_mm(node.target) or len(node.args) < 2:
        return None
    offs = 2 if len(node.args) > 2 else ("offs" if node.kwargs.get("offs") is not None else None)
    p = _expert_param(gm, node.args[1])
    if p is None or offs is None or set(node.kwargs) - {"offs"} or _expert_param(gm, node.args[0]) is not None:
        return None
    site = Site(name=p[0], kind="grouped_mm", graph=GraphRef(node, 0, None, offs), weight_attr=p[0],
                transposed=not p[1])
    return _finish(gm, site)


def _bmm_experts_site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Site | None:
    """``bmm(x, M)`` with ``x`` ``[E, T, K]`` (every expert's tokens, Llama 4) against a 3-D parameter:
    ``M = param`` (stored ``[E, K, N]``: W = param.mT) or ``M = param.mT`` (W = param)."""
    if node.op != "call_function" or node.target not in _BMM or len(node.args) != 2 or node.kwargs:
        return None
    p = _expert_param(gm, node.args[1])
    if p is None or _expert_param(gm, node.args[0]) is not None:
        return None
    site = Site(name=p[0], kind="bmm", graph=GraphRef(node, 0, None), weight_attr=p[0], transposed=not p[1])
    return _finish(gm, site)


_BMM = {aten.bmm.default, torch.bmm}


def _clean_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return ".".join(p.split("@")[0] for p in path.split(".") if p)


def _calling_linear(node: torch.fx.Node, model: torch.nn.Module | None) -> str | None:
    """FQN of the nn.Linear whose forward contains ``node`` (innermost module), if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    path = _clean_path(str(path))
    if not path:
        return None
    if model is not None:
        try:
            return path if isinstance(model.get_submodule(path), torch.nn.Linear) else None
        except AttributeError:
            pass
    name = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return path if name.split(".")[-1] == "Linear" else None


def _site_for(gm: torch.fx.GraphModule, node: torch.fx.Node, model) -> Site | None:
    kind, x_arg, w_node, bias = None, 0, None, None
    if node.op == "call_function" and experts.is_grouped_mm(node.target):
        return _experts_site(gm, node)
    if node.op == "call_function" and node.target in _BMM:
        return _bmm_experts_site(gm, node)
    if node.op == "call_function" and node.target in _LINEAR_TARGETS:
        kind = _LINEAR_TARGETS[node.target]
        w_node = node_arg(node, 1 if len(node.args) > 1 else "weight")
        bias = 2 if len(node.args) > 2 else ("bias" if node.kwargs.get("bias") is not None else None)
        p = _param(gm, w_node)
        # linear(x, param) has W = param; linear(x, param.T) has W = param.T
        found = p
    elif node.op == "call_function" and (node.target in _MM_TARGETS or node.target in _ADDMM_TARGETS):
        if node.target in _ADDMM_TARGETS:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return None
            kind = _ADDMM_TARGETS[node.target]
            bias, x_arg, w_node = 0, 1, node.args[2]
        else:
            kind = _MM_TARGETS[node.target]
            w_node = node.args[1]
        p = _param(gm, w_node)
        if p is None or _param(gm, node.args[x_arg]) is not None:
            return None  # activation x activation, or param @ param: not a linear layer
        # x @ M with M = W.T: M = param.T means W = param; M = param means W = param.T
        found = (p[0], not p[1])
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Linear):
        mod = gm.get_submodule(node.target)
        ref = GraphRef(node, 0, f"{node.target}.bias" if mod.bias is not None else None)
        site = Site(name=node.target, kind="call_module", graph=ref, weight_attr=f"{node.target}.weight")
        return _finish(gm, site)
    else:
        return None
    name = _calling_linear(node, model)
    if found is None:
        if kind not in ("aten.linear", "F.linear"):
            return None
        return Site(name=name or node.name, kind=kind, graph=GraphRef(node), status="skipped",
                    reason="weight is computed in the graph, not a parameter or buffer")
    b = node_arg(node, bias)
    if isinstance(b, torch.fx.Node) and "val" in b.meta and getattr(b.meta["val"], "dim", lambda: 1)() != 1:
        return None  # addmm with a 2-D "bias" is not a linear layer
    site = Site(name=name or found[0], kind=kind, graph=GraphRef(node, x_arg, bias), weight_attr=found[0],
                transposed=found[1])
    return _finish(gm, site)


def _finish(gm: torch.fx.GraphModule, site: Site) -> Site:
    w = get_attr_path(gm, site.weight_attr)
    if w.dim() == 3:
        site.experts = int(w.shape[0])
    n, k = (w.shape[-1], w.shape[-2]) if site.transposed else tuple(w.shape[-2:])
    site.out_shape = (int(n), int(k))
    site.weight_dtype = w.dtype
    site.weight_storage = (w.device, w.untyped_storage().data_ptr())
    site.weight_ref = weakref.ref(w)
    site.bytes_before = w.numel() * w.element_size()
    if not isinstance(w, torch.nn.Parameter):
        site.weight_kind = "buffer"
    return site


def match_linears(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Record one Site per linear pattern in ``ctx.sites`` (graph unchanged)."""
    for node in gm.graph.nodes:
        site = _site_for(gm, node, ctx.model)
        if site is not None:
            ctx.sites.append(site)
            meta(node)["site"] = site.name
    sited = {s.weight_attr for s in ctx.sites if s.experts}
    batched = [b for b in _batched_weights(gm) if b[0] not in sited]
    if batched:
        mb = sum(b for *_, b in batched) / 2**20
        shown = "; ".join(f"{p} {list(shape)} ({op})" for p, shape, op, _ in batched[:3])
        more = f"; and {len(batched) - 3} more" if len(batched) > 3 else ""
        ctx.notes.append(f"left float: {len(batched)} weight tensors of 3 or more dims used in matrix products "
                         f"({mb:.3g} MiB; e.g. mixture-of-experts weights): {shown}{more}. fxquant quantizes 2-D "
                         "linear weights and expert weights read by a grouped matmul (transformers' default "
                         "experts_implementation, 'grouped_mm'); these stay in float")
    return PassResult(gm, modified=False)


_LAYOUT_OPS = {"transpose", "permute", "view", "reshape", "expand", "contiguous", "select", "index", "getitem",
               "slice", "t", "unsqueeze", "squeeze", "clone", "alias", "numpy_T", "mT"}


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


def _batched_weights(gm: torch.fx.GraphModule) -> list[tuple[str, tuple, str, int]]:
    """Parameters of 3+ dims that reach a matrix product (``bmm``, ``matmul``, ``einsum``, a grouped
    mm, through layout ops only): ``(path, shape, the product's op, bytes)`` each, once."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = get_attr_path(gm, node.target)
        if not isinstance(t, torch.nn.Parameter) or t.dim() < 3:
            continue
        frontier, seen, product = list(node.users), set(), None
        while frontier and product is None and len(seen) < 64:
            user = frontier.pop()
            if user in seen or user.op not in ("call_function", "call_method"):
                continue
            seen.add(user)
            op = _op_name(user)
            name = op.split(".")
            base = name[-2] if len(name) > 1 and name[-1] in ("default", "int", "Tensor") else name[-1]
            if any(k in base for k in ("mm", "matmul", "einsum")):
                product = op.removesuffix(".default")
            elif base.rstrip("_") in _LAYOUT_OPS or base.endswith("_copy"):
                frontier.extend(user.users)
        if product is not None:
            out.append((node.target, tuple(t.shape), product, t.numel() * t.element_size()))
    return out
