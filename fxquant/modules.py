"""What ``fxquant.quantize_`` puts into a model: :class:`QuantizedLinear` and :class:`PackedWeight`.

Both call the same ``torch.ops.fxquant.<op>`` with the same packed tensors and scalar arguments
the graph emit (``fxquant.compile``) bakes into its op calls, so the two emits compute the same.

- :class:`QuantizedLinear` replaces a plain ``nn.Linear`` (the common case: every projection of a
  transformer).  Its ``forward`` is one op call on its buffers: the least Python per call, which a
  decode step of a small model feels, and nothing for ``torch.compile`` to trace but the op.
- :class:`PackedWeight` replaces the *parameter* of any other site (``F.linear(x, self.w)``,
  ``x @ self.w.t()``, ``torch.addmm(b, x, self.w)``, ``x @ self.w_kn``, or an ``nn.Linear`` subclass
  with its own ``forward``): a tensor subclass whose ``__torch_function__`` routes those calls to the
  op, so the model's code runs unchanged.  Any other use of it computes on the float weight: the
  kept float tensor when the plan saw another use (a tied embedding), else the dequantized weight.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import experts
from .kernels import native_entry
from .ops import op_def
from .schemes import QuantizedWeight

__all__ = ["QuantizedLinear", "PackedWeight"]


def _op(name: str):
    return getattr(torch.ops.fxquant, name).default


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored packed (buffers named as the op's tensor arguments).

    ``in_features`` / ``out_features`` as ``nn.Linear``; ``scheme`` names the format.  Moving the
    module (``.to(device)``) moves the packed buffers; a dtype cast (``.to(torch.bfloat16)``,
    ``.half()``) changes the bias (and :attr:`weight`'s dtype) only: the packed layout fixes the
    buffers' dtypes, and the op computes in the activations' dtype (or the scheme's ``compute_dtype``).

    ``weight`` reads as a :class:`PackedWeight` over the buffers, with the float weight's shape and
    dtype (``weight_dtype``): model code that inspects ``layer.weight.dtype`` / ``.shape`` (T5 casts
    its hidden states to ``wo.weight.dtype``) or calls ``F.linear(x, layer.weight)`` keeps working."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, scheme: str = "",
                 input_scale: torch.Tensor | None = None, weight_dtype: torch.dtype | None = None):
        super().__init__()
        if weight_dtype is None or not weight_dtype.is_floating_point:
            weight_dtype = bias.dtype if bias is not None and bias.is_floating_point() else torch.get_default_dtype()
        self.weight_dtype = weight_dtype
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.scheme = scheme
        self.op_name = qweight.op
        self.op_attrs = dict(qweight.attrs)
        self.tensor_names = tuple(qweight.tensors)
        for name, t in qweight.tensors.items():
            self.register_buffer(name, t)
        if isinstance(bias, nn.Parameter) or bias is None:
            self.register_parameter("bias", bias)
        else:
            self.register_buffer("bias", bias)
        self._fn = _op(qweight.op)
        self._bound = None  # op_def(op).cpu_bound(...) for the current buffers: the eager CPU fast path
        # AWQ's per-input-channel scale where it could not be folded: the op sees x / input_scale
        dtype = bias.dtype if bias is not None else torch.float32
        self.register_buffer("input_scale", None if input_scale is None else input_scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if type(x) is torch.Tensor and x.device.type == "cpu" and _plain_eager_call(x, self.bias):
            bound = self._bound
            if bound is None:
                bound = self._bound = self._cpu_fn()
            return bound(x)
        tensors = [getattr(self, n) for n in self.tensor_names]
        return self._fn(x, *tensors, self.bias, **self.op_attrs)

    def _cpu_fn(self):
        """What a plain eager CPU call runs: bf16 activations of an op the C++ entry takes
        (:mod:`fxquant.kernels.native_entry`) go through the dispatcher to it; everything else runs
        the op's CPU impl with this module's arguments bound (:meth:`LinearOpDef.cpu_bound`): the same
        result, without the Python kernel's per-call work."""
        od = op_def(self.op_name)
        tensors = {n: getattr(self, n) for n in self.tensor_names}
        python = od.cpu_bound(tensors, self.bias, self.op_attrs)
        if self.op_name not in native_entry.OPS or not native_entry.ensure():
            return python
        # the op's arguments after x in schema order
        fn, args = self._fn, (*(tensors[n] for n in od.tensors), self.bias,
                              *(self.op_attrs.get(n) for n in od.arg_names[2 + len(od.tensors):]))

        def call(x: torch.Tensor) -> torch.Tensor:
            return fn(x, *args) if x.dtype == torch.bfloat16 else python(x)
        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("bias", *getattr(self, "tensor_names", ())):
            self.__dict__["_bound"] = None
        super().__setattr__(name, value)

    # pickling (torch.save(model), copy.deepcopy): the op handle and the bound fast path are rebuilt
    def __getstate__(self) -> dict:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state.pop("_fn", None)
        state["_bound"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__["_fn"] = _op(self.op_name)

    @property
    def weight(self) -> "PackedWeight":
        """The packed weight as a read-only tensor (``[out_features, in_features]``, ``weight_dtype``)."""
        return PackedWeight(self.packed(), False, self.weight_dtype, None, self.input_scale)

    def packed(self) -> QuantizedWeight:
        """The packed weight as the quantize pass produced it (the module's own buffers)."""
        return QuantizedWeight(self.op_name, {n: getattr(self, n) for n in self.tensor_names}, dict(self.op_attrs),
                               self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """Float32 ``[out_features, in_features]``: the weight the op multiplies by."""
        return _dequantize(self.packed())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme or self.op_name}")

    def _apply(self, fn, recurse=True):
        self._bound = None
        packed = {n: self._buffers.pop(n) for n in self.tensor_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in packed.items():
                moved = fn(t)
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        cast = fn(torch.empty(0, dtype=self.weight_dtype)).dtype  # a float cast: what weight reads as
        if cast.is_floating_point:
            self.weight_dtype = cast
        return self


def _plain_eager_call(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the op would go straight to its CPU impl (no grad to record, no dispatch or function
    mode, no profiler, not traced by dynamo / export / jit), so :meth:`LinearOpDef.cpu_bound` may
    stand in for the dispatcher: same result, none of its per-call Python."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.autograd._profiler_enabled()
                or torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None)


def _dequantize(qw: QuantizedWeight) -> torch.Tensor:
    d = op_def(qw.op)
    return d.dequantized(dict(qw.tensors), {**qw.attrs, "compute_dtype": qw.attrs.get("compute_dtype")})


# ---- the tensor subclass --------------------------------------------------------------------------------
_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_SWAP = {torch.t, torch.Tensor.t, torch.adjoint, torch.Tensor.adjoint}
_TRANSPOSE = {torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.Tensor.swapaxes, torch.swapdims,
              torch.Tensor.swapdims}
_PERMUTE = {torch.permute, torch.Tensor.permute}
_PROPS = (torch.Tensor.T, torch.Tensor.mT, torch.Tensor.mH, torch.Tensor.H)
_LAYOUT = _SWAP | _TRANSPOSE | _PERMUTE  # the functions _is_swap tells apart
_warned: set[str] = set()
_INNER = "packed_"
_EXTRAS = ("float_data", "input_scale")  # the optional plain tensors a PackedWeight holds besides the packed ones


def _is_swap(func, args, ndim: int) -> bool:
    """Whether ``func(*args)`` swaps the last two dims of an ``ndim``-D tensor (``.mT``, ``.mH``, ``adjoint()``,
    ``transpose(-2, -1)`` / ``swapaxes``, ``permute``; ``.t()`` and ``.T`` when 2-D; a packed weight is real)."""
    prop = getattr(func, "__self__", None)
    if func in _SWAP or prop in _PROPS:  # .t() / .T / .H reverse every dim: the last two only when 2-D
        return ndim == 2 or func in (torch.adjoint, torch.Tensor.adjoint) or prop in (torch.Tensor.mT, torch.Tensor.mH)
    if func in _TRANSPOSE:
        return len(args) == 3 and sorted(int(d) % ndim for d in args[1:]) == [ndim - 2, ndim - 1]
    dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    return [int(d) % ndim for d in dims] == [*range(ndim - 2), ndim - 1, ndim - 2]


class PackedWeight(torch.Tensor):
    """A packed weight standing in for a ``[N, K]`` parameter (``[K, N]`` when ``transposed``, as a
    GPT-2 ``Conv1D`` stores it): ``F.linear(x, w, b)``, ``x @ w.t()``, ``torch.addmm(b, x, w.t())``
    and their transposed forms run ``torch.ops.fxquant.<op>`` on the packed tensors.

    Shape, dtype and device are the float parameter's; ``float_data`` is that tensor when the plan
    found uses other than linear ones (a tied embedding), else ``None``.  Other operations run on
    ``float_data`` or, without it, on the dequantized weight (correct, slower, warned once).
    ``input_scale`` (``[K]``, AWQ's scale where it could not be folded): the packed weight holds
    ``W * input_scale`` (per input channel) and the linear uses divide ``x`` by it first."""

    @staticmethod
    def __new__(cls, qweight: QuantizedWeight, transposed: bool, dtype: torch.dtype,
                float_data: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
        n, k = qweight.out_features, qweight.in_features
        device = next(iter(qweight.tensors.values())).device
        shape = (k, n) if transposed else (n, k)
        if qweight.experts:
            shape = (qweight.experts, *shape)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)

    def __init__(self, qweight: QuantizedWeight, transposed: bool, dtype: torch.dtype,
                 float_data: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
        self.packed, self.transposed, self.float_data = qweight, transposed, float_data
        self.input_scale = input_scale
        for name, t in qweight.tensors.items():  # flattened under a prefix: no clash with attribute names
            setattr(self, _INNER + name, t)
        self._fn = _op(qweight.op)

    def __repr__(self) -> str:
        return (f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, op={self.packed.op}, "
                f"transposed={self.transposed}{', input_scale' if self.input_scale is not None else ''})")

    # -- torch.compile / export: flatten into the packed tensors -------------------------------------
    def __tensor_flatten__(self):
        names = [_INNER + n for n in self.packed.tensors] + [n for n in _EXTRAS if getattr(self, n) is not None]
        q = self.packed
        return names, (q.op, tuple(q.attrs.items()), q.out_features, q.in_features, self.transposed, self.dtype,
                       q.experts)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict, ctx, outer_size, outer_stride):
        op, attrs, n, k, transposed, dtype, n_experts = ctx
        tensors = {name[len(_INNER):]: t for name, t in inner.items() if name not in _EXTRAS}
        return cls(QuantizedWeight(op, tensors, dict(attrs), n, k, n_experts), transposed, dtype,
                   inner.get("float_data"), inner.get("input_scale"))

    # -- pickling (torch.save of a model or state dict) and copy.deepcopy: rebuilt from the packed tensors --
    def __reduce_ex__(self, protocol):
        q = self.packed
        return (_rebuild_packed_weight, (q.op, dict(q.tensors), dict(q.attrs), q.out_features, q.in_features,
                                         q.experts, self.transposed, self.dtype, self.float_data, self.input_scale,
                                         bool(getattr(self, "_is_param", False))))

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        fn, args = self.__reduce_ex__(2)
        new = fn(*(copy.deepcopy(a, memo) for a in args))
        memo[id(self)] = new
        return new

    def _copy_from(self, src: Any) -> "PackedWeight":
        """``self.copy_(src)`` (``load_state_dict``): the packed tensors of a packed weight of the same
        format, shape and layout are copied in place; anything else cannot become codes by a copy."""
        q = self.packed
        same = (type(src) is PackedWeight and src.packed.op == q.op and src.packed.attrs == q.attrs
                and src.shape == self.shape and src.transposed == self.transposed
                and src.packed.tensors.keys() == q.tensors.keys()
                and all(src.packed.tensors[n].shape == t.shape for n, t in q.tensors.items())
                and (src.float_data is None) == (self.float_data is None)
                and (src.input_scale is None) == (self.input_scale is None))
        if not same:
            what = (f"a packed weight of another format or layout ({src!r})" if type(src) is PackedWeight
                    else f"a {type(src).__name__} of dtype {getattr(src, 'dtype', '?')}")
            raise RuntimeError(f"fxquant PackedWeight ({q.op}, shape {tuple(self.shape)}): cannot copy {what} into a "
                               "packed weight: its values are quantized codes.  Load a state dict of a model "
                               "quantized with the same spec, or load the float weights before fxquant.quantize_")
        with torch.no_grad():
            for n, t in q.tensors.items():
                t.copy_(src.packed.tensors[n])
            for mine, theirs in ((self.float_data, src.float_data), (self.input_scale, src.input_scale)):
                if mine is not None:
                    mine.copy_(theirs)
        return self

    def _stable_hash_for_caching(self) -> str:
        q = self.packed
        return (f"PackedWeight:{q.op}:{sorted(q.attrs.items())}:{q.experts}x{q.out_features}x{q.in_features}:"
                f"{self.transposed}:{self.input_scale is not None}")

    # -- helpers ----------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        return self._fn(x, *self.packed.tensors.values(), bias, **self.packed.attrs)

    def _flipped(self) -> "PackedWeight":
        fd = None if self.float_data is None else self.float_data.transpose(-2, -1)
        return PackedWeight(self.packed, not self.transposed, self.dtype, fd, self.input_scale)

    def dense(self) -> torch.Tensor:
        """The float tensor this stands for: ``float_data``, or the dequantized weight in ``dtype``."""
        if self.float_data is not None:
            return self.float_data
        q = self.packed
        w = torch.stack([_dequantize(e) for e in experts.each(q)]) if q.experts else _dequantize(q)
        if self.input_scale is not None:  # [K], or [E, K] for experts
            w = w / self.input_scale.float().unsqueeze(-2)
        w = w.to(self.dtype)
        return w.transpose(-2, -1) if self.transposed else w

    def _moved(self, device, dtype) -> "PackedWeight":
        tensors = {k: t.to(device) for k, t in self.packed.tensors.items()} if device is not None else None
        q = self.packed if tensors is None else QuantizedWeight(self.packed.op, tensors, dict(self.packed.attrs),
                                                                 self.packed.out_features, self.packed.in_features,
                                                                 self.packed.experts)
        fd, s = self.float_data, self.input_scale
        if fd is not None:
            fd = fd.to(device=device if device is not None else fd.device, dtype=dtype or fd.dtype)
        if s is not None and device is not None:
            s = s.to(device)
        return PackedWeight(q, self.transposed, dtype or self.dtype, fd, s)

    # -- routing ----------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(type(a) is cls and a.packed.experts for a in args[:3]):  # a mixture-of-experts weight
            out = experts.route(cls, func, args, kwargs)
            if out is not NotImplemented:
                return out
        if func in _LINEAR:
            x, w = args[0], (args[1] if len(args) > 1 else kwargs.get("weight"))
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if type(w) is cls and not w.transposed and type(x) is not cls and not w.packed.experts:
                return w._linear(x, b)
        elif func in _MATMUL:
            x, w = args[0], args[1]
            if type(w) is cls and w.transposed and type(x) is not cls and not kwargs and not w.packed.experts:
                return w._linear(x, None)
        elif func in _ADDMM:
            b, x, w = args[0], args[1], args[2]
            if (type(w) is cls and w.transposed and type(x) is not cls and not w.packed.experts
                    and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1
                    and not kwargs.keys() - {"beta", "alpha"}):
                return w._linear(x, b)
        elif (func in _LAYOUT or getattr(func, "__self__", None) in _PROPS) and type(args[0]) is cls:
            if _is_swap(func, args, args[0].dim()):  # [N, K] <-> [K, N]; experts: [E, N, K] <-> [E, K, N]
                return args[0]._flipped()
        elif func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda) and type(args[0]) is cls:
            return _to(args[0], func, args[1:], kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return PackedWeight(w.packed, w.transposed, w.dtype, w.float_data, w.input_scale)
        if func is aten._to_copy.default and type(args[0]) is cls:
            return args[0]._moved(kwargs.get("device"), kwargs.get("dtype"))
        if func is aten.t.default and type(args[0]) is cls:
            return args[0]._flipped()
        if func is aten.copy_.default and type(args[0]) is cls:
            return args[0]._copy_from(args[1])
        if type(args[0]) is cls and _writes_first_argument(func):  # an in-place op on the packed weight
            raise RuntimeError(f"fxquant PackedWeight ({args[0].packed.op}): {func} would modify a packed weight in "
                               "place; its values are quantized codes (load float weights before fxquant.quantize_)")
        for a in args:
            if type(a) is cls and a.float_data is None and str(func) not in _warned:
                _warned.add(str(func))
                warnings.warn(f"fxquant PackedWeight: {func} is not a linear use of a packed weight; it runs on "
                              "the dequantized weight (correct, but it rebuilds the float tensor each call)",
                              stacklevel=2)
        unwrap = lambda a: a.dense() if type(a) is cls else a  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _writes_first_argument(func) -> bool:
    args = func._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


def _rebuild_packed_weight(op: str, tensors: dict, attrs: dict, out_features: int, in_features: int, n_experts: int,
                           transposed: bool, dtype: torch.dtype, float_data, input_scale, is_param: bool):
    """A pickled :class:`PackedWeight` (``__reduce_ex__``), a parameter again if it was one."""
    w = PackedWeight(QuantizedWeight(op, tensors, attrs, out_features, in_features, n_experts), transposed, dtype,
                     float_data, input_scale)
    return nn.Parameter(w, requires_grad=False) if is_param else w


torch.serialization.add_safe_globals([_rebuild_packed_weight])  # torch.load(weights_only=True) may rebuild one


def _to(w: PackedWeight, func, args: tuple, kwargs: dict[str, Any]) -> PackedWeight:
    if func is torch.Tensor.cpu:
        return w._moved(torch.device("cpu"), None)
    if func is torch.Tensor.cuda:
        return w._moved(torch.device("cuda", *args[:1]) if args else torch.device("cuda"), None)
    if args and isinstance(args[0], torch.Tensor):
        device, dtype = args[0].device, args[0].dtype
    else:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"fxquant PackedWeight: cannot convert a packed weight to {dtype}")
    return w._moved(device, dtype)
