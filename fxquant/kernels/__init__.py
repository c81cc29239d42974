"""Triton kernels behind the CUDA impls of the ``torch.ops.fxquant.*`` weight-only ops.

One module per op family (:mod:`.int8wo`, :mod:`.int4wo`, :mod:`.intx`, :mod:`.bnb4`, :mod:`.int8dq`,
:mod:`.float8`, :mod:`.fpx`, :mod:`.onebit`), each laid out as: private ``@triton.jit`` kernel,
its autotune configs, then the launcher the op calls with 2-D ``x``; :mod:`._common` holds the
tile order, config helpers and the interpreter's bf16 workaround they share.
The op modules import these lazily (only a CUDA call needs Triton), and every kernel is tested
against its op's plain-torch ``reference``.

Without a GPU the kernels run under Triton's CPU interpreter: set ``TRITON_INTERPRET=1`` *before*
a kernel module is imported (``@triton.jit`` reads it when it decorates) and pass CPU tensors.
That is for correctness checks only; the interpreter is orders of magnitude slower than a GPU.
"""
from __future__ import annotations

import os

__all__ = ["interpreting"]

# The spellings Triton itself accepts as true for boolean environment knobs.
_TRUE = frozenset({"1", "true", "on", "yes"})


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value in this process right now.

    A kernel module decorates its kernel once, at import, so what it uses is the value this
    returned then (recorded once as ``fxquant.kernels._common.INTERPRETED``).
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE
