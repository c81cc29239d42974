"""Definition machinery shared by every weight-only linear op.

An op is ``fxquant::<name>(Tensor x, <weight tensors>, Tensor? bias, <scalars>,
ScalarType? compute_dtype=None) -> Tensor`` computing ``x @ W.T + bias`` where ``W`` is what the
format's ``dequantize(**tensors, **scalars)`` returns (float32 ``[N, K]``).  :func:`define`
registers, from one :class:`LinearOpDef`:

- the schema (explicit: named tensors and named scalars, no positional lists of magic ints);
- the argument check (``LinearOpDef.check``, helpers in :mod:`._validate`), run by every impl below;
- the fake impl (shape ``x.shape[:-1] + (N,)``, dtype of ``x``);
- the reference, registered for every backend: dequantize, then ``F.linear`` in
  ``compute_dtype`` (fp32 when ``None``), cast to ``x.dtype``; it *defines* the op;
- the CPU impl: the format's fast kernels (routed by M), else dequantize + dense GEMM, every path
  under one ``compute_dtype`` policy (:func:`._cpu.numerics`).  ``None``: fp32 activations are
  rounded to bf16 once, on every path and at every M, on a CPU whose dense path is bf16
  (``_cpu.dense_dtype()``: AVX512-BF16 / AMX), and never elsewhere; products exact, sums and
  result fp32 (no weight or output rounded to bf16).  bf16 activations are used as they are (the
  result rounded to bf16 once); fp16 ones are never rounded to bf16 (fp32 arithmetic, the result
  rounded to fp16).  ``torch.float32``: never rounded, fp32 everywhere; ``torch.bfloat16``: rounded
  on every path (weights and outputs may be too: the bf16 reference); ``torch.float16``: the fp16
  reference.  Ops that quantize their activations themselves (``dynamic_activations``) never round
  them to bf16 under ``None``;
- the CUDA impl: the format's Triton launcher (falls back to the reference without one);
- autograd for ``x`` and ``bias`` (the quantized weight is frozen, as in QLoRA).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import _cpu
from ._dequant_gemm import block_rows, blocked_linear
from ._experts import define_experts
from ..kernels import native_entry

LIB = torch.library.Library("fxquant", "DEF")


@dataclass(frozen=True)
class LinearOpDef:
    """What a format supplies to get a full op.

    ``scalars``: ``(name, schema type)`` pairs, e.g. ``("group_size", "int")``.
    ``out_features(**tensors, **scalars) -> int``.
    ``check(x, bias, **tensors, **scalars)``: raises ``ValueError`` unless ``x``'s last dim is the
    weight's in_features, every stored tensor has the dtype and shape the layout implies and ``bias``
    is ``[N]`` (:mod:`._validate`); the fake impl, the reference, the CPU and the CUDA impl run it.
    ``cpu_fast(x2d, **tensors, **scalars, nm) -> y2d | None``: the fast kernel, returning ``[M, >= N]``
    in any float dtype, or ``None`` when it does not apply to these inputs; ``nm``
    (:class:`._cpu.Numerics`) says what it may round (not called with ``compute_dtype=float16``).
    ``cuda(x2d, **tensors, bias=..., **scalars) -> y2d``: the Triton launcher.
    """

    name: str
    tensors: tuple[str, ...]
    scalars: tuple[tuple[str, str], ...]
    dequantize: Callable[..., torch.Tensor]
    out_features: Callable[..., int]
    check: Callable[..., None]
    cpu_fast: Optional[Callable[..., Optional[torch.Tensor]]] = None
    cuda: Optional[Callable[..., torch.Tensor]] = None
    doc: str = ""
    #: ops that are not "dequantize W, then a float GEMM" (dynamic activation quantization, ...)
    #: give their own definition ``(x, **tensors, bias=..., **scalars incl. compute_dtype) -> y``;
    #: it is the reference and the CPU path when ``cpu_fast`` does not apply.
    reference_fn: Optional[Callable[..., torch.Tensor]] = None
    #: ``cpu_fast`` is called at every M, not only below :func:`._cpu.large_m_threshold`: it is
    #: good at every M (e.g. a blocked dequantize + GEMM) or routes by M itself, returning None
    #: where the dequantize path (``block_decoder``) wins (its own measured crossover)
    cpu_fast_any_m: bool = False
    #: ``block_decoder(**tensors, **scalars, dtype) -> (decode, row_scale | None, row_multiple)``
    #: (``dtype``: the GEMM's, which ``decode`` writes): when set,
    #: the CPU dequantize path decodes the weight a block of rows at a time into a reused buffer
    #: and multiplies each block while it is in cache (:func:`._dequant_gemm.blocked_linear`;
    #: block starts are multiples of ``row_multiple``) instead of dequantizing all of it first
    #: (measured, int8wo 11008x4096 M=256: whole-weight dequantize alone 140 ms, fp32 GEMM 168 ms).
    block_decoder: Optional[Callable[..., tuple]] = None
    #: the op quantizes x itself (int8dq, LLM.int8, float8dq): ``compute_dtype=None`` never rounds
    #: its activations to bf16 (:func:`._cpu.numerics`)
    dynamic_activations: bool = False
    #: ``stored_in_features(**scalars) -> Kp`` for layouts that store K padded to whole groups: the
    #: CPU impl zero-pads ``x`` to ``Kp`` columns once (only when ``Kp != K``), so ``cpu_fast`` and
    #: ``block_decoder`` see the stored width and the padded columns meet zeros
    stored_in_features: Optional[Callable[..., int]] = None

    @property
    def schema(self) -> str:
        args = ["Tensor x", *(f"Tensor {t}" for t in self.tensors), "Tensor? bias",
                *(f"{typ} {name}" for name, typ in self.scalars), "ScalarType? compute_dtype=None"]
        return f"{self.name}({', '.join(args)}) -> Tensor"

    @functools.cached_property
    def arg_names(self) -> tuple[str, ...]:
        """The op's argument names in schema order (computed once: ``split`` runs on every call)."""
        return ("x", *self.tensors, "bias", *(n for n, _ in self.scalars), "compute_dtype")

    def split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict, torch.Tensor | None, dict]:
        """Positional/keyword op arguments -> (x, tensors, bias, scalars incl. compute_dtype)."""
        bound, tensors, scalars = self.bind(self.arg_names, args, kwargs)
        return bound["x"], tensors, bound.get("bias"), scalars

    def bind(self, names: tuple[str, ...], args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
        """Arguments of a schema whose positional names are ``names`` (this op's, or its experts
        twin's) -> (every argument by name, the packed tensors, the scalars incl. compute_dtype)."""
        bound = dict(zip(names, args))
        bound.update(kwargs)
        bound.setdefault("compute_dtype", None)
        scalars = {n: bound[n] for n, _ in self.scalars}
        scalars["compute_dtype"] = bound["compute_dtype"]
        return bound, {t: bound[t] for t in self.tensors}, scalars

    def dequantized(self, tensors: dict, scalars: dict) -> torch.Tensor:
        return self.dequantize(**tensors, **{k: v for k, v in scalars.items() if k != "compute_dtype"})

    def n_out(self, tensors: dict, scalars: dict) -> int:
        return self.out_features(**tensors, **{k: v for k, v in scalars.items() if k != "compute_dtype"})

    # -- the implementations -----------------------------------------------------------------
    def checked(self, x: torch.Tensor, tensors: dict, bias: torch.Tensor | None, scalars: dict) -> None:
        """Run :attr:`check` on split arguments (``compute_dtype`` is not its business)."""
        self.check(x, bias, **tensors, **{k: v for k, v in scalars.items() if k != "compute_dtype"})

    def reference(self, *args, **kwargs) -> torch.Tensor:
        """The op's definition (plain torch): dequantize, then ``F.linear`` in ``compute_dtype``."""
        x, tensors, bias, scalars = self.split(args, kwargs)
        self.checked(x, tensors, bias, scalars)
        return self.definition(x, tensors, bias, scalars)

    def definition(self, x: torch.Tensor, tensors: dict, bias: torch.Tensor | None, scalars: dict) -> torch.Tensor:
        """:meth:`reference` on split, already checked arguments."""
        if self.reference_fn is not None:
            return self.reference_fn(x, **tensors, bias=bias, **scalars)
        w = self.dequantized(tensors, scalars)
        cd = scalars["compute_dtype"] or torch.float32
        b = None if bias is None else bias.to(cd)
        return F.linear(x.to(cd), w.to(cd), b).to(x.dtype)

    def cpu(self, *args, **kwargs) -> torch.Tensor:
        x, tensors, bias, scalars = self.split(args, kwargs)
        plain = {k: v for k, v in scalars.items() if k != "compute_dtype"}  # what check / cpu_fast / block_decoder take
        self.check(x, bias, **tensors, **plain)
        return self.cpu_checked(x, tensors, bias, scalars, plain, self.n_out(tensors, scalars))

    def cpu_bound(self, tensors: dict, bias: torch.Tensor | None, scalars: dict) -> Callable[[torch.Tensor], torch.Tensor]:
        """The CPU impl with the weight's arguments bound: ``fn(x)`` computes exactly what the op does
        on a plain CPU ``x`` (the same :meth:`cpu_checked`), without the dispatcher, the argument
        binding and the stored tensors' check on every call: what a module calls at decode, where a
        small layer's kernel takes ~10-30 us and that overhead as much again.  ``x`` is checked in
        full the first time each (K, dtype) is seen; the caller keeps ``tensors`` and ``bias``
        unchanged (or builds a new ``fn``)."""
        scalars = {**scalars, "compute_dtype": scalars.get("compute_dtype")}
        plain = {k: v for k, v in scalars.items() if k != "compute_dtype"}
        n = self.n_out(tensors, scalars)
        seen: set = set()

        def fn(x: torch.Tensor) -> torch.Tensor:
            key = (x.shape[-1], x.dtype)
            if key not in seen:
                self.check(x, bias, **tensors, **plain)
                seen.add(key)
            return self.cpu_checked(x, tensors, bias, scalars, plain, n)

        return fn

    def cpu_checked(self, x: torch.Tensor, tensors: dict, bias: torch.Tensor | None, scalars: dict, plain: dict,
                    n: int) -> torch.Tensor:
        """:meth:`cpu` on split, checked arguments (``plain``: ``scalars`` without compute_dtype; ``n``:
        out_features)."""
        if x.shape[-1] == 0 or x.numel() == 0:  # empty reduction or no rows: nothing to compute
            y = x.new_zeros((*x.shape[:-1], n))
            return y + bias.to(x.dtype) if bias is not None else y
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        xs = x2  # x at the stored width: what cpu_fast and block_decoder take
        if self.stored_in_features is not None:
            kp = self.stored_in_features(**plain)
            if kp != x2.shape[1]:
                xs = F.pad(x2, (0, kp - x2.shape[1]))
        cd = scalars["compute_dtype"]
        # the compute_dtype policy of this call (module docstring); float16: the fp16 reference below
        nm = None if cd == torch.float16 else _cpu.numerics(x.dtype, cd, self.dynamic_activations)
        y = None
        small = self.cpu_fast_any_m or _cpu.rows(x) < _cpu.large_m_threshold()
        if self.cpu_fast is not None and small and nm is not None:
            y = self.cpu_fast(xs, **tensors, **plain, nm=nm)
        if y is None and self.reference_fn is not None:
            if nm is not None and nm.round_x and not self.dynamic_activations:  # x rounded once, then the definition
                return self.reference_fn(nm.rounded(x).to(x.dtype), **tensors, bias=bias, **scalars)
            return self.definition(x, tensors, bias, scalars)
        if y is None:
            dt = cd if nm is None else nm.gemm_dtype(x2)
            if self.block_decoder is not None:  # decodes the Kp stored columns: x at that width
                xg = xs if nm is None else nm.rounded(xs)
                decode, row_scale, mult = self.block_decoder(**tensors, **plain, dtype=dt)
                rows = max(mult, block_rows(xs.shape[1], dt) // mult * mult)
                y = blocked_linear(xg, n, xs.shape[1], decode, row_scale, dt, rows)
            else:  # the dequantized weight is [N, K]: x as it is
                xg = x2 if nm is None else nm.rounded(x2)
                y = F.linear(xg.to(dt), self.dequantized(tensors, scalars).to(dt))
        # the common case (a [M, N] result in x's dtype, 2-D x) returns y itself: every torch call
        # here costs microseconds, which a small layer at M = 1 feels
        if y.shape[1] != n:
            y = y[:, :n]
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        if x.dim() == 2 and y.is_contiguous():
            return y
        return y.contiguous().reshape(*x.shape[:-1], n)

    def cuda_impl(self, *args, **kwargs) -> torch.Tensor:
        x, tensors, bias, scalars = self.split(args, kwargs)
        self.checked(x, tensors, bias, scalars)
        if self.cuda is None:
            return self.definition(x, tensors, bias, scalars)
        n = self.n_out(tensors, scalars)
        cd = scalars.pop("compute_dtype")
        x2 = x.reshape(-1, x.shape[-1])
        y = self.cuda(x2.to(cd) if cd else x2, **tensors, bias=bias, **scalars)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    def fake(self, *args, **kwargs) -> torch.Tensor:
        x, tensors, bias, scalars = self.split(args, kwargs)
        self.checked(x, tensors, bias, scalars)
        return x.new_empty((*x.shape[:-1], self.n_out(tensors, scalars)))


def define(op: LinearOpDef):
    """Register ``torch.ops.fxquant.<op.name>`` (schema, fake, reference, CPU, CUDA, autograd)."""
    qualname = f"fxquant::{op.name}"
    LIB.define(op.schema)
    torch.library.impl(qualname, "CompositeExplicitAutograd", func=op.reference, lib=LIB)
    torch.library.impl(qualname, "CPU", func=op.cpu, lib=LIB)
    torch.library.impl(qualname, "CUDA", func=op.cuda_impl, lib=LIB)
    torch.library.register_fake(qualname, op.fake, lib=LIB)
    _register_autograd(op, qualname)
    define_experts(op, LIB)  # fxquant::<name>_experts: the same op over a stack of experts' weights
    packet = getattr(torch.ops.fxquant, op.name)
    packet.__doc__ = op.doc
    return packet


def _register_autograd(op: LinearOpDef, qualname: str) -> None:
    """Autograd for ``x`` and ``bias`` as this op's own Autograd kernel (an ``autograd.Function``).

    Not ``torch.library.register_autograd``: its generic Python wrapper (keyset metadata,
    redispatch) runs on every call; measured with a trivial kernel, the op's overhead over its CPU
    impl is 16 us here against 29 us with it (medians, warm), which a model's many small layers at
    M = 1 add up.  Here a plain CPU call with nothing requiring grad and no dispatch mode active
    goes straight to the CPU impl; everything else (grad, fake / functional tensors of
    torch.compile and export, tracing modes, CUDA) redispatches below autograd as usual.  Once the
    C++ entry is loaded (:mod:`fxquant.kernels.native_entry`), it shadows this kernel on CPU tensors
    of the ops it covers and hands their gradient calls to the twin ``_grad_<op>`` defined here."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    names = op.arg_names
    i_bias = 1 + len(op.tensors)
    overload = getattr(torch.ops.fxquant, op.name).default  # defined (LIB.define) before this runs

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                y = overload(*args)
            x, tensors, bias, scalars = op.split(args, {})
            ctx.tensors, ctx.scalars = tensors, scalars
            ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
            return y

        @staticmethod
        def backward(ctx, grad):
            w = op.dequantized(ctx.tensors, ctx.scalars)
            dx = (grad.float() @ w).to(ctx.x_dtype)
            db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
            grads = [None] * len(names)
            grads[0], grads[i_bias] = dx, db
            return tuple(grads)

    def with_grad(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        return Linear.apply(*(bound.get(n) for n in names))

    def autograd_kernel(*args, **kwargs):
        x, bias = args[0], (args[i_bias] if len(args) > i_bias else kwargs.get("bias"))
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return with_grad(*args, **kwargs)
        if type(x) is torch.Tensor and x.device.type == "cpu" and _get_current_dispatch_mode() is None:
            if not native_entry.tried:  # first plain CPU call: the C++ entry takes the next ones
                native_entry.ensure()
            return op.cpu(*args, **kwargs)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args, **kwargs)

    torch.library.impl(qualname, "Autograd", func=autograd_kernel, lib=LIB)
    # the twin the C++ entry (fxquant/kernels/native_entry.cpp) hands calls that need a gradient to
    LIB.define(op.schema.replace(op.name, f"_grad_{op.name}", 1))
    torch.library.impl(f"fxquant::_grad_{op.name}", "Autograd", func=with_grad, lib=LIB)
