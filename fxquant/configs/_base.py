"""What every config reader shares: the dict form of a config, field bookkeeping, the registry.

A reader takes a :class:`Fields` (the config's dict, named for error messages) and returns a
:class:`~fxquant.spec.Spec`.  It ``take``s every field that changes the result (validated, with the
valid choices in the error), marks fields that do not change the quantized weights as ``inert``
(each present one becomes a note in ``Spec.notes``, then in the report), and ``finish`` raises for
any field no version of that config has.  Nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = ["Fields", "as_dict", "reader", "writer", "READERS", "WRITERS", "torch_dtype", "MISSING"]

#: quant_method -> (reader(Fields) -> Spec, the config's class name, every field any version has)
READERS: dict[str, tuple[Callable[["Fields"], Any], str, tuple[str, ...]]] = {}
#: kind -> writer(Spec) -> dict
WRITERS: dict[str, Callable[[Any], dict]] = {}
MISSING = object()


def reader(*quant_methods: str, name: str, fields: Iterable[str]):
    """Register a reader for the configs whose ``quant_method`` is one of ``quant_methods``; ``name``
    is the config's class name (messages), ``fields`` every field any version of it has."""
    def register(fn):
        for method in quant_methods:
            READERS[method] = (fn, name, tuple(fields))
        return fn
    return register


def writer(*kinds: str):
    """Register ``fn(spec) -> dict`` as the ``Spec.to_config(kind)`` of each of ``kinds``."""
    def register(fn):
        for kind in kinds:
            WRITERS[kind] = fn
        return fn
    return register


def as_dict(cfg: Any, what: str = "config") -> dict:
    """A config as a plain dict: a ``Mapping`` as it is, else the object's ``to_dict()``."""
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, Mapping):
            return dict(d)
    raise TypeError(f"{what}: expected a dict (a config.json 'quantization_config') or an object with "
                    f"to_dict(), got {type(cfg).__name__}")


class Fields:
    """The fields of one config dict, consumed by a reader (see the module docstring).

    ``name``: the config's name in messages (``"BitsAndBytesConfig"``); ``known``: every field any
    version of this config has (taken, inert or ignored as bookkeeping such as ``quant_method``)."""

    def __init__(self, name: str, d: Mapping[str, Any], known: Iterable[str]):
        self.name = name
        self.d = dict(d)
        self.known = set(known) | {"quant_method"}
        self.used: set[str] = {"quant_method"}
        self.notes: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.d

    def error(self, field: str, msg: str) -> ValueError:
        return ValueError(f"{self.name}.{field}: {msg}")

    def take(self, field: str, default: Any = None, *, choices: Iterable | None = None,
             check: Callable[[Any], bool] | None = None, valid: str = "") -> Any:
        """The value of ``field`` (``default`` when absent or ``None``), checked against ``choices``
        or ``check``; ``ValueError`` naming the config, the field and ``valid`` otherwise."""
        self.used.add(field)
        value = self.d.get(field)
        if value is None:
            return default
        if choices is not None:
            choices = list(choices)
            if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices if c == value):
                raise self.error(field, f"{value!r} is not supported; valid: {valid or ', '.join(map(repr, choices))}")
        if check is not None and not check(value):
            raise self.error(field, f"{value!r} is not supported; valid: {valid}")
        return value

    def inert(self, *fields: str, defaults: Mapping[str, Any] | None = None,
              unless: Mapping[str, Any] | None = None) -> None:
        """Accept ``fields``: each one present with a value other than ``None`` and its default
        (``defaults``) is listed in the notes as not changing the quantized weights.  ``unless``:
        field -> the only values it may have (anything else would change the result: an error)."""
        defaults = defaults or {}
        for f in fields:
            self.used.add(f)
            value = self.d.get(f)
            if value is None:
                continue
            if unless and f in unless and value not in unless[f]:
                raise self.error(f, f"{value!r} is not supported: fxquant quantizes for inference; valid: "
                                 f"{', '.join(map(repr, unless[f]))}")
            if f in defaults and value == defaults[f]:
                continue
            self.notes.append(f"{self.name}: {f}={value!r} accepted; it does not change the quantized weights")

    def finish(self, spec: Any) -> Any:
        """``spec`` with this config's notes; ``ValueError`` for a field no version of the config has."""
        unknown = sorted(set(self.d) - self.known)
        if unknown:
            raise self.error(unknown[0], f"no version of {self.name} has this field; its fields: "
                             f"{', '.join(sorted(self.known - {'quant_method'}))}")
        unread = sorted(set(self.d) - self.used)
        if unread:  # a reader bug, not the user's: every known field must be taken or inert
            raise RuntimeError(f"{self.name}: fields {unread} were neither read nor accepted")
        return dataclasses.replace(spec, notes=tuple(spec.notes) + tuple(self.notes))


def torch_dtype(value: Any, where: str, allowed: Iterable[torch.dtype] | None = None) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> the dtype, else ``ValueError``."""
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or (allowed is not None and dtype not in tuple(allowed)):
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed) if allowed else "a torch dtype name"
        raise ValueError(f"{where}: {value!r} is not supported; valid: {names}")
    return dtype


def names(value: Any, where: str) -> list[str]:
    """A list of module names (``None`` -> ``[]``), else ``ValueError``."""
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of module names, got {value!r}")
    return list(value)


def hf_module_patterns(keys: Any, where: str) -> list[str]:
    """transformers' module-name lists (``modules_to_not_convert``, ``llm_int8_skip_modules``,
    ``skip_modules``) as spec patterns with its meaning (``should_convert_module``): a key matches a
    module when it matches (as a regex) from the start of the name up to a module boundary, or when
    the name ends with it.  fxquant's patterns also try each dotted suffix of the name, so
    ``"layers.1"`` skips ``model.layers.1.mlp.up_proj`` too."""
    import re

    out = []
    for key in names(keys, where):
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{where}: {key!r} is not a valid regular expression: {e}") from None
        out.append(f"re:(?:{key})(?:\\..*)?|.*{re.escape(key)}")
    return out


def default_only(spec: Any, kind: str) -> tuple[Any, list[str]]:
    """``(spec.default, skip names)`` for configs that say one scheme and a skip list: ``ValueError``
    when ``spec`` has rules, a method or a ``re:`` / glob skip pattern such a config cannot say."""
    from ..spec import Pattern

    if spec.default is None:
        raise ValueError(f"Spec.to_config({kind!r}): the spec has no default scheme")
    if spec.rules:
        raise ValueError(f"Spec.to_config({kind!r}): per-layer rules have no {kind} form; valid: a default "
                         "scheme and a skip list")
    skip = []
    for s in spec.skip:
        key = hf_key(s)
        if key is None and Pattern(s).kind != "exact":
            raise ValueError(f"Spec.to_config({kind!r}): skip pattern {s!r} has no {kind} form; valid: module names")
        skip.append(s if key is None else key)
    return spec.default, skip


def hf_key(pattern: str) -> str | None:
    """The transformers key :func:`hf_module_patterns` turned into ``pattern`` (else ``None``)."""
    head, sep, _ = pattern.partition(")(?:\\..*)?|.*")
    if not pattern.startswith("re:(?:") or not sep:
        return None
    key = head[len("re:(?:"):]
    return key if hf_module_patterns([key], "")[0] == pattern else None
