"""diffusers' ``PipelineQuantizationConfig``: one spec per pipeline component.

| field | fxquant |
|---|---|
| ``quant_backend`` + ``quant_kwargs`` | every component named in ``components_to_quantize`` (absent: every ``nn.Module`` component) gets the spec of the backend's config built from ``quant_kwargs`` (below) |
| ``quant_mapping`` (component -> config object or dict) | each named component gets the spec of its own config (any config ``Spec.from_config`` reads, transformers' included, or a ``Spec``) |
| ``components_to_quantize`` with ``quant_mapping``, or both / neither of ``quant_backend`` and ``quant_mapping`` | ``ValueError`` (as diffusers) |

| ``quant_backend`` | config read |
|---|---|
| ``bitsandbytes_4bit`` / ``bitsandbytes_8bit`` | ``BitsAndBytesConfig(**quant_kwargs)`` with its constructor defaults (``bnb_4bit_compute_dtype`` float32); ``load_in_4bit`` / ``load_in_8bit`` default to what the backend name says (a contradiction is an error) |
| ``quanto`` | ``QuantoConfig(**quant_kwargs)`` (``weights_dtype``) |
| ``torchao`` | ``TorchAoConfig(**quant_kwargs)`` (``quant_type``: a string or an ``AOBaseConfig``; its ``to_dict()`` when it has one) |
| ``fxquant`` | ``{"spec": <Spec / scheme / spec dict / outside config>}`` or a ``Spec.to_dict()`` |
| ``gguf`` | ``ValueError``: GGUF loads pre-quantized ``.gguf`` files, it quantizes nothing |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..schemes import Scheme
from ..spec import Spec
from ._base import as_dict

NAME = "PipelineQuantizationConfig"
FIELDS = ("quant_backend", "quant_kwargs", "components_to_quantize", "quant_mapping")
#: quant_backend -> the quant_method of the config its quant_kwargs build
BACKENDS = {"bitsandbytes_4bit": "bitsandbytes", "bitsandbytes_8bit": "bitsandbytes", "quanto": "quanto",
            "torchao": "torchao", "fxquant": "fxquant"}
PREQUANTIZED = ("gguf",)  # diffusers backends that only load checkpoints quantized elsewhere
FXQUANT_FIELDS = ("quant_method", "spec", "layout")


@dataclass(frozen=True)
class PipelineSpecs:
    """What a pipeline config says: ``specs`` (component -> spec) and, for the global form without
    ``components_to_quantize``, ``every_module=True`` with the one spec under ``"*"``."""

    specs: dict[str, Spec]
    every_module: bool = False

    def for_components(self, components: Mapping[str, Any]) -> dict[str, Spec]:
        """Component name -> spec, for the components of ``components`` the config quantizes;
        ``ValueError`` naming the components the config names that ``components`` lacks."""
        import torch

        if self.every_module:
            return {n: self.specs["*"] for n, m in components.items() if isinstance(m, torch.nn.Module)}
        missing = sorted(set(self.specs) - set(components))
        if missing:
            raise ValueError(f"{NAME}: components {missing} are not in the pipeline; valid: {sorted(components)}")
        return dict(self.specs)


def _fields(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        d = dict(cfg)
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"{NAME}.{unknown[0]}: no such field; valid: {', '.join(FIELDS)}")
        return d
    if not any(hasattr(cfg, f) for f in FIELDS):
        raise TypeError(f"{NAME}: expected a dict or a diffusers PipelineQuantizationConfig, got {type(cfg).__name__}")
    return {f: getattr(cfg, f, None) for f in FIELDS}


def read_pipeline_config(cfg: Any) -> PipelineSpecs:
    """The spec of each component a ``PipelineQuantizationConfig`` (object or dict) quantizes."""
    d = _fields(cfg)
    backend, kwargs = d.get("quant_backend"), d.get("quant_kwargs") or {}
    names, mapping = d.get("components_to_quantize"), d.get("quant_mapping")
    if backend and mapping:
        raise ValueError(f"{NAME}: quant_backend and quant_mapping are mutually exclusive; valid: one of them")
    if not backend and not mapping:
        raise ValueError(f"{NAME}: neither quant_backend nor quant_mapping is given; valid: one of them")
    if mapping:
        if names:
            raise ValueError(f"{NAME}.components_to_quantize: not used with quant_mapping (its keys name the "
                             "components); valid: None")
        if not isinstance(mapping, Mapping):
            raise ValueError(f"{NAME}.quant_mapping: expected a dict of component -> config, got {mapping!r}")
        return PipelineSpecs({str(n): spec_of(c, f"{NAME}.quant_mapping[{n!r}]") for n, c in mapping.items()})
    spec = spec_of(backend_config(backend, kwargs), f"{NAME}(quant_backend={backend!r})")
    if isinstance(names, str):
        names = [names]
    if not names:
        return PipelineSpecs({"*": spec}, every_module=True)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"{NAME}.components_to_quantize: expected component names, got {names!r}")
    return PipelineSpecs({n: spec for n in names})


def backend_config(backend: Any, kwargs: Any) -> Any:
    """The quantization config ``quant_backend`` builds from ``quant_kwargs`` (a dict, or a Spec)."""
    if backend in PREQUANTIZED:
        raise ValueError(f"{NAME}.quant_backend={backend!r}: it loads checkpoints quantized elsewhere and "
                         f"quantizes nothing; valid: {', '.join(BACKENDS)}")
    method = BACKENDS.get(backend) if isinstance(backend, str) else None
    if method is None:
        raise ValueError(f"{NAME}.quant_backend={backend!r} is not supported; valid: {', '.join(BACKENDS)}")
    if not isinstance(kwargs, Mapping) or not kwargs:
        raise ValueError(f"{NAME}.quant_kwargs: quant_backend={backend!r} needs the arguments of its config "
                         f"(a non-empty dict), got {kwargs!r}")
    kwargs = dict(kwargs)
    if method == "fxquant":
        return {"quant_method": "fxquant", **kwargs} if "spec" in kwargs else kwargs  # else a Spec.to_dict()
    if backend.startswith("bitsandbytes_"):
        four = backend == "bitsandbytes_4bit"
        if kwargs.setdefault("load_in_4bit", four) != four or kwargs.setdefault("load_in_8bit", not four) == four:
            raise ValueError(f"{NAME}.quant_kwargs: load_in_4bit={kwargs['load_in_4bit']!r} / load_in_8bit="
                             f"{kwargs['load_in_8bit']!r} contradict quant_backend={backend!r}")
        kwargs.setdefault("bnb_4bit_compute_dtype", "float32")  # BitsAndBytesConfig's constructor default
    if method == "torchao" and not isinstance(kwargs.get("quant_type"), (str, Mapping, type(None))):
        from torchao.core.config import config_to_dict  # an AOBaseConfig object: torchao is installed

        kwargs["quant_type"] = {"default": config_to_dict(kwargs["quant_type"])}
    return {"quant_method": method, **kwargs}


def spec_of(value: Any, where: str) -> Spec:
    """A component's spec from a ``Spec``, a scheme, an fxquant config (``{"quant_method": "fxquant",
    "spec": ...}``), a ``Spec.to_dict()`` or any outside config ``Spec.from_config`` reads."""
    from . import spec_from_config

    if isinstance(value, Spec):
        return value
    if value is None or isinstance(value, (str, Scheme)):
        return Spec.coerce(value)
    d = as_dict(value, where)
    try:
        if str(getattr(d.get("quant_method"), "value", d.get("quant_method"))).lower() == "fxquant":
            unknown = sorted(set(d) - set(FXQUANT_FIELDS))
            unknown += [a for a in ("example_inputs", "calibration") if getattr(value, a, None) is not None]
            if unknown or d.get("layout") is not None:
                bad = unknown[0] if unknown else "layout"
                raise ValueError(f"fxquant config field {bad!r} is not supported when quantizing float modules "
                                 "(example inputs and calibration are quantize_pipeline's arguments); valid: spec")
            return spec_of(d.get("spec"), where)
        if "quant_method" in d or "load_in_4bit" in d or "load_in_8bit" in d:
            return spec_from_config(d)
        return Spec.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
