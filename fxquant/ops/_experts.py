"""The mixture-of-experts twin of every weight-only linear op: one packed weight per expert.

``fxquant::<op>_experts(Tensor x, Tensor offs, <the op's tensors, each stacked over experts>,
<the op's scalars>, ScalarType? compute_dtype=None) -> Tensor`` is a grouped matmul, as
``torch._grouped_mm(x, W.mT, offs)`` computes it: ``x`` ``[S, K]`` holds the rows of each expert in
turn, ``offs`` ``[E]`` (int) the end of each expert's rows (a cumulative count, as transformers'
``grouped_mm_experts_forward`` builds it), and the rows of expert ``e`` are multiplied by expert
``e``'s weight: ``y[s:t] = <op>(x[s:t], tensors[e]...)`` (``x[s:t] / input_scale[e]`` with AWQ's
per-expert input scales ``[E, K]``).  Rows past ``offs[-1]`` (transformers'
expert-parallel sentinels) are zeros.  Each expert with rows is one call of the per-expert op, so
every kernel of the format (CPU native, Triton) serves experts unchanged.

The op is opaque to ``torch.compile`` / ``torch.export`` (its fake impl gives the ``[S, N]`` shape),
so a quantized MoE layer traces without a data-dependent loop, as transformers' own float fallback
(``transformers::grouped_mm_fallback``) does.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

SUFFIX = "_experts"


def _split(op, args: tuple, kwargs: dict):
    names = ("x", "offs", *op.tensors, *(n for n, _ in op.scalars), "compute_dtype", "input_scale")
    bound, tensors, scalars = op.bind(names, args, kwargs)
    return bound["x"], bound["offs"], list(tensors.values()), scalars, bound.get("input_scale")


def expert_rows(ends: list[int]):
    """``(expert, start, end)`` of each expert with rows, from each expert's end row (``offs`` as a list)."""
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            yield e, start, end
        start = end


def group_ends(n: int, t: int, device=None) -> torch.Tensor:
    """``offs`` of ``n`` groups of ``t`` rows each (a batched product as a grouped one)."""
    return torch.arange(1, n + 1, device=device, dtype=torch.int32) * t


def _check(op, x: torch.Tensor, offs: torch.Tensor, tensors: list, input_scale=None) -> int:
    """Shapes common to every format; returns the number of experts."""
    e = tensors[0].shape[0] if tensors and tensors[0].dim() > 0 else 0
    if x.dim() != 2:
        raise ValueError(f"fxquant.{op.name}{SUFFIX}: x must be [rows, in_features], got {list(x.shape)}")
    if offs.dim() != 1 or offs.dtype.is_floating_point or offs.shape[0] != e:
        raise ValueError(f"fxquant.{op.name}{SUFFIX}: offs must be an integer [{e}] tensor (one end per expert), "
                         f"got {offs.dtype} {list(offs.shape)}")
    for name, t in zip(op.tensors, tensors):
        if t.dim() == 0 or t.shape[0] != e:
            raise ValueError(f"fxquant.{op.name}{SUFFIX}: {name} must be stacked over the {e} experts (dim 0), "
                             f"got {list(t.shape)}")
    if input_scale is not None and tuple(input_scale.shape) != (e, x.shape[-1]):
        raise ValueError(f"fxquant.{op.name}{SUFFIX}: input_scale must be [{e}, {x.shape[-1]}] (one scale per "
                         f"expert and input channel), got {list(input_scale.shape)}")
    return e


def define_experts(op, lib) -> None:
    """Register ``fxquant::<op.name>_experts`` (schema, fake, one impl for every backend)."""
    name = op.name + SUFFIX
    args = ["Tensor x", "Tensor offs", *(f"Tensor {t}" for t in op.tensors),
            *(f"{typ} {n}" for n, typ in op.scalars), "ScalarType? compute_dtype=None", "Tensor? input_scale=None"]
    lib.define(f"{name}({', '.join(args)}) -> Tensor")
    base = getattr(torch.ops.fxquant, op.name).default

    def impl(*args, **kwargs):
        x, offs, tensors, scalars, scale = _split(op, args, kwargs)
        e = _check(op, x, offs, tensors, scale)
        ends = [int(v) for v in offs.tolist()]
        if any(b < a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] > x.shape[0]):
            raise ValueError(f"fxquant.{name}: offs must be non-decreasing ends of each expert's rows, at most "
                             f"{x.shape[0]}; got {ends}")
        pieces = []  # each expert's rows in order, then zeros past the last end
        for i, a, b in expert_rows(ends):
            xe = x[a:b] if scale is None else x[a:b] / scale[i].to(x.dtype)
            pieces.append(base(xe, *(t[i] for t in tensors), None, **scalars))
        start = ends[-1] if ends else 0
        if start < x.shape[0] or not pieces:
            n = op.n_out({t: v[0] for t, v in zip(op.tensors, tensors)}, scalars) if e else 0
            pieces.append(x.new_zeros((x.shape[0] - start, n)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def fake(*args, **kwargs):
        x, offs, tensors, scalars, scale = _split(op, args, kwargs)
        e = _check(op, x, offs, tensors, scale)
        if e == 0:
            return x.new_empty((x.shape[0], 0))
        first = {t: v[0] for t, v in zip(op.tensors, tensors)}
        op.checked(x, first, None, scalars)
        return x.new_empty((x.shape[0], op.n_out(first, scalars)))

    torch.library.impl(f"fxquant::{name}", "CompositeExplicitAutograd", func=impl, lib=lib)
    torch.library.register_fake(f"fxquant::{name}", fake, lib=lib)
    overload = getattr(torch.ops.fxquant, name).default

    def autograd_kernel(*args, **kwargs):
        # a plain eager call (a plain tensor, no dispatch mode) runs the loop right here: no redispatch below
        # autograd (a decode step calls this op twice per MoE layer), and a gradient for x flows through the
        # per-expert ops (their own autograd; the packed weights are frozen)
        x = args[0] if args else kwargs["x"]
        if type(x) is torch.Tensor and _get_current_dispatch_mode() is None:
            return impl(*args, **kwargs)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **kwargs)

    torch.library.impl(f"fxquant::{name}", "Autograd", func=autograd_kernel, lib=lib)
    # the twin the C++ entry (fxquant/kernels/native_entry.cpp) hands calls that need a gradient to: this
    # Python Autograd kernel (eager: the loop over the per-expert ops, whose own autograd gives x's gradient;
    # fake / traced tensors: the op below autograd, opaque to torch.compile as without the entry)
    lib.define(f"_grad_{name}({', '.join(args)}) -> Tensor")
    torch.library.impl(f"fxquant::_grad_{name}", "Autograd", func=autograd_kernel, lib=lib)
