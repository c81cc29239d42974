"""Kernel tests: without a GPU, run the Triton kernels on Triton's CPU interpreter.

``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, i.e. when a module of
``fxquant.kernels`` is first imported.  pytest imports this file while collecting
``tests/kernels``, before the test modules there import the kernels, so setting the variable here
takes effect.  (A kernel module imported earlier in the session is reloaded by the test modules.)
With a GPU the variable is left alone, so the same tests exercise the compiled kernels on CUDA.
An explicit ``TRITON_INTERPRET`` in the environment always wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
