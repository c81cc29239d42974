"""How the native CPU kernels of :mod:`fxquant.kernels.native_cpu` (and of the other ``native_*``
wrapper modules) are built and loaded: the C sources, headers and build flags; the ctypes signature
tables; the build with ``cc`` into a cache directory keyed by the sources, the flags, the compiler and
this CPU (:func:`_build`); loading the library once per process (:func:`_library`, the reason it is
unavailable in :func:`status`); binding one instruction set's kernels (:func:`isas`, :func:`kernels`,
:func:`fault_injection_kernels` for tests); the set the ops use (:func:`_lib`, None when unavailable;
:func:`available`, :func:`isa`, :func:`has_bf16_dot`, :func:`has_bf16_gemm`); and a kernel's status
code as an exception (:func:`_raise`).  See :mod:`fxquant.kernels.native_cpu` for the why, the
instruction sets and the build's fallbacks.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import types
import warnings
from pathlib import Path

#: compiled together into one library: the AVX2 kernels (fxq_*), their AVX-512 variants (fxq512_*,
#: empty unless the compiler targets AVX-512) and the scalar helpers both include
SOURCES = tuple(Path(__file__).with_name(n) for n in ("native_cpu.c", "native_avx512.c", "native_avx512_axis0.c",
                                                       "native_avx512_bf16.c",
                                                       "native_avx512_gemm.c", "native_avx512_gemm4.c",
                                                       "native_avx512_decode.c", "native_gguf.c"))
SOURCES += (Path(__file__).with_name("native_affine.c"),)  # affine (GPTQ / AWQ / compressed-tensors) GEMV
HEADERS = tuple(Path(__file__).with_name(n) for n in ("native_common.h", "native_avx512.h", "native_avx512_gemm.h"))
SOURCES += tuple(Path(__file__).with_name(n) for n in ("native_gguf_avx512.c", "native_gguf_bf16.c"))  # GGUF
HEADERS += (Path(__file__).with_name("native_gguf.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")

_c_i64, _c_int, _c_float, _c_ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
#: the fp32 kernels (AVX2 fxq_*, AVX-512 fxq512_*): every one takes ``round_x`` before the thread count
#: (x rounded to bf16 in C first: the compute_dtype policy, :func:`fxquant.ops._cpu.numerics`)
_LUT4_ARGS = (_c_ptr, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_int, _c_ptr, _c_ptr, _c_ptr,
              _c_float, _c_i64, _c_ptr, _c_i64)  # xh, xl, M, C, codes, .., y, ldy
_FPX_ARGS = (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_int, _c_ptr, _c_ptr, _c_float, _c_ptr, _c_i64)
_SIGNATURES = {
    "fxq_int8_gemv": (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq_int4t_gemv": (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_i64, _c_i64,
                       _c_i64, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_float, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq_lut4_gemv": _LUT4_ARGS + (_c_int, _c_int),
    "fxq_fpx_gemv": _FPX_ARGS + (_c_int, _c_int),
    "fxq_onebit_gemv": (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq_int8_to_bf16": (_c_ptr, _c_i64, _c_ptr, _c_int),
    # GGUF block types (native_gguf.c; wrappers in native_gguf.py): type, x, M, K, blocks, row_bytes, N, y, ldy,
    # round_x, threads / type, blocks, rows, row_bytes, out, ld, out dtype, threads
    "fxq_gguf_gemv": (_c_int, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq_gguf_dequant": (_c_int, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_int, _c_int),
}

# VPTQ (native_vptq.c; wrappers in native_vptq.py): x, M, K, indices, G, R, W, gs, o, ib, tb, cent, C, res | NULL, CR,
# v, outlier idx | NULL, outlier cent | NULL, vo, N, y, ldy, threads / the same layout args, scale | NULL, n0, n1, out,
# ld, out dtype, threads
SOURCES += (Path(__file__).with_name("native_vptq.c"),)
_VPTQ_LAYOUT = (_c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, _c_int, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_i64,
                _c_ptr, _c_ptr, _c_i64, _c_i64)
_SIGNATURES["fxq_vptq_gemv"] = (_c_ptr, _c_i64, _c_i64) + _VPTQ_LAYOUT + (_c_ptr, _c_i64, _c_int)
_SIGNATURES["fxq_vptq_decode"] = _VPTQ_LAYOUT + (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_int, _c_int)

# affine (native_affine.c; wrapper in native_affine.py): x, M, K, qweight, words, bits, N, group_size, scale fp32,
# zero u8 | NULL, mid, y, ldy, round_x, threads
_SIGNATURES["fxq_affine_gemv"] = (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_int, _c_i64, _c_i64, _c_ptr, _c_ptr,
                                  _c_float, _c_ptr, _c_i64, _c_int, _c_int)

# AQLM (native_aqlm.c; wrappers in native_aqlm.py): x, M, KP, codes, code bytes, nbits, O, G, NC, codebooks, og, ig,
# scales, N, y, ldy, round_x, threads / codes, code bytes, nbits, O, G, NC, codebooks, og, ig, scales, o0, o1, out,
# ld, out dtype, threads
SOURCES += (Path(__file__).with_name("native_aqlm.c"),)
_SIGNATURES["fxq_aqlm_lut_gemv"] = (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_int, _c_int, _c_i64, _c_i64, _c_i64, _c_ptr,
                                    _c_i64, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_int, _c_int)
_SIGNATURES["fxq_aqlm_decode"] = (_c_ptr, _c_int, _c_int, _c_i64, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr,
                                  _c_i64, _c_i64, _c_ptr, _c_i64, _c_int, _c_int)

#: AVX-512 kernels with no AVX2 twin (None in the AVX2 set)
_AVX512_SIGNATURES = {
    "fxq512_int4t_axis0_gemv": (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_i64,
                                _c_i64, _c_ptr, _c_ptr, _c_i64, _c_float, _c_ptr, _c_i64, _c_ptr, _c_int, _c_int,
                                _c_int),
}

#: AVX-512 kernels with no AVX2 twin, bound only where the CPU has AVX512-BF16 and VBMI
_BF16DOT_SIGNATURES = {
    "fxq512_int4t_bf16_gemv": (_c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_i64,
                               _c_float, _c_ptr, _c_i64, _c_int),
    "fxq512_int4t_bf16_gemv_x": (_c_ptr, _c_int, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64,
                                 _c_i64, _c_float, _c_ptr, _c_int, _c_i64, _c_int),
    "fxq512_lut4_bf16_gemv": _LUT4_ARGS + (_c_int,),
    "fxq512_lut4_bf16_gemv_x": (_c_ptr, _c_int) + _LUT4_ARGS[2:] + (_c_int,),
    "fxq512_fpx3_bf16_gemv": _FPX_ARGS + (_c_int,),
    "fxq512_int8_bf16_gemm": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq512_int4t_bf16_gemm": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_i64,
                               _c_float, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq512_bf16_gemm": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_int, _c_int),
    "fxq512_lut4_bf16_gemm": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_i64, _c_ptr, _c_ptr, _c_int, _c_ptr, _c_i64,
                              _c_int, _c_int),
    # weight decoders to bf16 (native_avx512_decode.c): int4 tiles -> W.T (w, K, n0, n1, gs, scale, zero, sz_row,
    # sz_grp, n_sz, mid, out, ldo, threads); 4-bit table codes -> W (codes, K, n0, n1, table, scale, shift, out, ldo,
    # threads)
    "fxq512_int4t_to_bf16t": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_i64, _c_float,
                              _c_ptr, _c_i64, _c_int),
    "fxq512_lut4_to_bf16": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_int, _c_ptr, _c_i64, _c_int),
    # affine rows (qweight, words, K, n0, n1, bits, gs, scale fp32, zero u8 | NULL, G, out, ldo, out_bf16, threads)
    "fxq512_affine_to_rows": (_c_ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, _c_i64, _c_ptr, _c_ptr, _c_i64, _c_ptr,
                              _c_i64, _c_int, _c_int),
    # GGUF bf16 dot-product GEMV (native_gguf_bf16.c): type, x bf16, M, K, blocks, row_bytes, N, y, ldy, threads
    "fxq512_gguf_bf16_gemv": (_c_int, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_i64, _c_int),
}
#: the kernels' status codes (native_common.h): FXQ_ENOMEM, FXQ_EARG
_ENOMEM, _EARG = -1, -2
#: the build flags of the fault-injection library (tests only; see native_common.h): -O1 after -O3,
#: since it is built once per source version for tests that run small shapes (measured here: 3.4 s
#: at -O1, 24 s at -O3, on the loaded 2-core machine)
FAULT_FLAGS = ("-DFXQ_FAULT_INJECT", "-O1")

_status = "not loaded yet"


def _cache_dir() -> Path:
    if os.environ.get("FXQUANT_CACHE_DIR"):
        return Path(os.environ["FXQUANT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxquant"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _build(extra_flags: tuple[str, ...] = ()) -> Path:
    cc = _compiler()
    flags = (*FLAGS, *extra_flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_id()]).encode())
    return build_cached(f"fxquant_native_{key.hexdigest()[:16]}.so", [cc, *flags, *map(str, SOURCES)])


def build_cached(name: str, command: list[str]) -> Path:
    """The library ``name`` in the cache directory, built by ``command + ["-o", path]`` unless it is
    there (``name`` carries the hash of everything the build depends on)."""
    out_dir = _cache_dir()
    if (out_dir / name).exists():
        return out_dir / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    except OSError:  # read-only or unusable cache directory: build into a private temp directory
        out_dir = Path(tempfile.gettempdir()) / f"fxquant-{os.getuid()}"
        if (out_dir / name).exists():
            return out_dir / name
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    lib = out_dir / name
    os.close(fd)
    try:
        proc = subprocess.run([*command, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {proc.stderr.strip()[:2000]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded shared library, or None (reason in :func:`status`)."""
    global _status
    if os.environ.get("FXQUANT_NATIVE", "1") == "0":
        _status = "disabled by FXQUANT_NATIVE=0"
        return None
    if platform.system() != "Linux":
        _status = f"not built on {platform.system()} (Linux only)"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"build failed: {e}"
        warnings.warn(f"fxquant native CPU kernels unavailable ({_status}); using the ATen paths",
                      stacklevel=4)
        return None
    if not lib.fxq_simd():
        _status = "this CPU has no AVX2 + FMA"
        return None
    _status = "loaded"
    return lib


def isas() -> tuple[str, ...]:
    """Instruction sets whose kernels run here, widest first: ``("avx512", "avx2")`` when the
    compiler targets AVX-512 F/BW/VL/DQ on this CPU, ``("avx2",)``, or ``()`` when unavailable."""
    lib = _library()
    if lib is None:
        return ()
    return ("avx512", "avx2") if lib.fxq_avx512() else ("avx2",)


@functools.lru_cache(maxsize=None)
def kernels(isa: str) -> types.SimpleNamespace:
    """The kernels of one instruction set of :func:`isas` (attributes named as in the C source)."""
    if isa not in isas():
        raise ValueError(f"native kernels for {isa!r} do not run here; available: {list(isas())}")
    return _bind(_library(), isa)


def _bind(lib: ctypes.CDLL, isa: str) -> types.SimpleNamespace:
    """``lib``'s kernels of ``isa`` as attributes named as in the C source (every one returns an int
    status), None for kernels this CPU or instruction set lacks."""
    ns = types.SimpleNamespace(isa=isa)
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name.replace("fxq_", "fxq512_") if isa == "avx512" else name)
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
        setattr(ns, name, fn)
    for name, argtypes in _AVX512_SIGNATURES.items():
        fn = None
        if isa == "avx512":
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
        setattr(ns, name, fn)
    # kernels of one instruction set only (None elsewhere): bf16 dot products need AVX512-BF16
    for name, argtypes in _BF16DOT_SIGNATURES.items():
        fn = None
        if isa == "avx512" and lib.fxq512_bf16dot():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
        setattr(ns, name, fn)
    return ns


@functools.lru_cache(maxsize=None)
def fault_injection_kernels(isa: str) -> types.SimpleNamespace:
    """Tests only: the kernels of ``isa`` from a separate build with :data:`FAULT_FLAGS`, plus
    ``fail_alloc(n)`` (the n-th allocation request of any kernel from now fails; 0 disarms) and
    ``fail_alloc_pending()`` (requests left before it; 0 once it fired).  Production builds have
    neither the hook nor its check."""
    if isa not in isas():
        raise ValueError(f"native kernels for {isa!r} do not run here; available: {list(isas())}")
    lib = ctypes.CDLL(str(_build(FAULT_FLAGS)))
    ns = _bind(lib, isa)
    ns.fail_alloc, ns.fail_alloc_pending = lib.fxq_fail_alloc, lib.fxq_fail_alloc_pending
    ns.fail_alloc.argtypes, ns.fail_alloc.restype = [ctypes.c_int], None
    ns.fail_alloc_pending.argtypes, ns.fail_alloc_pending.restype = [], ctypes.c_int
    return ns


def _raise(status: int, fn, **sizes) -> None:
    """A kernel's non-zero status as an exception naming the C kernel and the sizes it was given."""
    what = ", ".join(f"{k}={v}" for k, v in sizes.items())
    if status == _ENOMEM:
        raise MemoryError(f"native kernel {fn.__name__}: allocation failed ({what}); nothing was computed")
    raise ValueError(f"native kernel {fn.__name__}: status {status} for {what} (a layout it does not compute)")


@functools.lru_cache(maxsize=None)
def _lib() -> types.SimpleNamespace | None:
    """The kernels the ops use: the widest of :func:`isas`, or AVX2 with ``FXQUANT_NATIVE_ISA=avx2``
    (read once per process: every op call asks)."""
    here = isas()
    if not here:
        return None
    return kernels("avx2" if os.environ.get("FXQUANT_NATIVE_ISA", "").lower() == "avx2" else here[0])


def available() -> bool:
    """True when the kernels are built and this CPU runs them."""
    return _lib() is not None


def isa() -> str | None:
    """The instruction set of the kernels the ops use (see :func:`_lib`), or None when unavailable."""
    lib = _lib()
    return None if lib is None else lib.isa


def has_bf16_dot() -> bool:
    """Whether the kernels the ops use include the bf16 dot-product ones (AVX512-BF16 + VBMI)."""
    lib = _lib()
    return lib is not None and lib.fxq512_int4t_bf16_gemv is not None


def has_bf16_gemm() -> bool:
    """Whether the kernels the ops use include the bf16-weight GEMM (:func:`native_cpu.bf16_gemm`, AVX512-BF16)."""
    lib = _lib()
    return lib is not None and lib.fxq512_bf16_gemm is not None


def status() -> str:
    """Why :func:`available` is what it is (``"loaded"`` when it is True)."""
    _library()
    return _status
