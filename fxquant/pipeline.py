"""``quantize_pipeline``: quantize the components of a diffusion pipeline, each with its own spec.

```python
specs = fxquant.quantize_pipeline(
    {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder},
    PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit",
                               quant_kwargs={"bnb_4bit_quant_type": "nf4"},
                               components_to_quantize=["transformer"]),
    example_inputs={"transformer": dict(hidden_states=x, encoder_hidden_states=c, timestep=t)})
fxquant.report(pipe.transformer)
```
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from . import inplace
from .api import quantize_
from .configs.diffusers import NAME, read_pipeline_config
from .spec import Spec

__all__ = ["quantize_pipeline"]


def quantize_pipeline(components: Mapping[str, Any], cfg: Any, example_inputs: Mapping[str, Any] | None = None,
                      *, calibration: Mapping[str, Iterable] | None = None,
                      frontend: str = "auto") -> dict[str, Spec]:
    """Quantize in place the components ``cfg`` names; return ``{component: the spec it got}``.

    ``components``: name -> module (e.g. ``pipe.components``; entries that are not ``nn.Module`` --
    schedulers, tokenizers -- are quantized only if named, which is an error).  ``cfg``: diffusers'
    ``PipelineQuantizationConfig`` or a dict of its fields (:mod:`fxquant.configs.diffusers`: the
    ``quant_backend`` names diffusers documents plus ``"fxquant"``, or a ``quant_mapping``).
    Components the config does not name are not touched.

    ``example_inputs[name]``: how that component is called when traced -- a tensor (the one
    positional argument), a tuple or list (positional arguments) or a dict (keyword arguments; to mix
    both, pass every argument by keyword).  A component without one is quantized without a trace
    (``frontend="modules"``: its ``nn.Linear`` modules; no calibration).  ``calibration[name]``: that
    component's calibration inputs (same forms), for the methods that need data.  ``frontend``:
    :func:`fxquant.quantize_`'s, for the components with example inputs.

    Every component, spec and input is checked before any component is changed (``ValueError`` /
    ``TypeError`` naming the component); ``fxquant.report(module)`` gives each component's report.
    """
    if not isinstance(components, Mapping):
        raise TypeError(f"quantize_pipeline: components must be a dict of name -> module, got "
                        f"{type(components).__name__}")
    example_inputs = _named(example_inputs, "example_inputs", components)
    calibration = _named(calibration, "calibration", components)
    specs = read_pipeline_config(cfg).for_components(components)
    calls = {}
    for name in specs:
        if not isinstance(components[name], torch.nn.Module):
            raise TypeError(f"{NAME}: component {name!r} is a {type(components[name]).__name__}, not a "
                            "torch.nn.Module; valid: the pipeline's model components")
        if name in calibration and name not in example_inputs:
            raise ValueError(f"quantize_pipeline: calibration[{name!r}] needs example_inputs[{name!r}] (a traced "
                             "graph to calibrate)")
        calls[name] = _call(example_inputs[name], name) if name in example_inputs else None
        inplace.check_not_quantized(components[name])
        data = [str(s) for s in _schemes(specs[name]) if s.method is not None and s.method.needs_data]
        if data and name not in calibration:
            raise ValueError(f"quantize_pipeline: component {name!r}: {', '.join(sorted(set(data)))} need "
                             f"calibration data; valid: calibration={{{name!r}: [inputs, ...]}} with example_inputs")
    for name, spec in specs.items():
        call = calls[name]
        args, kwargs = call if call is not None else ((), None)
        quantize_(components[name], spec, args, kwargs, frontend=frontend if call is not None else "modules",
                  calibration=calibration.get(name))
    return specs


def _schemes(spec: Spec) -> list:
    return [s for s in [spec.default, *(r.scheme for r in spec.rules)] if s is not None]


def _named(value: Mapping[str, Any] | None, what: str, components: Mapping[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"quantize_pipeline: {what} must be a dict of component name -> inputs, got "
                        f"{type(value).__name__}")
    unknown = sorted(set(value) - set(components))
    if unknown:
        raise ValueError(f"quantize_pipeline: {what} names components {unknown} that are not in the pipeline; "
                         f"valid: {sorted(components)}")
    return dict(value)


def _call(value: Any, name: str) -> tuple[tuple, dict | None]:
    """``(args, kwargs)`` of one component's example inputs (tensor / tuple or list / dict)."""
    if isinstance(value, torch.Tensor):
        return (value,), None
    if isinstance(value, (tuple, list)):
        return tuple(value), None
    if isinstance(value, Mapping):
        return (), dict(value)
    raise TypeError(f"quantize_pipeline: example_inputs[{name!r}] must be a tensor, a tuple / list of positional "
                    f"arguments or a dict of keyword arguments, got {type(value).__name__}")
