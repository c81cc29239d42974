"""Register fxquant with transformers / diffusers when (and only when) their quantizer registries are
imported: ``import fxquant`` stays free of both (importing transformers' registry takes seconds).

A post-import hook on ``transformers.quantizers.auto`` and ``diffusers.quantizers.auto`` imports
:mod:`fxquant.hf` / :mod:`fxquant.hf_diffusers` right after the registry module has run; if it is
already imported, registration happens at once.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: registry module -> the fxquant module that registers with it
TARGETS = {"transformers.quantizers.auto": "fxquant.hf", "diffusers.quantizers.auto": "fxquant.hf_diffusers"}


def _register(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (never break the user's import of transformers / diffusers)
        warnings.warn(f"fxquant: could not register its quantizer ({module}): {e}", stacklevel=2)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS or fullname in self.busy:
            return None
        self.busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, ours = spec.loader, TARGETS[fullname]
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _register(ours)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now for the registries already imported; hook the others."""
    for registry, ours in TARGETS.items():
        if registry in sys.modules:
            _register(ours)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
