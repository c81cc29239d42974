"""Argument validation for the ``torch.ops.fxquant.*`` linears.

Each op family has one ``check(x, bias, <stored tensors>, <scalars>)`` (in its op module), built from
these helpers and run by :class:`fxquant.ops._linear.LinearOpDef` in the fake impl, the reference,
the CPU impl and the CUDA impl (the Triton launchers call it too).  It checks that ``x``'s last dim
is the weight's ``in_features`` exactly, that every stored tensor has the dtype and shape the
layout implies for the op's scalars, and that ``bias`` is ``[out_features]``.

Errors are ``ValueError``s naming the op, the argument, the expected and the actual shape or dtype.
Under fake tensors with symbolic shapes (torch.export, torch.compile) a condition on a symbolic
size goes through ``torch._check_value``: a guard or a deferred runtime assertion, and an error
when it is provably false.

Cost: the ops run at M = 1 in decode loops, so a passing check is a few Python comparisons per
argument: no tensor ops, and no string is built unless a check fails (messages are lambdas or
constant strings).
"""
from __future__ import annotations

from typing import Callable, NoReturn

import torch


def fail(op: str, message: str) -> NoReturn:
    raise ValueError(f"fxquant::{op}: {message}")


def require(op: str, cond, message: Callable[[], str]) -> None:
    """Raise ``ValueError`` (``message()``) unless ``cond`` holds.  ``cond``: a bool, or a SymBool of
    symbolic sizes, then checked with ``torch._check_value`` (a guard / runtime assertion)."""
    if cond is True:
        return
    if cond is False:
        fail(op, message())
    torch._check_value(cond, lambda: f"fxquant::{op}: {message()}")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def activations(op: str, x: torch.Tensor, in_features) -> None:
    """``x`` a floating-point tensor ``[..., in_features]``."""
    if not x.dtype.is_floating_point or x.dim() == 0:
        fail(op, f"x must be a floating-point tensor [..., {in_features}], got {x.dtype} of shape {_shape(x)}")
    k = x.shape[-1]
    ok = k == in_features
    if ok is not True:
        require(op, ok, lambda: f"x has {k} input features (last dim of x, shape {_shape(x)}) but the "
                                f"weight has in_features={in_features}")


def stored(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, layout: str = "") -> None:
    """A stored tensor of exactly ``dtype`` and ``shape``; ``layout`` (e.g. ``"[Np, Kp/2]"``) is named
    in the message."""
    if t.dtype != dtype or t.shape != shape:
        where = f" {layout}" if layout else ""
        fail(op, f"{name} must be {dtype} of shape {shape}{where}, got {t.dtype} of shape {_shape(t)}")


def stored_any(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shapes: tuple[tuple, ...],
               layout: str = "") -> None:
    """A stored tensor of one of ``dtypes`` and one of ``shapes``."""
    if t.dtype not in dtypes or t.shape not in shapes:
        where = f" {layout}" if layout else ""
        fail(op, f"{name} must be one of {', '.join(map(str, dtypes))} of shape "
                 f"{' or '.join(map(str, shapes))}{where}, got {t.dtype} of shape {_shape(t)}")


def matrix(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> tuple[int, int]:
    """A 2-D stored tensor of one of ``dtypes`` (its shape defines N and K) -> its shape."""
    if t.dim() != 2 or t.dtype not in dtypes:
        fail(op, f"{name} must be a 2-D tensor of {', '.join(map(str, dtypes))} [N, ...], got {t.dtype} "
                 f"of shape {_shape(t)}")
    return t.shape


def bias(op: str, b: torch.Tensor | None, out_features: int) -> None:
    """``bias`` None or a floating-point ``[out_features]``."""
    if b is not None and (b.shape != (out_features,) or not b.dtype.is_floating_point):
        fail(op, f"bias must be None or a floating-point tensor of shape ({out_features},), got {b.dtype} "
                 f"of shape {_shape(b)}")


def scalar(op: str, name: str, value, ok: bool, valid: str) -> None:
    """A scalar argument: raise naming ``name``, its ``value`` and the ``valid`` choices unless ``ok``."""
    if not ok:
        fail(op, f"{name}={value!r} is not supported; valid: {valid}")


def scalars(op: str, rules: tuple) -> None:
    """Raise for the first ``(name, value, ok, valid)`` of ``rules`` with ``ok`` False.  The checks call
    it only once their combined condition failed: a passing call builds no rules and no strings."""
    for name, value, ok, valid in rules:
        if not ok:
            fail(op, f"{name}={value!r} is not supported; valid: {valid}")
    fail(op, "the scalar arguments are inconsistent")


def is_size(value) -> bool:
    """``value`` a non-negative int (a SymInt is checked by :func:`size`)."""
    return type(value) is int and value >= 0


def size(op: str, name: str, value) -> None:
    """A non-negative integer size scalar (``out_features``, ``in_features``)."""
    if type(value) is not int or value < 0:
        if isinstance(value, torch.SymInt):
            torch._check_is_size(value, lambda: f"fxquant::{op}: {name}={value} must be a size (>= 0)")
            return
        fail(op, f"{name}={value!r} is not supported; valid: an integer >= 0")
