"""Kernel tests: without a GPU, run the Triton kernels on Triton's CPU interpreter.

``TRITON_INTERPRET`` is read by ``@triton.jit`` when it decorates a function: Triton's own library
helpers (``tl.cdiv``, the combine function of ``tl.sum``, ...) are decorated at ``import triton``,
fxquant's kernels when a module of ``fxquant.kernels`` is first imported.  pytest imports this file
while collecting ``tests/kernels``, before the test modules there import Triton, so setting the
variable here takes effect.  If something imported Triton earlier in the same session without the
variable, the interpreter cannot work, and the kernel tests are skipped with that reason.
With a GPU the variable is left alone, so the same tests exercise the compiled kernels on CUDA.
An explicit ``TRITON_INTERPRET`` in the environment always wins.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent
_TRUE = {"1", "true", "on", "yes"}
_interpret_preset = os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE
_TOO_LATE = (not torch.cuda.is_available() and not _interpret_preset and "triton" in sys.modules)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not _TOO_LATE:
        return
    skip = pytest.mark.skip(reason="triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, "
                                   "so its interpreter cannot run; run `TRITON_INTERPRET=1 python -m pytest "
                                   "tests/kernels` (or tests/kernels in its own process)")
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(skip)
