"""What a quantization *method* is: the algorithm that decides codes and parameters of a format.

A scheme names the format (what is stored, which op runs); a method (RTN, HQQ, GPTQ, AWQ, OneBit)
decides the stored values from the weight and, for the calibrated ones, from statistics of the
layer's inputs (:class:`Stats`, filled by the calibration pass).  Every method emits the same
:class:`~fxquant.schemes.QuantizedWeight` its scheme's round-to-nearest ``quantize`` would (through
``Scheme.grid`` / ``Scheme.pack_grid``, or the format's own packing), so ops and kernels never
depend on the method.

Methods are frozen, keyword-only dataclasses validated at construction; a scheme carries one as
``scheme.method`` (``"int4wo-128@gptq"``); :func:`parse_method` / :func:`method_from_json` read
them back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import torch

__all__ = ["Method", "MethodResult", "Stats", "parse_method", "method_to_json", "method_from_json",
           "method_names", "check_number", "column_grid_reason",
           "quadratic_error"]

_REGISTRY: dict[str, type["Method"]] = {}


@dataclass
class Stats:
    """Streaming statistics of one linear's input ``x`` ``[tokens, K]`` over the calibration data
    (the calibration pass fills them; activations themselves are never kept).

    ``absmax`` / ``mean_abs`` ``[K]`` float32: per input channel ``max |x|`` and ``mean |x|``;
    ``tokens``: rows seen; ``hessian`` ``[K, K]`` float32: ``XᵀX = sum_t x_t x_tᵀ`` (a sum, not a
    mean), only when a method asked for it; ``out_sq``: ``sum ||x Wᵀ||²`` over the data with the
    float weight (the denominator of the relative output error), filled with ``hessian`` or by an
    observer that knows the weight.
    """

    k: int
    tokens: int = 0
    absmax: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    hessian: torch.Tensor | None = None

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def update(self, x: torch.Tensor, hessian: bool, channels: bool = True) -> None:
        """Add the rows of ``x`` ``[..., K]`` (``channels``: the per-channel ``absmax`` / ``mean_abs`` too)."""
        xr = x.detach().reshape(-1, x.shape[-1])
        if channels:
            a = xr.float().abs()
            amax, asum = a.amax(dim=0), a.sum(dim=0)
            if self.absmax is None:
                self.absmax, self.abs_sum = amax, asum
            else:
                torch.maximum(self.absmax, amax, out=self.absmax)
                self.abs_sum += asum
        if hessian:
            if self.hessian is None:
                self.hessian = torch.zeros(self.k, self.k, dtype=torch.float32, device=xr.device)
            add_gram(self.hessian, xr)
        self.tokens += xr.shape[0]


#: ``add_gram`` splits K into row bands of about this many channels (at most 4 bands)
GRAM_BAND = 128


def add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """``h += xᵀx`` in float32 (``x`` ``[T, K]``, ``h`` ``[K, K]`` symmetric) computing only the bands on and
    above the diagonal and mirroring the rest: 3/4 of the multiply-adds with 2 bands, 5/8 with 4 (the
    calibration pass's largest cost for GPTQ is this product, over every token of every group's input).
    bf16 ``x`` (a bf16 model's activations) goes through the native bf16 GEMM where there is one
    (AVX512-BF16): bf16 products are exact in float32 and the sums are float32, so it is the float32
    product of the same values up to the summation order, about twice as fast."""
    k = x.shape[1]
    bands = max(1, min(4, k // GRAM_BAND))
    edges = [k * i // bands for i in range(bands + 1)]
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _gram_bf16(h, x, edges):
        return
    x = x.float()
    if bands == 1:
        h.addmm_(x.t(), x)
        return
    for a0, a1 in zip(edges[:-1], edges[1:]):
        h[a0:a1, a0:].addmm_(x[:, a0:a1].t(), x[:, a0:])
        h[a1:, a0:a1].copy_(h[a0:a1, a1:].t())


def _gram_bf16(h: torch.Tensor, x: torch.Tensor, edges: list[int]) -> bool:
    """:func:`add_gram`'s bands with the native bf16 GEMM (``xᵀ`` as both operands, T padded to even with a
    zero row); False, nothing added, where it does not apply."""
    from ..kernels import native_cpu

    xt = x.t().contiguous()
    if xt.shape[1] % 2:
        xt = torch.nn.functional.pad(xt, (0, 1))
    parts = []
    for a0, a1 in zip(edges[:-1], edges[1:]):
        part = native_cpu.bf16_gemm(xt[a0:a1], xt[a0:])
        if part is None:
            return False
        parts.append(part)
    for a0, a1, part in zip(edges[:-1], edges[1:], parts):
        h[a0:a1, a0:] += part
        h[a1:, a0:a1].copy_(h[a0:a1, a1:].t())
    return True


@dataclass
class MethodResult:
    """A method's output for one weight: the packed weight; for AWQ the per-input-channel scale
    ``s`` ``[K]`` the weight was multiplied by (the input must be divided by it: folded into the
    preceding op or applied before the op); ``info``: what the method chose (clip ratios, ...)."""

    qweight: Any
    input_scale: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base class: subclasses set ``name`` and implement :meth:`quantize`."""

    name: ClassVar[str]
    #: the method needs calibration data (``Stats``)
    needs_data: ClassVar[bool] = False
    #: the method needs ``Stats.hessian``
    needs_hessian: ClassVar[bool] = False
    #: the method reads the per-channel statistics (``Stats.absmax`` / ``mean_abs``); the calibrate pass
    #: skips them for inputs where no method does
    needs_channel_stats: ClassVar[bool] = False
    #: the method can quantize mixture-of-experts weights expert by expert (a data method from each
    #: expert's own inputs: the rows routed to it)
    per_expert: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls

    def __new__(cls, *args, **kwargs):
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)}) if is_dataclass(cls) else []
        if unknown or args:
            what = f"no parameter {', '.join(map(repr, unknown))}" if unknown else "keyword parameters only"
            valid = ", ".join(f.name for f in fields(cls)) or "none"
            raise TypeError(f"{cls.__name__} takes {what}; its parameters: {valid}.  The bits, group size, "
                            "symmetry and axis belong to the scheme (e.g. 'int4wo-128-sym@gptq', "
                            "'uint3wo-64-axis0@hqq')")
        return super().__new__(cls)

    @property
    def sequential(self) -> bool:
        """Later layers are calibrated on the outputs of this method's already-quantized layers."""
        return False

    def unsupported_reason(self, scheme) -> str | None:
        """Why this method cannot produce ``scheme``'s format (``None`` when it can)."""
        return None

    def excluded_reason(self, name: str) -> str | None:
        """Why the method leaves the layer ``name`` in float (its own include / exclude lists), else ``None``."""
        return None

    def quantize(self, scheme, weight: torch.Tensor, stats: Stats | None) -> MethodResult:
        """The packed weight of float ``weight`` ``[N, K]`` in ``scheme``'s format."""
        raise NotImplementedError

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        return self.name


def quadratic_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(D H Dᵀ)``: with ``H = XᵀX``, the squared output error ``sum ||x Dᵀ||²`` of a weight change
    ``D`` over the calibration tokens (float32 products, float64 sum)."""
    return float(((d @ h) * d).sum(dtype=torch.float64))


def column_grid_reason(method: str, scheme) -> str | None:
    """Why ``scheme`` is not an integer grid grouped along input columns (what GPTQ and AWQ work on)."""
    grid = scheme.grid(64, 64)
    if grid is None:
        return (f"{method} needs an integer weight-only format (int8wo, int4wo-<g>, [u]int<b>wo-<g>); "
                f"{scheme} has no code grid")
    if grid.axis != 1:
        return f"{method} groups input columns (axis 1); {scheme} groups along axis {grid.axis}"
    return None


def check_number(owner: str, name: str, value: Any, *, kind=(int, float), lo=None, hi=None,
                 lo_open: bool = False, valid: str = "") -> None:
    """``ValueError`` naming ``owner.name`` and the valid range unless ``value`` is a number of
    ``kind`` within ``lo`` .. ``hi`` (``lo_open``: strictly above ``lo``)."""
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        if not valid:
            what = "an integer" if kind is int else "a number"
            bounds = [f"{'>' if lo_open else '>='} {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
            valid = f"{what} {' and '.join(b for b in bounds if b)}".strip()
        raise ValueError(f"{owner}.{name}={value!r} is not valid; valid: {valid}")


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_method(value: "Method | str | None", *, where: str = "method") -> "Method | None":
    """A method object, a method name (default parameters) or ``None``."""
    if value is None or isinstance(value, Method):
        return value
    if isinstance(value, str) and value.strip().lower() in _REGISTRY:
        return _REGISTRY[value.strip().lower()]()
    raise ValueError(f"{where}: unknown method {value!r}; valid: {', '.join(method_names())} "
                     "(or a fxquant.methods object such as GPTQ(damp_percent=0.01))")


def method_to_json(method: "Method | None") -> "str | dict | None":
    """The name when the parameters are the defaults, else ``{"method": name, **params}``."""
    if method is None:
        return None
    if method == type(method)():
        return method.name
    return {"method": method.name, **{k: _json(v) for k, v in method.params().items()}}


def method_from_json(obj: "str | dict | None", *, where: str = "method") -> "Method | None":
    if isinstance(obj, dict):
        obj = dict(obj)
        name = obj.pop("method", None)
        if name not in _REGISTRY:
            raise ValueError(f"{where}: unknown method {name!r}; valid: {', '.join(method_names())}")
        cls = _REGISTRY[name]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"{where}: {cls.__name__} has no field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in obj.items()})
    return parse_method(obj, where=where)


def _json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
