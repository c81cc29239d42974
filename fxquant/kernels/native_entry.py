"""The ops' decode fast path as a C++ dispatcher kernel (``native_entry.cpp``): build, load, configure.

Why: at M = 1 a small layer's C kernel takes ~10 us and a Python op kernel ~20-30 us more before it
runs (argument binding, checks, routing, ctypes); a compiled graph calls the ops through the
dispatcher, ~7 per decoder layer per token.  The C++ kernels sit at the ops' AutogradCPU key
(gradients to the Python autograd Function) and BackendSelect key (just above the backends) and run,
for plain CPU tensors, the same C kernel the Python CPU impl would (bf16 activations at decode
sizes: ``linear_int4wo``, ``linear_int8wo``, ``linear_int8dq``, ``linear_bnb4`` / ``_dq``,
``linear_affine`` and their experts twins), else hand the call to the Python kernels unchanged (the
cpp file's header says exactly when).  Measured (Zen 4, 2 threads, bf16 x, M = 1, 256x2048
int4wo-128, warm): 35 us per ``torch.ops`` call through Python, 13 us through it.

Built on first use with the C++ compiler (``CXX``, default ``c++``) against the installed torch's
headers into the native kernels' cache directory (:func:`fxquant.kernels.native_build._cache_dir`),
keyed by the source, the flags, the compiler and the torch build; loaded with
``torch.ops.load_library`` (a shared library, no pickling).  Unavailable (no compiler, no headers,
``FXQUANT_NATIVE_ENTRY=0``, the native kernels unavailable): every call takes the Python kernels, the
reason in :func:`status`.  :func:`disabled` turns it off for a block (tests that patch the Python
routing).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from . import native_build

SOURCE = Path(__file__).with_name("native_entry.cpp")
#: the ops the C++ entry registers kernels for, with their ``_experts`` twins (the ``TORCH_LIBRARY_IMPL`` blocks)
OPS = frozenset({"linear_int4wo", "linear_int8wo", "linear_int8dq", "linear_bnb4", "linear_bnb4_dq", "linear_affine"})
FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
#: whether :func:`ensure` has run (the ops' Python kernels read it on every call)
tried = False
_status = "not loaded yet"


def status() -> str:
    """``"loaded"``, or why the C++ entry is not used."""
    return _status


def ensure() -> bool:
    """Build, load and configure the C++ entry once per process; True when it is active."""
    global tried, _status
    if not tried:
        with _lock:
            if not tried:
                _status = _load()
                tried = True
    return _status == "loaded"


def _load() -> str:
    if os.environ.get("FXQUANT_NATIVE_ENTRY", "1") == "0":
        return "disabled by FXQUANT_NATIVE_ENTRY=0"
    lib = native_build._lib()
    if lib is None:
        return f"native kernels unavailable ({native_build.status()})"
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"fxquant's C++ op entry is unavailable ({e}); ops run their Python CPU kernels", stacklevel=3)
        return f"build failed: {e}"
    _configure(lib)
    return "loaded"


def row_limits() -> dict[str, int]:
    """The most rows of x each kernel family of the C++ entry takes: the limits the Python CPU
    paths route by (one source: :func:`_configure` hands these to the entry)."""
    from ..ops import _cpu, affine, bnb4, int4wo, int8dq, int8wo

    return {"int4": int4wo.NATIVE_MAX_ROWS_BF16DOT, "int8": int8wo.native_max_rows(),
            "int8dq": min(int8wo.native_max_rows(), int8dq.INT8PACK_MAX_M),  # int8dq's GEMV branch
            # affine's GEMV: below its own limit and the rows where the op stops calling it (large M)
            "affine": min(affine.NATIVE_MAX_ROWS, _cpu.large_m_threshold() - 1),
            # the table GEMV: below the rows where the native GEMM takes over
            "lut4": min(bnb4.NATIVE_MAX_ROWS, bnb4.NATIVE_GEMM_MIN_ROWS - 1)}


def _configure(lib) -> None:
    """Give the C++ entry the kernels and row limits the Python CPU paths route by (one source)."""

    def address(fn) -> int:
        return ctypes.cast(fn, ctypes.c_void_p).value

    cfg, rows = torch.ops.fxquant_native.configure, row_limits()
    if lib.fxq512_int4t_bf16_gemv_x is not None:
        cfg("int4", address(lib.fxq512_int4t_bf16_gemv_x), rows["int4"])
    cfg("int8", address(lib.fxq_int8_gemv), rows["int8"])
    cfg("int8dq", 0, rows["int8dq"])
    cfg("affine", address(lib.fxq_affine_gemv), rows["affine"])
    if lib.fxq512_lut4_bf16_gemv_x is not None:
        cfg("lut4", address(lib.fxq512_lut4_bf16_gemv_x), rows["lut4"])
    cfg("enabled", 1, 0)


@contextlib.contextmanager
def disabled():
    """Calls inside take the Python kernels (the C++ entry hands every call on)."""
    was = ensure() and torch.ops.fxquant_native.enabled()
    if was:
        torch.ops.fxquant_native.configure("enabled", 0, 0)
    try:
        yield
    finally:
        if was:
            torch.ops.fxquant_native.configure("enabled", 1, 0)


def _build() -> Path:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    lib_dir = cpp_extension.library_paths()[0]
    flags = (*FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{p}" for p in cpp_extension.include_paths()))
    libs = (f"-L{lib_dir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags + libs), version, torch.__version__,
                                    str(torch.version.git_version)]).encode())
    return native_build.build_cached(f"fxquant_entry_{key.hexdigest()[:16]}.so",
                                     [cxx, *flags, str(SOURCE), *libs])
