"""Rewrite pass: replace each quantized site by a call to its ``torch.ops.fxquant`` op.

The quantized tensors become buffers of the GraphModule, on the module at the site's path
(``layers.0.q_proj.qweight``) or, for a site named by a weight tensor ``a.w``, on ``a`` as
``w_qweight``.  Scalar arguments (group size, ...) are baked into the call as keyword arguments.
"""
from __future__ import annotations

import torch
import torch.fx

from ._base import PassContext, PassResult, Site, meta, node_arg


def _holder(gm: torch.fx.GraphModule, name: str) -> tuple[str, str]:
    """(module path, attribute prefix) where a site's buffers live; creates missing modules."""
    parts = name.split(".")
    mod, path = gm, []
    for i, part in enumerate(parts):
        child = getattr(mod, part, None)
        if isinstance(child, torch.Tensor):  # the site is named by a tensor: use its parent
            return ".".join(path), part + "_"
        if isinstance(child, torch.nn.Linear):  # FX: the call_module target is being replaced
            holder = torch.nn.Module()
            if child.bias is not None:
                holder.bias = child.bias
            setattr(mod, part, holder)
            child = holder
        if child is None:
            child = torch.nn.Module()
            mod.add_module(part, child)
        mod, path = child, path + [part]
    return ".".join(path), ""


def _register(gm: torch.fx.GraphModule, module_path: str, attr: str, t: torch.Tensor) -> str:
    mod = gm.get_submodule(module_path) if module_path else gm
    if hasattr(mod, attr) and getattr(mod, attr) is not t:
        raise RuntimeError(f"cannot register {attr!r} on {module_path or 'the root module'}: name taken")
    if not hasattr(mod, attr):
        mod.register_buffer(attr, t)
    return f"{module_path}.{attr}" if module_path else attr


def _rewrite(gm: torch.fx.GraphModule, site: Site, owners: dict[int, str]) -> None:
    qw = site.qweight
    node, ref = site.node, site.graph
    key = id(qw)
    if key not in owners:
        owners[key] = site.name
    module_path, prefix = _holder(gm, owners[key])
    graph = gm.graph
    with graph.inserting_before(node):
        tensor_nodes = [graph.get_attr(_register(gm, module_path, prefix + k, t)) for k, t in qw.tensors.items()]
        if site.kind == "call_module":  # the bias now lives on the holder module
            bias = graph.get_attr(f"{site.name}.bias") if ref.bias else None
        else:
            bias = node_arg(node, ref.bias)
        x = node_arg(node, ref.x_arg)
        if site.experts:  # a grouped matmul over the experts' stacked weights
            op = getattr(torch.ops.fxquant, qw.op + "_experts").default
            attrs = dict(qw.attrs)
            if site.input_scale is not None:  # AWQ's per-expert scales [E, K]: the op divides each expert's rows
                scale = site.input_scale.to(site.weight_dtype or torch.float32)
                attrs["input_scale"] = graph.get_attr(_register(gm, module_path, prefix + "awq_input_scale", scale))
            if site.kind == "bmm":  # x [E, T, K]: expert e's rows are x[e], T of them
                new = _bmm_experts(graph, op, x, site, tensor_nodes, attrs)
            else:
                new = graph.call_function(op, (x, node_arg(node, ref.offs), *tensor_nodes), attrs)
        else:
            op = getattr(torch.ops.fxquant, qw.op).default
            new = graph.call_function(op, (x, *tensor_nodes, bias), dict(qw.attrs))
    new.meta.update({k: v for k, v in node.meta.items() if k != "fxquant"})
    meta(new).update(site=site.name, scheme=str(site.scheme), rule=site.rule, replaced=str(node.target))
    if site.out_fold is not None:
        meta(new)["awq_fold"] = site.out_fold.note()
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    ref.node = new


def _bmm_experts(graph: torch.fx.Graph, op, x, site: Site, tensor_nodes: list, attrs: dict) -> torch.fx.Node:
    """``bmm(x [E, T, K], W.mT)`` as the experts op: x flattened to ``[E*T, K]``, expert e's rows
    ending at ``(e + 1) * T``, the result back to ``[E, T, N]``."""
    aten = torch.ops.aten
    (n, k), e = site.out_shape, site.experts
    flat = graph.call_function(aten.reshape.default, (x, [-1, k]))
    t = graph.call_function(aten.sym_size.int, (x, 1))
    ends = graph.call_function(aten.arange.start, (1, e + 1), {"dtype": torch.int32})
    offs = graph.call_function(aten.mul.Tensor, (ends, t))
    y = graph.call_function(op, (flat, offs, *tensor_nodes), attrs)
    return graph.call_function(aten.reshape.default, (y, [e, -1, n]))


def _apply_folds(gm: torch.fx.GraphModule, ctx: PassContext) -> None:
    """AWQ folds: the 1-D parameter becomes ``p / s`` on the GraphModule (a new tensor: the user's
    model keeps its own), noted on the get_attr node."""
    for fold in ctx.folds:
        owner, _, name = fold.attr.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        old = getattr(mod, name)
        new = fold.divided(old)
        if isinstance(old, torch.nn.Parameter):
            mod._parameters[name] = torch.nn.Parameter(new, requires_grad=False)
        else:
            setattr(mod, name, new)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target == fold.attr:
                meta(node)["awq_fold"] = fold.note()


def _divide_input(gm: torch.fx.GraphModule, site: Site, scales: dict) -> None:
    """``x / s`` before the site's node (AWQ's scale where it cannot be folded), one node per input."""
    node, ref = site.node, site.graph
    x = node_arg(node, ref.x_arg)
    key = (x, id(site.input_scale))
    if key not in scales:
        module_path, prefix = _holder(gm, site.name)
        scale = site.input_scale.to(site.weight_dtype or torch.float32)  # the activations' dtype
        attr = _register(gm, module_path, prefix + "awq_input_scale", scale)
        with gm.graph.inserting_before(node):
            div = gm.graph.call_function(torch.ops.aten.div.Tensor, (x, gm.graph.get_attr(attr)))
        meta(div).update(site=site.name, awq_input_scale="x / s before the op")
        scales[key] = div
    args = list(node.args)
    args[ref.x_arg] = scales[key]
    node.args = tuple(args)


def rewrite_linears(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Apply AWQ folds / input scales, then swap every quantized site's node for its fxquant op call reading the new buffers."""
    owners: dict[int, str] = {}
    modified = bool(ctx.folds)
    _apply_folds(gm, ctx)
    scales: dict = {}
    for site in ctx.sites:  # (experts: the op divides each expert's rows by its own scale)
        if site.status == "quantized" and site.input_scale is not None and not site.experts:
            _divide_input(gm, site, scales)
    for site in ctx.sites:
        if site.status == "quantized":
            _rewrite(gm, site, owners)
            modified = True
    return PassResult(gm, modified)
