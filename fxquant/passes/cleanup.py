"""Cleanup pass: drop float weights (and emptied modules) that no node reads any more."""
from __future__ import annotations

import torch
import torch.fx

from ._base import PassContext, PassResult


def _delete(gm: torch.fx.GraphModule, path: str) -> None:
    *parents, leaf = path.split(".")
    mod = gm.get_submodule(".".join(parents)) if parents else gm
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def remove_dead_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Erase unused get_attr nodes and delete the float weights of quantized sites no node reads."""
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            modified = True
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for site in ctx.sites:
        if site.status != "quantized" or site.shared_with:
            continue
        path = site.weight_attr
        owner = path.rsplit(".", 1)[0] if "." in path else ""
        if path not in read and not any(m == owner or owner.startswith(m + ".") for m in modules):
            _delete(gm, path)
            modified = True
    alive = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        alive.setdefault(_storage_of(t), name)
    for site in ctx.sites:
        key = site.weight_storage
        if site.status == "quantized" and not site.shared_with and key in alive:
            site.reason = f"float weight kept: the same tensor is still used as {alive[key]!r} (tied weights)"
    return PassResult(gm, modified)


def _storage_of(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())
