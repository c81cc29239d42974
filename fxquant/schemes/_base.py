"""The scheme base class, the registry, and string / JSON parsing of schemes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..formats import _common
from ..formats.grid import Grid

__all__ = ["Scheme", "QuantizedWeight", "parse_scheme", "valid_scheme_names", "scheme_to_json", "scheme_from_json"]

_REGISTRY: list[type["Scheme"]] = []
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
#: the float weight dtypes every scheme quantizes (others stay float, with the reason in the report)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class QuantizedWeight:
    """What a scheme produces for one weight: the op to call and its arguments.

    ``tensors``: buffers in the op's argument order after ``x`` (registered on the module);
    ``attrs``: scalar op arguments after ``bias`` (baked into the graph); ``nbytes`` counts every
    stored tensor (codes, scales, zeros, tables, nested statistics): the exact storage cost.
    """

    op: str
    tensors: dict[str, torch.Tensor]
    attrs: dict[str, Any]
    out_features: int
    in_features: int
    #: a mixture-of-experts weight: every tensor is stacked over this many experts (dim 0), each
    #: expert's slice the packed ``[out_features, in_features]`` weight (``torch.ops.fxquant.<op>_experts``)
    experts: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """Base class. Subclasses set ``family`` and ``op``, implement ``__str__``, ``parse``,
    ``unsupported_reason``, ``quantize`` and ``dequantize``."""

    family: ClassVar[str]
    op: ClassVar[str]
    #: the scheme strings listed in error messages
    examples: ClassVar[tuple[str, ...]] = ()
    #: the grammar of this family's strings, e.g. ``"nf4[-<blocksize>][+dq]"`` (error messages, docs)
    forms: ClassVar[tuple[str, ...]] = ()
    #: dtype of the matmul, passed to the op as ``compute_dtype`` (as bitsandbytes'
    #: ``bnb_4bit_compute_dtype``).  ``None`` on the CPU (every path, every batch size, so results do
    #: not depend on M): fp32 activations are rounded to bf16 once where the CPU's dense path is
    #: bf16 (AVX512-BF16 / AMX: ``fxquant.ops._cpu.dense_dtype()``) and never elsewhere; products
    #: exact, sums fp32, the result fp32 (the fp32 reference on those values).  bf16 activations are
    #: used as they are (result rounded to bf16); fp16 ones are never rounded to bf16 (fp32
    #: arithmetic, result rounded to fp16).  Schemes that quantize activations (int8dq, LLM.int8,
    #: float8dq) never round them to bf16 under ``None``.  ``torch.float32``: never rounded, fp32
    #: everywhere; ``torch.bfloat16``: rounded on every path (weights and outputs may be too: the bf16
    #: reference); ``torch.float16``: the fp16 reference.  The reference takes ``None`` as fp32; the
    #: CUDA kernels keep their own precision (``fxquant/kernels``), this policy is the CPU's.
    compute_dtype: torch.dtype | None = None
    #: how the quantized row blocks of a weight join into the quantized weight: for each stored
    #: tensor, the dim its rows run along (``None``: the same tensor in every block, e.g. a code
    #: table); ``None`` when the format cannot quantize row blocks independently to the same bits
    #: (a statistic over the whole weight).  Used to quantize large weights in bounded memory.
    row_split: ClassVar[dict[str, int | None] | None] = None
    #: the algorithm that chooses the stored values (:mod:`fxquant.methods`); ``None`` is
    #: round-to-nearest.  Written as a ``@<method>`` suffix: ``"int4wo-128@gptq"``.
    method: Any = None

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{type(self).__name__}.compute_dtype={self.compute_dtype!r} is not supported; "
                             f"valid: None, torch.float32, torch.bfloat16, torch.float16")
        _check_method(self)

    @property
    def format(self) -> "Scheme":
        """The same scheme without its method (what is stored and which op runs)."""
        return dataclasses.replace(self, method=None) if self.method is not None else self

    def op_attrs(self, **scalars: Any) -> dict[str, Any]:
        """The op's scalar arguments: ``scalars`` plus ``compute_dtype`` when it is set."""
        return {**scalars, **({"compute_dtype": self.compute_dtype} if self.compute_dtype else {})}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "family" in cls.__dict__:
            _REGISTRY.append(cls)
        if "__str__" in cls.__dict__:  # every scheme string ends in "@<method>" when it has one
            plain = cls.__dict__["__str__"]

            def __str__(self, _plain=plain):
                return _plain(self) if self.method is None else f"{_plain(self)}@{self.method.name}"

            cls.__str__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Scheme | None":
        """The scheme ``text`` names if it is of this family, else ``None``."""
        raise NotImplementedError

    def unsupported_reason(self, weight: torch.Tensor) -> str | None:
        """Why this scheme cannot quantize ``weight`` ``[N, K]`` (``None`` when it can)."""
        if weight.dim() != 2:
            return f"weight must be 2-D, got shape {tuple(weight.shape)}"
        if weight.dtype not in WEIGHT_DTYPES:
            return (f"weight dtype {weight.dtype} is not one fxquant quantizes (float32, bfloat16, float16); "
                    "cast the model first (model.float())")
        return None

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        """Float32 ``[N, K]`` the stored buffers stand for (used for the report's error)."""
        raise NotImplementedError

    def grid(self, n: int, k: int) -> "Grid | None":
        """The affine code grid of an ``[n, k]`` weight (:class:`fxquant.formats.grid.Grid`), which
        the algorithms (HQQ, GPTQ, AWQ) choose codes and parameters on; ``None`` when the format is
        not an affine integer grid (then only round-to-nearest and format-specific methods apply)."""
        return None

    def pack_grid(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, n: int, k: int) -> QuantizedWeight:
        """Codes ``q`` ``[groups, group_size]`` and parameters ``[groups]`` in :meth:`grid`'s group
        layout (parameters holding values the format stores: ``Grid.fit`` / ``Grid.store``) -> the
        stored buffers, exactly as :meth:`quantize` lays them out."""
        raise NotImplementedError(f"{self} has no code grid")

    def rel_error(self, weight: torch.Tensor, qw: QuantizedWeight) -> float:
        return _common.rel_error(weight, self.dequantize(qw))

    def row_multiple(self, n: int, k: int) -> int | None:
        """Row blocks of an ``[n, k]`` weight quantize exactly as the whole when their heights are
        multiples of this (``None``: this scheme cannot split rows, see :attr:`row_split`)."""
        return 1 if self.row_split is not None else None

    def quantize_in_blocks(self, weight: torch.Tensor, max_elements: int) -> tuple[QuantizedWeight, float]:
        """``(quantize(weight), rel_error)`` computed on row blocks of at most ``max_elements``
        (rounded to :meth:`row_multiple`), so the float temporaries of a large weight (an lm_head of
        65M parameters) stay bounded; the same bits as :meth:`quantize` on the whole weight."""
        n, k = weight.shape
        mult = self.row_multiple(n, k)
        if mult is None or n * k <= max_elements:
            qw = self.quantize(weight.contiguous())
            return qw, self.rel_error(weight, qw)
        rows = max(mult, (max_elements // max(k, 1)) // mult * mult)
        parts, err, norm = [], 0.0, 0.0
        for r0 in range(0, n, rows):
            block = weight[r0:r0 + rows].contiguous()
            qw = self.quantize(block)
            wf = block.float()
            err += (wf - self.dequantize(qw).float()).pow(2).sum().item()
            norm += wf.pow(2).sum().item()
            parts.append(qw)
            del block, wf
        first = parts[0]
        tensors = {name: (first.tensors[name] if dim is None else torch.cat([p.tensors[name] for p in parts], dim))
                   for name, dim in self.row_split.items()}
        attrs = {**first.attrs, **({"out_features": n} if "out_features" in first.attrs else {})}
        return QuantizedWeight(first.op, tensors, attrs, n, k), (err / norm) ** 0.5 if norm > 0 else 0.0


def valid_scheme_names() -> list[str]:
    """Every scheme string :func:`parse_scheme` accepts (parametrised families by example)."""
    return [name for cls in _REGISTRY for name in cls.examples]


def scheme_forms() -> list[str]:
    """The grammar of every scheme string family, e.g. ``"uint<b>wo-<g>[-axis0|-axis1] (b in 1..8)"``."""
    return [form for cls in _REGISTRY for form in cls.forms]


def _valid() -> str:
    return f"{', '.join(valid_scheme_names())}; forms: {'; '.join(scheme_forms())}"


def parse_scheme(value: "Scheme | str | None", *, where: str = "scheme") -> "Scheme | None":
    """Scheme object, scheme string or ``None`` -> Scheme or ``None``; ``ValueError`` otherwise.

    ``where`` names the option or rule in the error message (e.g. ``"rules['layers.*']"``).
    """
    if value is None or isinstance(value, Scheme):
        return value
    if isinstance(value, str) and "@" in value:
        from ..methods import parse_method

        text, _, name = value.rpartition("@")
        if "@" in text:
            raise ValueError(f"{where}: scheme {value!r} names more than one method; a scheme takes one "
                             "'@<method>' (rtn, hqq, gptq, awq, onebit, ...)")
        scheme = parse_scheme(text, where=where)
        if scheme is None:
            raise ValueError(f"{where}: scheme {value!r}: a method needs a scheme before the '@'")
        method = parse_method(name, where=f"{where}: scheme {value!r}")
        try:
            return dataclasses.replace(scheme, method=method)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if isinstance(value, str):
        text = value.strip().lower()
        for cls in _REGISTRY:
            try:
                scheme = cls.parse(text)
            except ValueError as e:
                raise ValueError(f"{where}: scheme {value!r}: {e}; valid schemes: {_valid()}") from None
            if scheme is not None:
                return scheme
    raise ValueError(f"{where}: unknown scheme {value!r}; valid schemes: {_valid()} "
                     "(or None to keep the layer in float)")


def scheme_to_json(scheme: "Scheme | None") -> "dict | None":
    """The canonical structured form: ``{"scheme": family, <every field, defaults included>}``.

    Strings are aliases of it (``parse_scheme``); this form names every choice, so two schemes with
    different formats never share it (``"int4wo-128"`` -> ``{"scheme": "int4wo", "group_size": 128,
    ...}``, ``"int4wo-128-sym"`` -> ``{"scheme": "intx", "bits": 4, "symmetric": true, ...}``)."""
    if scheme is None:
        return None
    from ..methods import method_to_json

    fields = {f.name: (method_to_json(getattr(scheme, f.name)) if f.name == "method" else
                       _json_value(getattr(scheme, f.name))) for f in dataclasses.fields(scheme)}
    return {"scheme": scheme.family, **fields}


def scheme_from_json(obj: "str | dict | None", *, where: str = "scheme") -> "Scheme | None":
    if isinstance(obj, dict):
        obj = dict(obj)
        family = obj.pop("scheme", None)
        for cls in _REGISTRY:
            if cls.family == family:
                from ..methods import method_from_json

                names = {f.name for f in dataclasses.fields(cls)}
                unknown = sorted(set(obj) - names)
                if unknown:
                    raise ValueError(f"{where}: scheme {family!r} has no field {unknown[0]!r}; valid: "
                                     f"{', '.join(sorted(names))}")
                kwargs = {k: (getattr(torch, v) if k.endswith("dtype") and isinstance(v, str) else v)
                          for k, v in obj.items()}
                if "method" in kwargs:
                    kwargs["method"] = method_from_json(kwargs["method"], where=f"{where}.method")
                return cls(**kwargs)
        raise ValueError(f"{where}: unknown scheme family {family!r}; valid: "
                         f"{', '.join(c.family for c in _REGISTRY)}")
    return parse_scheme(obj, where=where)


def _json_value(v: Any) -> Any:
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v


def _check_method(scheme: "Scheme") -> None:
    """Normalise ``scheme.method`` (a name, RTN -> ``None``) and check it can produce the format."""
    m = scheme.method
    if m is None:
        return
    from ..methods import Method, parse_method

    if isinstance(m, str):
        m = parse_method(m, where=f"{type(scheme).__name__}.method")
    if not isinstance(m, Method):
        raise ValueError(f"{type(scheme).__name__}.method={m!r} is not valid; valid: a method name or a "
                         "fxquant.methods object (RTN, HQQ, GPTQ, AWQ, OneBit)")
    if m.name == "rtn":
        m = None
    object.__setattr__(scheme, "method", m)
    if m is not None:
        reason = m.unsupported_reason(scheme.format)
        if reason:
            raise ValueError(f"method {m.name!r} cannot quantize {scheme.format}: {reason}")
