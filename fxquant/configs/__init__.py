"""Outside quantization configs -> :class:`~fxquant.spec.Spec` (``Spec.from_config``) and back
(``Spec.to_config``).  One module per ecosystem; each holds its field table (docs/configs.md).

A config is a plain dict (a ``config.json``'s ``quantization_config``) or any object with
``to_dict()``: transformers, diffusers and the quantization libraries are never imported here.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ._base import READERS, WRITERS, Fields, as_dict

__all__ = ["spec_from_config", "spec_to_config", "config_kinds"]

for _m in pkgutil.iter_modules(__path__):  # every reader module registers its quant_method names
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def _kind(d: dict) -> str:
    kind = d.get("quant_method")
    if kind is None and any(k in d for k in ("load_in_4bit", "load_in_8bit")):
        return "bitsandbytes"  # bitsandbytes' own dicts carry no quant_method
    if kind is None and "config_groups" in d:
        return "compressed-tensors"  # compressed-tensors' QuantizationConfig.model_dump() carries none
    if hasattr(kind, "value"):  # a QuantizationMethod enum
        kind = kind.value
    if not isinstance(kind, str):
        raise ValueError(f"quantization config: no 'quant_method' field (got keys {sorted(d)}); valid: "
                         f"{', '.join(sorted(READERS))}")
    return kind.lower()


def spec_from_config(cfg: Any):
    """The spec a quantization config describes; ``ValueError`` naming the config and the field when a
    field is unknown or its value cannot be honoured."""
    d = as_dict(cfg)
    kind = _kind(d)
    entry = READERS.get(kind)
    if entry is None:
        raise ValueError(f"quantization config: quant_method {kind!r} is not supported; valid: "
                         f"{', '.join(sorted(READERS))}")
    read, name, fields = entry
    return read(Fields(name, d, fields))


def spec_to_config(spec, kind: str) -> dict:
    """``spec`` as the ``quantization_config`` dict of ``kind``."""
    write = WRITERS.get(kind)
    if write is None:
        raise ValueError(f"Spec.to_config: kind {kind!r} is not supported; valid: {', '.join(sorted(WRITERS))}")
    return write(spec)


def config_kinds() -> dict[str, list[str]]:
    """``{"read": quant_methods, "write": kinds}``."""
    return {"read": sorted(READERS), "write": sorted(WRITERS)}
