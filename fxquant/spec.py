"""``Spec``: which scheme each linear layer gets.

Precedence (documented once, here): the skip list first, then ``rules`` in order (first match
wins), then ``default``.  A pattern is ``"re:<regex>"`` (Python ``re.fullmatch``), a glob when it
contains ``*``, ``?`` or ``[`` (``fnmatch``; ``*`` also crosses dots), otherwise an exact name.
Patterns are anchored at module boundaries: ``"layers.0.q_proj"`` matches the site
``layers.0.q_proj`` and also ``model.layers.0.q_proj`` (any dotted suffix of the name), so the
same spec works for a bare decoder and for the ``*ForCausalLM`` wrapper around it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .schemes import Scheme, parse_scheme, scheme_from_json, scheme_to_json

__all__ = ["Spec", "Pattern", "Rule", "Choice"]

#: ``Spec.to_dict``'s format: 2 = structured schemes (1: scheme strings, still read)
SPEC_VERSION = 2


@dataclass(frozen=True)
class Pattern:
    """One name pattern: ``re:`` regex, glob, or exact."""

    text: str

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise ValueError(f"pattern must be a non-empty string, got {self.text!r}")
        if self.kind == "re":
            try:
                re.compile(self.text[3:])
            except re.error as e:
                raise ValueError(f"pattern {self.text!r}: invalid regular expression: {e}") from None

    @property
    def kind(self) -> str:
        if self.text.startswith("re:"):
            return "re"
        return "glob" if any(c in self.text for c in "*?[") else "exact"

    def matches(self, name: str) -> bool:
        """True if the pattern matches ``name`` or one of its dotted suffixes."""
        parts = name.split(".")
        for i in range(len(parts)):
            candidate = ".".join(parts[i:])
            if self.kind == "re":
                if re.fullmatch(self.text[3:], candidate):
                    return True
            elif self.kind == "glob":
                if fnmatch.fnmatchcase(candidate, self.text):
                    return True
            elif candidate == self.text:
                return True
        return False


@dataclass(frozen=True)
class Rule:
    pattern: Pattern
    scheme: Scheme | None
    #: the rule named round-to-nearest itself (``"int4wo-64@rtn"``): ``Spec.method`` does not apply to it
    rtn: bool = False


@dataclass(frozen=True)
class Choice:
    """The spec's decision for one site: the scheme (``None`` = keep float) and what decided it."""

    scheme: Scheme | None
    source: str  # "skip['lm_head']", "rules['re:layers\\.0\\..*']", "default"


@dataclass(frozen=True, kw_only=True)
class Spec:
    """Frozen, validated quantization spec.

    ``default``: scheme for every linear not matched by ``skip`` or ``rules`` (``None`` = float).
    ``skip``: patterns of layers to leave in float.
    ``rules``: ordered ``{pattern: scheme or None}`` (a dict or a list of pairs); first match wins.
    """

    default: Scheme | str | None = None
    skip: tuple[str, ...] | list[str] = ()
    rules: Mapping[str, Any] | Iterable[tuple[str, Any]] | tuple[Rule, ...] = ()
    #: a method (``fxquant.methods`` object or name) for every scheme here that names none
    method: Any = None
    #: texts to calibrate on when the caller gives no ``calibration`` (a GPTQ config's ``dataset``);
    #: tokenized by whoever runs the spec with a tokenizer (:mod:`fxquant.hf`)
    calibration_texts: tuple[str, ...] = ()
    #: what the config this spec was read from held that does not change the quantized weights
    #: (``Spec.from_config``); listed in the report's notes
    notes: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        from .methods import parse_method

        object.__setattr__(self, "method", parse_method(self.method, where="Spec.method"))
        if self.method is not None and self.method.name == "rtn":
            object.__setattr__(self, "method", None)
        object.__setattr__(self, "default", self._with_method(parse_scheme(self.default, where="Spec.default"),
                                                              "Spec.default", _names_rtn(self.default)))
        if isinstance(self.skip, str):
            raise ValueError(f"Spec.skip must be a list of patterns, got the string {self.skip!r}")
        skip = tuple(self.skip)
        for i, s in enumerate(skip):
            try:
                Pattern(s)
            except ValueError as e:
                raise ValueError(f"Spec.skip[{i}]: {e}") from None
        object.__setattr__(self, "skip", skip)
        items = self.rules.items() if isinstance(self.rules, Mapping) else self.rules
        rules = []
        for item in items:
            if isinstance(item, Rule):
                rules.append(item)
                continue
            try:
                pat, scheme = item
            except (TypeError, ValueError):
                raise ValueError(f"Spec.rules: expected (pattern, scheme) pairs, got {item!r}") from None
            where = f"Spec.rules[{pat!r}]"
            try:
                rtn = _names_rtn(scheme)
                if _is_method(scheme):  # a method alone: the default scheme's format with it
                    if self.default is None:
                        raise ValueError(f"method {scheme} given without a scheme (Spec.default is None)")
                    scheme = dataclasses.replace(self.default.format, method=scheme)
                scheme = self._with_method(parse_scheme(scheme, where=where), where, rtn)
                rules.append(Rule(Pattern(pat), scheme, rtn and scheme is not None and self.method is not None))
            except ValueError as e:
                raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        object.__setattr__(self, "rules", tuple(rules))
        for field in ("calibration_texts", "notes"):
            value = getattr(self, field)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"Spec.{field} must be a list of strings, got {value!r}")
            object.__setattr__(self, field, tuple(value))

    def _with_method(self, scheme: Scheme | None, where: str, rtn: bool = False) -> Scheme | None:
        """``scheme`` with ``Spec.method`` when it names no method (``rtn``: it named round-to-nearest)."""
        if scheme is None or self.method is None or scheme.method is not None or rtn:
            return scheme
        try:
            return dataclasses.replace(scheme, method=self.method)
        except ValueError as e:
            raise ValueError(f"{where}: Spec.method: {e}") from None

    # -- matching -------------------------------------------------------------------------------
    def choose(self, name: str) -> Choice:
        """Scheme for the site called ``name``: skip list, then rules in order, then default."""
        for s in self.skip:
            if Pattern(s).matches(name):
                return Choice(None, f"skip[{s!r}]")
        for r in self.rules:
            if r.pattern.matches(name):
                return Choice(r.scheme, f"rules[{r.pattern.text!r}]")
        return Choice(self.default, "default")

    def unused(self, names: Iterable[str]) -> list[str]:
        """Skip entries and rules that decide no site among ``names`` (as ``choose`` sources)."""
        used = {self.choose(n).source for n in names}
        entries = [f"skip[{s!r}]" for s in self.skip] + [f"rules[{r.pattern.text!r}]" for r in self.rules]
        return [e for e in entries if e not in used]

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe dict in the canonical form (every scheme structured, :func:`scheme_to_json`),
        with the format's ``version``; ``Spec.from_dict(spec.to_dict()) == spec``."""
        from .methods import method_to_json

        d = {
            "version": SPEC_VERSION,
            "default": scheme_to_json(self.default),
            "skip": list(self.skip),
            "rules": {r.pattern.text: _rule_json(r) for r in self.rules},
        }
        if self.default is not None and self.default.method is None and self.method is not None:
            d["default"]["method"] = "rtn"  # named by the user: Spec.method did not apply
        if self.method is not None:
            d["method"] = method_to_json(self.method)
        if self.calibration_texts:
            d["calibration_texts"] = list(self.calibration_texts)
        if self.notes:
            d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spec":
        from .methods import method_from_json

        keys = ("version", "default", "skip", "rules", "method", "calibration_texts", "notes")
        unknown = set(d) - set(keys)
        if unknown:
            raise ValueError(f"Spec.from_dict: unknown keys {sorted(unknown)}; valid: {', '.join(keys)}")
        version = d.get("version", 1)  # version 1: written before the key existed (scheme strings)
        if version not in (1, SPEC_VERSION):
            raise ValueError(f"Spec.from_dict: version {version!r} is not supported (this fxquant reads "
                             f"1..{SPEC_VERSION}; a newer fxquant wrote it?)")
        rules = d.get("rules", {})
        items = rules.items() if isinstance(rules, Mapping) else rules
        default = scheme_from_json(d.get("default"), where="Spec.default")
        if default is not None and _names_rtn(d.get("default")):
            default = f"{default}@rtn"  # named by the user: Spec.method does not apply
        return cls(
            default=default,
            skip=tuple(d.get("skip", ())),
            rules=tuple(Rule(Pattern(p), scheme_from_json(s, where=f"Spec.rules[{p!r}]"), True)
                        if _names_rtn(s) and d.get("method") is not None
                        else (p, scheme_from_json(s, where=f"Spec.rules[{p!r}]")) for p, s in items),
            method=method_from_json(d.get("method"), where="Spec.method"),
            calibration_texts=tuple(d.get("calibration_texts", ())),
            notes=tuple(d.get("notes", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        """``Spec.from_json(spec.to_json()) == spec``."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_config(cls, cfg: Any) -> "Spec":
        """The spec an outside quantization config describes (transformers / diffusers / bitsandbytes /
        torchao / HQQ / quanto / EETQ / FBGEMM / GPTQ / AWQ / compressed-tensors / OneBit): a plain dict
        (a ``config.json``'s ``quantization_config``) or an object with ``to_dict()``.  Fields that do
        not change the weights are listed in ``Spec.notes``; see :mod:`fxquant.configs`."""
        from .configs import spec_from_config

        return spec_from_config(cfg)

    def to_config(self, kind: str) -> dict:
        """This spec as the ``quantization_config`` dict of ``kind`` (e.g. ``"bitsandbytes"``,
        ``"torchao"``, ``"gptq"``): ``ValueError`` when that config cannot say it."""
        from .configs import spec_to_config

        return spec_to_config(self, kind)

    @classmethod
    def coerce(cls, spec: "Spec | str | Scheme | Mapping | None") -> "Spec":
        """Accept a Spec, a scheme (string/object, as the default) or a dict (``from_dict``)."""
        if isinstance(spec, Spec):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        return cls(default=spec)


def _names_rtn(value: Any) -> bool:
    """Whether a scheme / rule value names round-to-nearest itself (``"...@rtn"``, ``RTN()``, a JSON form
    with ``"method": "rtn"``): a choice ``Spec.method`` must not override."""
    from .methods import Method

    if isinstance(value, str):
        return "@" in value and value.rpartition("@")[2].strip().lower() == "rtn"
    if isinstance(value, Method):
        return value.name == "rtn"
    if isinstance(value, Mapping):
        m = value.get("method")
        return ((isinstance(m, str) and m.strip().lower() == "rtn")
                or (isinstance(m, Mapping) and m.get("name") == "rtn"))
    return False


def _rule_json(rule: Rule) -> dict | None:
    d = scheme_to_json(rule.scheme)
    if rule.rtn:
        d["method"] = "rtn"
    return d


def _is_method(value: Any) -> bool:
    from .methods import Method

    return isinstance(value, Method)
