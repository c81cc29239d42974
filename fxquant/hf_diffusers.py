"""fxquant as a diffusers quantization backend: ``quant_method="fxquant"``, ``quant_backend="fxquant"``.

```python
unet = UNet2DConditionModel.from_pretrained(path, quantization_config=FxQuantDiffusersConfig(spec="int8wo"))
pipe = DiffusionPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(
    quant_backend="fxquant", quant_kwargs={"spec": "int8wo"}, components_to_quantize=["transformer"]))
```

Same steps as the transformers quantizer (:class:`fxquant.hf.QuantizerSteps`): float weights load,
then :func:`fxquant.quantize_` runs (diffusers models have no example inputs: without
``example_inputs`` the sites are the model's ``nn.Linear`` modules, ``frontend="modules"``); a saved
model's packed layers are rebuilt on the meta device from the config's layout and the checkpoint's
packed tensors load straight in.  diffusers has no registration function: importing this module adds
fxquant to its quantizer and config mappings (a second import is harmless).
"""
from __future__ import annotations

import torch
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .hf import QUANT_METHOD, FxQuantConfigFields, QuantizerHooks

__all__ = ["FxQuantDiffusersConfig", "FxQuantDiffusersQuantizer"]


class FxQuantDiffusersConfig(FxQuantConfigFields, QuantizationConfigMixin):
    """diffusers' ``quantization_config`` for fxquant (:class:`fxquant.hf.FxQuantConfigFields`)."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config


class FxQuantDiffusersQuantizer(QuantizerHooks, DiffusersQuantizer):
    """diffusers' quantizer for ``quant_method="fxquant"`` (module docstring)."""

    @property
    def is_serializable(self) -> bool:
        return True


FxQuantDiffusersConfig = _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, FxQuantDiffusersConfig)
FxQuantDiffusersQuantizer = _auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, FxQuantDiffusersQuantizer)


def attach(model: torch.nn.Module, spec) -> None:
    """:func:`fxquant.hf.attach` for a diffusers model: its config's ``quantization_config`` and quantizer, so
    ``save_pretrained`` writes a checkpoint ``from_pretrained`` loads packed."""
    from .hf import _LOADING
    from .persist import packed_layout

    if _LOADING.get() or getattr(model, "hf_quantizer", None) is not None:
        return
    config = FxQuantDiffusersConfig(spec=spec, layout=packed_layout(model))
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = FxQuantDiffusersQuantizer(config, pre_quantized=False)
