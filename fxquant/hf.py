"""fxquant as a transformers quantization backend: ``quant_method="fxquant"``.

```python
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FxQuantConfig(spec="int4wo-64"))
model.save_pretrained(out)                      # packed tensors + config.json's quantization_config
model = AutoModelForCausalLM.from_pretrained(out)  # packed layers built on meta, bytes loaded in
```

Quantizing: transformers loads the float weights, then :func:`fxquant.quantize_` runs on the model
(traced with the model's ``dummy_inputs``, or ``FxQuantConfig(example_inputs=...)``), so the model
keeps ``generate`` with any cache.  The config then holds the spec and the *layout* of the packed
layers (:func:`fxquant.persist.packed_layout`).  Loading a saved model: the layout rebuilds the
packed layers with empty tensors on the meta device before any weight is read
(:func:`fxquant.persist.build_packed`), and transformers' loader fills them from the checkpoint: no
float copy of a quantized weight is made.  ``FxQuantConfig(spec=Spec.from_config(BitsAndBytesConfig(
...)))`` (or ``spec=`` any config :meth:`Spec.from_config` reads) quantizes as that config says.

Importing this module registers the config and the quantizer with transformers (a second import
is harmless); ``import fxquant`` does so as soon as transformers' quantizer registry is imported.
"""
from __future__ import annotations

import contextvars
import enum
from typing import Any, Mapping

import torch

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .api import quantize_
from .persist import STAGED, build_packed, finish_staged, packed_layout, packed_state_dict
from .spec import Spec

__all__ = ["FxQuantConfig", "FxQuantHfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "fxquant"


class FxQuantMethod(str, enum.Enum):
    """The ``quant_method`` value (transformers and diffusers read ``.value`` of it)."""

    FXQUANT = QUANT_METHOD


class FxQuantConfigFields:
    """The fields of fxquant's quantization config, shared by the transformers and diffusers classes
    (diffusers' pipeline config requires both to take the same arguments).

    ``spec``: a :class:`~fxquant.Spec`, a scheme string, a spec dict, or any outside config
    :meth:`Spec.from_config` reads (a ``BitsAndBytesConfig``, a GPTQ dict, ...).
    ``example_inputs``: keyword arguments to trace the model with (default: its ``dummy_inputs``);
    ``calibration``: model inputs for the methods that need data (GPTQ, AWQ), or texts (``str``),
    tokenized with the model's own tokenizer as a GPTQ config's ``dataset`` is: neither is saved.
    ``layout``: written by fxquant after quantizing (what ``from_pretrained`` rebuilds); not for users.
    """

    def __init__(self, spec: Any = None, example_inputs: Mapping[str, Any] | None = None,
                 calibration: Any = None, layout: Mapping[str, Any] | None = None, **kwargs):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"FxQuantConfig: unknown fields {sorted(kwargs)}; valid: spec, example_inputs, "
                             "calibration, layout")
        self.quant_method = FxQuantMethod.FXQUANT
        self.spec = _as_spec(spec)
        self.example_inputs = example_inputs
        self.calibration = calibration
        self.layout = None if layout is None else dict(layout)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "spec": self.spec.to_dict(), "layout": self.layout}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, layout={'yes' if self.layout else 'no'})"


def _as_spec(spec: Any) -> Spec:
    if spec is None:
        raise ValueError("FxQuantConfig.spec is required: a Spec, a scheme string (e.g. 'int4wo-64'), a spec dict, "
                         "or a quantization config Spec.from_config reads")
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, str) and spec.strip().lower().startswith("gguf"):  # "gguf": a GGUF file's own types
        from .checkpoints._gguf_hf import GgufFileSpec

        if (gguf := GgufFileSpec.parse(spec)) is not None:
            return gguf
    if isinstance(spec, Mapping) and ("quant_method" in spec or "load_in_4bit" in spec or "load_in_8bit" in spec):
        return Spec.from_config(spec)
    if not isinstance(spec, (str, Mapping)) and hasattr(spec, "to_dict") and not hasattr(spec, "family"):
        return Spec.from_config(spec)
    return Spec.coerce(spec)


def _register(cls, registry, decorator, name):
    if name not in registry:
        decorator(name)(cls)
    return registry[name]


class FxQuantConfig(FxQuantConfigFields, QuantizationConfigMixin):
    """transformers' ``quantization_config`` for fxquant (see :class:`FxQuantConfigFields`)."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config


FxQuantConfig = _register(FxQuantConfig, AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config,
                          QUANT_METHOD)


class QuantizerSteps:
    """What the transformers and diffusers quantizers do, once."""

    @staticmethod
    def before_loading(config: FxQuantConfigFields, model: torch.nn.Module, pre_quantized: bool) -> None:
        """A saved fxquant model: rebuild its packed layers (empty, on the skeleton's device)."""
        if not pre_quantized:
            return
        if not config.layout:
            raise ValueError("fxquant: this checkpoint's quantization_config has no 'layout' (it was not written by "
                             "save_pretrained of an fxquant-quantized model); cannot rebuild its packed layers")
        build_packed(model, config.layout, staged=True)

    @staticmethod
    def after_loading(config: FxQuantConfigFields, model: torch.nn.Module, pre_quantized: bool) -> None:
        if pre_quantized:
            finish_staged(model, config.layout)
            left = [n for n, t in list(model.named_buffers()) + list(model.named_parameters()) if t.is_meta]
            if left:
                raise ValueError(f"fxquant: {len(left)} tensors were not in the checkpoint, e.g. {left[:3]}: the "
                                 "checkpoint does not match its quantization_config's layout")
            return
        calibration = config.calibration
        if isinstance(calibration, str):
            calibration = [calibration]
        if calibration is None and config.spec.calibration_texts:
            calibration = _tokenized(model, config.spec.calibration_texts)
        if calibration is not None:
            calibration = list(calibration)
            if calibration and all(isinstance(c, str) for c in calibration):
                calibration = _tokenized(model, calibration)
        if config.example_inputs is not None:
            example = dict(config.example_inputs)
        elif calibration and isinstance(calibration[0], Mapping):
            example = dict(calibration[0])  # traced as it will be calibrated (shape guards hold)
        else:
            example = _dummy_inputs(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in example.items()}
        # no example: the model's nn.Linear modules, as module-swapping quantizers see them
        frontend = "auto" if example else "modules"
        token = _LOADING.set(True)  # the loader sets its own config and quantizer on the model
        try:
            quantize_(model, config.spec, example_kwargs=example, calibration=calibration, frontend=frontend)
        finally:
            _LOADING.reset(token)
        config.layout = packed_layout(model)
        _untie_packed_heads(model)


def _dummy_inputs(model: torch.nn.Module) -> dict[str, Any]:
    """transformers' ``dummy_inputs`` (``{}`` when the model has none: a diffusers model)."""
    try:
        dummy = getattr(model, "dummy_inputs", None)
    except Exception:  # noqa: BLE001  (a property that fails for this model)
        dummy = None
    return dict(dummy) if isinstance(dummy, Mapping) else {}


def _tokenized(model: torch.nn.Module, texts) -> list[dict[str, torch.Tensor]]:
    """Calibration texts tokenized with the model's own tokenizer (``name_or_path``)."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (any failure: say what to do instead)
        raise ValueError(f"fxquant: calibration texts need a tokenizer and none could be loaded from {path!r} "
                         f"({e}); pass FxQuantConfig(calibration=[{{'input_ids': ...}}, ...])") from None
    return [dict(tok(t, return_tensors="pt")) for t in texts]


_LOADING = contextvars.ContextVar("fxquant_hf_loading", default=False)  # inside a quantizer's own quantize_


def attach(model: torch.nn.Module, spec: Spec) -> None:
    """After :func:`fxquant.quantize_` on a transformers model it did not load (no ``hf_quantizer`` yet): the
    config and quantizer ``from_pretrained(..., quantization_config=FxQuantConfig(...))`` would have left,
    so ``save_pretrained`` writes the packed tensors with the layout that loads them back packed (without
    them transformers would write packed tensors no ``from_pretrained`` can place), and a quantized tied
    head is untied."""
    if _LOADING.get() or getattr(model, "hf_quantizer", None) is not None or not hasattr(model, "config"):
        return
    config = FxQuantConfig(spec=spec, layout=packed_layout(model))
    model.config.quantization_config = config
    model.hf_quantizer = FxQuantHfQuantizer(config, pre_quantized=False)
    try:  # what transformers' loader marks (a private helper: absent in another version, nothing to mark)
        from transformers.quantizers.base import _assign_is_quantized
    except ImportError:
        _assign_is_quantized = None
    if _assign_is_quantized is not None:
        _assign_is_quantized(model)
    _untie_packed_heads(model)


def _untie_packed_heads(model: torch.nn.Module) -> None:
    """A packed output head no longer shares the input embedding's weight: saying the model's weights
    are tied would make transformers re-tie (replace) it when the model is loaded again."""
    from .modules import QuantizedLinear

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if not isinstance(out, QuantizedLinear) or cfg is None:
        return
    for c in [cfg] + ([cfg.get_text_config()] if hasattr(cfg, "get_text_config") else []):
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


class QuantizerHooks:
    """The hooks both libraries' quantizer base classes call, as :class:`QuantizerSteps` does them."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        QuantizerSteps.before_loading(self.quantization_config, model, self.pre_quantized)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        QuantizerSteps.after_loading(self.quantization_config, model, self.pre_quantized)
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


class FxQuantHfQuantizer(QuantizerHooks, HfQuantizer):
    """transformers' quantizer for ``quant_method="fxquant"`` (module docstring)."""

    def __new__(cls, quantization_config=None, *args, **kwargs):
        from .checkpoints._gguf_hf import FxQuantGgufHfQuantizer, GgufFileSpec

        if cls is FxQuantHfQuantizer and isinstance(getattr(quantization_config, "spec", None), GgufFileSpec):
            cls = FxQuantGgufHfQuantizer  # spec="gguf": a GGUF file loaded packed (checkpoints/_gguf_hf.py)
        return super().__new__(cls)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # float weights load as they are and are quantized after; packed ones load as stored

    def get_state_dict_and_metadata(self, model):
        """The checkpoint's tensors: packed weights (PackedWeight) as the plain tensors loading fills
        (diffusers' hook of the same name takes a state dict: its models keep the default)."""
        return packed_state_dict(model, sep=STAGED), {}

    def is_serializable(self, *args, **kwargs) -> bool:  # a method here, a property in diffusers
        return True


FxQuantHfQuantizer = _register(FxQuantHfQuantizer, AUTO_QUANTIZER_MAPPING, register_quantizer, QUANT_METHOD)
