"""Cleanup pass: drop float weights (and emptied modules) that no node reads any more."""
from __future__ import annotations

import torch
import torch.fx

from ._base import PassContext, PassResult, get_attr_path


def _delete(gm: torch.fx.GraphModule, path: str) -> None:
    *parents, leaf = path.split(".")
    mod = gm.get_submodule(".".join(parents)) if parents else gm
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def remove_dead_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Erase dead weight reads (get_attr, and transposes of one) and delete the float weights of
    quantized sites no node reads."""
    modified = False
    for node in reversed(list(gm.graph.nodes)):  # users before their inputs: a dead transpose, then its get_attr
        if not node.users and (node.op == "get_attr" or _is_weight_transpose(node)):
            gm.graph.erase_node(node)
            modified = True
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    paths: dict[int, list[str]] = {}  # a tensor at several paths (a module registered twice, tied weights)
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        paths.setdefault(id(t), []).append(name)
    for site in ctx.sites:
        if site.status != "quantized" or site.shared_with:
            continue
        try:
            tensor = get_attr_path(gm, site.weight_attr)
        except AttributeError:
            continue  # deleted for an earlier site
        where = paths.get(id(tensor), [site.weight_attr])
        if not any(_in_use(path, read, modules) for path in where):
            for path in where:
                _delete(gm, path)
            modified = True
    note_kept_float_weights(ctx.sites, gm)
    return PassResult(gm, modified)


def _in_use(path: str, read: set[str], modules: set[str]) -> bool:
    owner = path.rsplit(".", 1)[0] if "." in path else ""
    return path in read or any(m == owner or owner.startswith(m + ".") for m in modules)


def _is_weight_transpose(node: torch.fx.Node) -> bool:
    """A transpose of a get_attr tensor (what the match pass accepts as ``param.T``, or ``param.mT`` of
    experts): pure, so erasable once the site that read it is rewritten."""
    from .match import weight_view

    base = node.args[0] if node.args else None
    return (node.op in ("call_function", "call_method") and isinstance(base, torch.fx.Node)
            and base.op == "get_attr" and weight_view(node.graph.owning_module, node) is not None)


def note_kept_float_weights(sites, module: torch.nn.Module) -> None:
    """Give every quantized site whose float weight ``module`` still holds (a tied embedding) that
    reason; shared by both emits, so ``compile`` and ``quantize_`` report it alike."""
    alive = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        t = getattr(t, "float_data", t)  # a packed weight (quantize_) may hold its float tensor for other uses
        if t is not None and type(t) in (torch.Tensor, torch.nn.Parameter):
            alive.setdefault(_storage_of(t), name)
    for site in sites:
        # a freed weight's address may hold a new tensor (quantize_ frees as it goes): alive ones only
        key = site.weight_storage if site.weight_ref is not None and site.weight_ref() is not None else None
        if site.status == "quantized" and not site.shared_with and key in alive:
            site.reason = f"float weight kept: the same tensor is still used as {alive[key]!r} (tied weights)"


def _storage_of(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())
