"""Mixture-of-experts weights packed: a :class:`~fxquant.modules.PackedWeight` over ``[E, N, K]``.

transformers 5 keeps a MoE layer's experts as 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``; ``[E, K, N]`` where the model stores them transposed) and multiplies
them in one of its "experts implementations":

- ``grouped_mm`` (the default): ``torch._grouped_mm(x, W.mT, offs)`` /
  ``F.grouped_mm`` / ``transformers::grouped_mm_fallback`` on the rows sorted by expert;
- ``batched_mm``: ``torch.bmm(W[expert_ids], x[..., None])`` (one weight per row);
- ``eager``: a loop over the hit experts, ``F.linear(x_e, W[e])``.

A packed expert weight stacks each expert's packed tensors on dim 0 (``QuantizedWeight.experts``);
this module routes all three forms to ``torch.ops.fxquant.<op>_experts`` (``fxquant/ops/_experts.py``)
or, for one expert, to a 2-D :class:`PackedWeight` slice whose ``F.linear`` runs the usual op.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from .ops._experts import group_ends
from .schemes import QuantizedWeight

__all__ = ["each", "select", "stack", "experts_op", "grouped", "is_grouped_mm"]


def is_grouped_mm(func: Any) -> bool:
    """Whether ``func`` is a grouped matmul ``(x [S, K], w [E, K, N], offs [E]) -> [S, N]``: torch's
    (``torch._grouped_mm``, ``F.grouped_mm``, ``aten._grouped_mm``) or transformers' float fallback."""
    if func is not None and func in _GROUPED_FUNCS:
        return True
    return isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
        str(func).split(".")[:2] in (["aten", "_grouped_mm"], ["transformers", "grouped_mm_fallback"])


_GROUPED_FUNCS = {f for f in (getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None))
                  if f is not None}


def each(q: QuantizedWeight) -> Iterator[QuantizedWeight]:
    """The packed weight of each expert (views of the stacked tensors)."""
    for e in range(q.experts):
        yield select(q, e)


def select(q: QuantizedWeight, index) -> QuantizedWeight:
    """Expert ``index`` (an int: one 2-D packed weight) or experts ``index`` (a 1-D tensor: a stack)."""
    tensors = {n: t[index] for n, t in q.tensors.items()}
    experts = 0 if isinstance(index, int) else int(index.numel())
    return QuantizedWeight(q.op, tensors, dict(q.attrs), q.out_features, q.in_features, experts)


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight | str:
    """One packed weight per expert -> the stacked one, or why they cannot be stacked (a format whose
    layout depends on the values: another op, other scalars or tensor shapes from one expert to the next)."""
    first = parts[0]
    for i, q in enumerate(parts[1:], 1):
        if q.op != first.op or q.attrs != first.attrs or [(n, t.shape, t.dtype) for n, t in q.tensors.items()] != \
                [(n, t.shape, t.dtype) for n, t in first.tensors.items()]:
            return (f"the experts' packed layouts differ (expert {i}: {q.op} {q.attrs} against expert 0: "
                    f"{first.op} {first.attrs}); this format cannot be stacked over experts")
    tensors = {n: torch.stack([q.tensors[n] for q in parts]) for n in first.tensors}
    return QuantizedWeight(first.op, tensors, dict(first.attrs), first.out_features, first.in_features, len(parts))


def experts_op(q: QuantizedWeight):
    return getattr(torch.ops.fxquant, q.op + "_experts").default


def grouped(x: torch.Tensor, q: QuantizedWeight, offs: torch.Tensor,
            input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``y[rows of expert e] = x[those rows] @ W_e.T`` (``offs``: each expert's end row; ``input_scale``
    ``[E, K]``: AWQ's, those rows divided by row e first)."""
    kw = {} if input_scale is None else {"input_scale": input_scale}
    return experts_op(q)(x, offs, *q.tensors.values(), **q.attrs, **kw)


def _index(idx) -> Any:
    """An int for one expert (a Python int or a 0-d integer tensor), a 1-D long tensor for many, else None."""
    if isinstance(idx, int) and not isinstance(idx, bool):
        return idx
    if isinstance(idx, torch.Tensor) and not idx.dtype.is_floating_point and idx.dtype != torch.bool:
        if idx.dim() == 0:
            return int(idx)
        if idx.dim() == 1:
            return idx.long()
    return None


def route(cls, func, args: tuple, kwargs: dict):
    """``PackedWeight.__torch_function__`` for a packed experts weight: the grouped / batched / per-expert
    products and indexing; ``NotImplemented`` for anything else (the caller's usual handling, which also
    swaps the last two dims)."""
    w = args[0] if args and type(args[0]) is cls else None
    if w is not None and func is torch.Tensor.__getitem__ and w.float_data is None:
        idx = _index(args[1])
        if idx is not None:  # eager's W[e] (a 2-D packed weight) or batched_mm's W[expert_ids]
            scale = None if w.input_scale is None else w.input_scale[idx]
            return cls(select(w.packed, idx), w.transposed, w.dtype, None, scale)
    if is_grouped_mm(func):
        x = args[0]
        wt = args[1] if len(args) > 1 else kwargs.get("mat2")
        offs = args[2] if len(args) > 2 else kwargs.get("offs")
        extra = {k for k, v in kwargs.items() if v is not None} - {"offs", "mat2"}  # bias, out_dtype
        if (type(wt) is cls and wt.transposed and type(x) is not cls and offs is not None and not extra
                and x.dim() == 2):
            return grouped(x.to(wt.dtype) if x.dtype != wt.dtype else x, wt.packed, offs, wt.input_scale)
        return NotImplemented
    if func in (torch.bmm, torch.Tensor.bmm) and not kwargs and len(args) == 2:
        # bmm against one weight per batch entry b (W[expert_ids] of batched_mm: T = 1; Llama 4's
        # [E, T, K] tokens of every expert): a grouped product, entry b's rows ending at (b + 1) * T
        a, b = args
        if type(b) is cls and b.transposed and type(a) is not cls and a.dim() == 3:  # x_b @ W_b.T
            n_b, t, k = a.shape
            return grouped(a.reshape(-1, k), b.packed, group_ends(n_b, t, a.device), b.input_scale).reshape(n_b, t, -1)
        if type(a) is cls and not a.transposed and type(b) is not cls and b.dim() == 3:  # W_b @ x_b (columns)
            n_b, k, t = b.shape
            y = grouped(b.transpose(1, 2).reshape(-1, k), a.packed, group_ends(n_b, t, b.device), a.input_scale)
            return y.reshape(n_b, t, -1).transpose(1, 2)
    return NotImplemented
