"""Native CPU GEMV kernels for small M (``native_cpu.c``: AVX2 + FMA; ``native_avx512.c``: AVX-512),
built on first use and loaded with ctypes.

Why: at M = 1 a weight-only linear is a stream over the weight bytes, and the ATen kernels stop
short of that (measured, 11008x4096, 2 threads, AVX2: ``_weight_int4pack_mm_for_cpu`` reaches
~6.5 GB/s, compute-bound) or do not exist for a format (NF4/FP4, fpX, OneBit).  These kernels read
each format's stored bytes in place, decode in registers and accumulate in fp32.

Instruction sets: both files are compiled into one library; the AVX-512 variants (``fxq512_*``, same
arguments) exist only when the compiler targets AVX-512 F/BW/VL/DQ (``-march=native`` on such a CPU)
and are used when present.  ``FXQUANT_NATIVE_ISA=avx2`` forces the AVX2 kernels (A/B runs, tests);
:func:`isas` lists what the library holds and :func:`kernels` binds one set explicitly.

Build: ``cc -O3 -march=native -fopenmp -shared`` into a cache directory (``$FXQUANT_CACHE_DIR``,
else ``$XDG_CACHE_HOME/fxquant`` or ``~/.cache/fxquant``; a private directory under the system temp
dir when that one is not writable), keyed by the sources, the flags, the compiler and this CPU, so
a later process loads it in milliseconds.  OpenMP resolves to the
``libgomp.so.1`` torch has already loaded: one thread pool for both.  The build and loading live in
:mod:`fxquant.kernels.native_build`; this module holds the per-format wrappers and re-exports the
build's public names (and ``_lib``, ``_raise``), so ``native_cpu.X`` works for each.

When the build fails (no compiler), the CPU has no AVX2/FMA, or ``FXQUANT_NATIVE=0`` is set,
:func:`available` is False and every op keeps its ATen path; the reason is in :func:`status`.
Each wrapper returns fp32 ``[M, N]``, or ``None`` when its layout preconditions do not hold (a
kernel that does not apply), and raises ``ValueError`` when ``x``'s K does not match the stored
weight (a kernel would read past the codes or compute garbage).  Every kernel returns a status: a failed allocation (nothing written) raises ``MemoryError`` naming the
kernel and the sizes, never a result left unwritten.  :func:`fault_injection_kernels` builds the
library with ``-DFXQ_FAULT_INJECT`` (tests only), whose ``fail_alloc(n)`` makes the n-th allocation
from then on fail.
"""
from __future__ import annotations

import threading

import torch

from ..formats import int4 as int4_fmt
from ..formats.intx import SHARDS
from . import native_build
# re-exported (the ops, the other native_* modules, tools and tests use them as native_cpu.X); patch
# native_build's own names (e.g. native_build._lib), which every caller reads at call time
from .native_build import (FAULT_FLAGS, FLAGS, HEADERS, SOURCES, _raise, available,  # noqa: F401
                           fault_injection_kernels, has_bf16_dot, has_bf16_gemm, isa, isas, kernels, status)


def _lib():
    """The kernels the ops use (:func:`native_build._lib`, None when unavailable), looked up on
    :mod:`native_build` at every call so that a patch of ``native_build._lib`` reaches every wrapper."""
    return native_build._lib()


def _ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a ``c_void_p`` argument (a plain int: no ctypes object per argument)."""
    return None if t is None else t.data_ptr()


def _refuse(wrapper: str, message: str) -> None:
    raise ValueError(f"native_cpu.{wrapper}: {message}")


def _fp32_rows(x2: torch.Tensor) -> torch.Tensor:
    return x2.to(torch.float32).contiguous()


def _round_in_c(x2: torch.Tensor, round_x: bool) -> int:
    """The ``round_x`` argument of an fp32 kernel: 1 when x's values are to be rounded to bf16 and are
    not bf16 already (the wrappers' ``round_x``: the compute_dtype policy of the op's call)."""
    return int(round_x and x2.dtype != torch.bfloat16)


def _out(m: int, n: int) -> torch.Tensor:
    return torch.empty(m, n, dtype=torch.float32)


def int8_gemv(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
              round_x: bool = False) -> torch.Tensor | None:
    """int8wo: ``x2 [M, K]``, ``qweight`` int8 ``[N, K]``, ``scale`` bf16 ``[N]`` -> fp32 ``[M, N]``
    (fp32 products and sums; ``round_x``: x rounded to bf16 first, in the kernel)."""
    n, k = qweight.shape
    if x2.shape[1] != k or qweight.dtype != torch.int8 or scale.shape != (n,):
        _refuse("int8_gemv", f"x2 {tuple(x2.shape)}, qweight {qweight.dtype} {tuple(qweight.shape)} and scale "
                             f"{tuple(scale.shape)} do not fit x2 [M, K], int8 [N, K], [N]")
    lib = _lib()
    if lib is None or scale.dtype != torch.bfloat16:
        return None
    x, w, s = _fp32_rows(x2), qweight.contiguous(), scale.contiguous()
    y = _out(x.shape[0], n)
    st = lib.fxq_int8_gemv(_ptr(x), x.shape[0], k, _ptr(w), _ptr(s), n, _ptr(y), n, _round_in_c(x2, round_x),
                           torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_int8_gemv, M=x.shape[0], K=k, N=n)
    return y


def int4_tiled_gemv(x2: torch.Tensor, qweight: torch.Tensor, *, block_n: int, group_size: int,
                    scale: torch.Tensor, zero: torch.Tensor | None, out_features: int,
                    mid: float = 8.0, plane_bits: int = 4, bf16_out: bool = False,
                    round_x: bool = False) -> torch.Tensor | None:
    """b-bit codes in int4pack's tile order, ``W = (q - mid) * s + z`` per group of ``group_size``
    columns.  ``plane_bits`` 4: ``qweight`` uint8 ``[Np, K/2]``, the tiled nibble-pair bytes, read in
    place.  1..3: ``qweight`` is the flat plane of :mod:`fxquant.formats.intx` (its shards of 2 and/or
    1 bits, ``Np * K * plane_bits / 8`` bytes) and ``x2.shape[1]`` gives K.  ``scale`` / ``zero`` are
    bf16 views indexed ``[group, row]`` with the same strides (int4wo passes ``scales_and_zeros[..., 0]``
    and ``[..., 1]``).  -> fp32 ``[M, out_features]``; bf16 with ``bf16_out`` where the bf16
    dot-product kernel runs (it converts x and y itself), else still fp32.  ``round_x``: x's values
    are to be rounded to bf16 (done in the kernel); the bf16 dot-product kernel runs on bf16 values
    only (bf16 x, or ``round_x``), the fp32 one otherwise: products exact either way."""
    lib = _lib()
    k = x2.shape[1]
    _check_tiles("int4_tiled_gemv", qweight, plane_bits, k, out_features)
    if k % group_size or scale.shape[0] != k // group_size or scale.shape[1] < out_features:
        _refuse("int4_tiled_gemv", f"scale {tuple(scale.shape)} is not [K/group_size, >= N] for K={k}, "
                                   f"group_size={group_size}, N={out_features}")
    if lib is None or block_n % 32 or k % 2 or not _tile_scales_ok(scale, zero):
        return None
    w = qweight.contiguous()
    (p0, w0, c0), (p1, w1, c1) = _plane_shards(w, plane_bits)
    sg, sr = scale.stride()
    if ((round_x or x2.dtype == torch.bfloat16) and plane_bits == 4 and block_n == 64 and group_size % 2 == 0
            and lib.fxq512_int4t_bf16_gemv is not None):
        # bf16 dot products on bf16 values (fp32 x rounded to bf16 in the kernel): exact products,
        # so only the fp32 summation order differs from the reference on the same values
        x = (x2 if x2.dtype in (torch.bfloat16, torch.float32) else x2.float()).contiguous()
        y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16 if bf16_out else torch.float32)
        st = lib.fxq512_int4t_bf16_gemv_x(_ptr(x), int(x.dtype == torch.bfloat16), x.shape[0], k, _ptr(w),
                                          out_features, group_size, _ptr(scale), _ptr(zero), sr, sg, float(mid),
                                          _ptr(y), int(bf16_out), out_features, torch.get_num_threads())
        if st:
            _raise(st, lib.fxq512_int4t_bf16_gemv_x, M=x.shape[0], K=k, N=out_features, group_size=group_size)
        return y
    x = _fp32_rows(x2)
    y = _out(x.shape[0], out_features)
    st = lib.fxq_int4t_gemv(_ptr(x), x.shape[0], k, _ptr(p0), w0, c0, _ptr(p1), w1, c1, out_features, block_n,
                            group_size, _ptr(scale), _ptr(zero), sr, sg, float(mid), _ptr(y), out_features,
                            _round_in_c(x2, round_x), torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_int4t_gemv, M=x.shape[0], K=k, N=out_features, group_size=group_size)
    return y


def _tile_scales_ok(scale: torch.Tensor, zero: torch.Tensor | None) -> bool:
    """Whether the tile kernels read these group scales / zeros: bf16 views indexed ``[group, row]``,
    the zeros (if any) at the scales' strides."""
    return scale.dtype == torch.bfloat16 and (
        zero is None or (zero.dtype == torch.bfloat16 and zero.stride() == scale.stride()))


def _check_tiles(wrapper: str, qweight: torch.Tensor, plane_bits: int, k: int, out_features: int) -> None:
    """Refuse a plane that is not the ``plane_bits`` bits of ``Np x K`` tiled codes (``Np`` =
    ``out_features`` rounded up to 64): an ``x`` whose K is not the weight's would make the tile
    kernels read every row at the wrong offsets."""
    want = int4_fmt.padded_rows(out_features) * k * plane_bits // 8
    if qweight.dtype != torch.uint8 or qweight.numel() != want:
        _refuse(wrapper, f"qweight ({qweight.dtype}, {qweight.numel()} bytes) is not the {plane_bits}-bit plane of "
                         f"{int4_fmt.padded_rows(out_features)} x {k} codes ({want} bytes): x2 has K={k} columns, "
                         f"out_features={out_features}")


def _plane_shards(w: torch.Tensor, plane_bits: int):
    """A stored plane (checked by :func:`_check_tiles`) -> its (bytes, shard width, shard bytes) for
    the first and second shard (``(None, 0, 1)`` when there is one), as the tiled kernels take them."""
    if plane_bits == 4:
        return (w, 4, w.numel()), (None, 0, 1)
    length = w.numel() * 8 // plane_bits  # codes in the plane = Np * K
    shards, start = [], 0
    for sw in SHARDS[plane_bits]:
        nbytes = length * sw // 8
        shards.append((w[start:start + nbytes], sw, nbytes))
        start += nbytes
    return shards[0], (shards[1] if len(shards) > 1 else (None, 0, 1))


def int4_tiled_axis0_gemv(x2: torch.Tensor, qweight: torch.Tensor, *, block_n: int, scale: torch.Tensor,
                          zero: torch.Tensor | None, out_features: int, mid: float = 8.0,
                          plane_bits: int = 4, round_x: bool = False, exact: bool = False) -> torch.Tensor | None:
    """b-bit codes in int4pack's tile order (planes as :func:`int4_tiled_gemv`) grouped along axis 0:
    ``W[n, k] = (q - mid) * scale[n % R, k] + zero[n % R, k]``, ``scale`` / ``zero`` bf16 ``[R, K]``
    with ``R = out_features / group_size`` -> fp32 ``[M, out_features]`` (AVX-512 only; fp32 activations
    and sums, or with AVX512-BF16, 64-row tiles, even K and not ``exact``, ``scale * x`` rounded to
    bf16 and exact products summed in fp32).  ``round_x``: x rounded to bf16 first (in the kernel)."""
    lib = _lib()
    k = x2.shape[1]
    _check_tiles("int4_tiled_axis0_gemv", qweight, plane_bits, k, out_features)
    if scale.dim() != 2 or scale.shape[1] != k or (zero is not None and zero.shape != scale.shape):
        _refuse("int4_tiled_axis0_gemv", f"scale {tuple(scale.shape)} / zero is not [R, K] for K={k}")
    # sub-4-bit planes: 16-byte loads must not straddle a shard chunk (Np * K * w / 8 bytes), so K even
    if (lib is None or lib.fxq512_int4t_axis0_gemv is None or block_n % 32 or scale.dtype != torch.bfloat16
            or (plane_bits < 4 and k % 2) or (zero is not None and zero.dtype != torch.bfloat16)):
        return None
    w = qweight.contiguous()
    (p0, w0, c0), (p1, w1, c1) = _plane_shards(w, plane_bits)
    x, s = _fp32_rows(x2), scale.contiguous()
    z = None if zero is None else zero.contiguous()
    y = _out(x.shape[0], out_features)
    r = s.shape[0]
    ws = _workspace(k * (r + block_n) + r)
    st = lib.fxq512_int4t_axis0_gemv(_ptr(x), x.shape[0], k, _ptr(p0), w0, c0, _ptr(p1), w1, c1, out_features,
                                     block_n, _ptr(s), _ptr(z), r, float(mid), _ptr(y), out_features, _ptr(ws),
                                     _round_in_c(x2, round_x), int(exact), torch.get_num_threads())
    if st:
        _raise(st, lib.fxq512_int4t_axis0_gemv, M=x.shape[0], K=k, N=out_features)
    return y


_WORKSPACE = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A per-thread fp32 scratch buffer of at least ``numel`` elements, kept between calls (grows to
    the largest layer's need: K * (N/g + 64) + N/g floats for axis-0 intx, 2.4 MB at 11008x4096 g128)."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE.buf = torch.empty(max(numel, 1), dtype=torch.float32)
    return buf


def int8_decoder(qweight: torch.Tensor):
    """A block decoder (:mod:`fxquant.ops._dequant_gemm`) of int8 ``[N, K]`` codes into bf16 rows
    (the codes themselves, exact; the row scale stays on the output), or None without the native
    kernels."""
    lib = _lib()
    if lib is None or lib.fxq_int8_to_bf16 is None or qweight.dtype != torch.int8 or qweight.dim() != 2:
        return None
    w = qweight.contiguous()
    k = w.shape[1]

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        if out.dtype != torch.bfloat16 or not out.is_contiguous() or out.shape != (r1 - r0, k):
            raise ValueError(f"int8_decoder: out must be contiguous bf16 [{r1 - r0}, {k}]")
        st = lib.fxq_int8_to_bf16(_ptr(w) + r0 * k, (r1 - r0) * k, _ptr(out), torch.get_num_threads())
        if st:
            _raise(st, lib.fxq_int8_to_bf16, rows=r1 - r0, K=k)
    return decode


#: Rows of x per call of the large-M GEMMs: x.T of that many rows (2 MB at K = 4096) stays in L2/L3
#: while every weight panel passes over it; each further chunk decodes the weight again.
GEMM_ROWS = 256
#: The ``io`` flags of the large-M GEMMs (``GM_OUT_BF16`` / ``GM_X_FP32`` / ``GM_EXACT`` in native_avx512_gemm.c).
_GEMM_OUT_BF16, _GEMM_X_FP32, _GEMM_EXACT = 1, 2, 4


def _gemm_rows(x2: torch.Tensor, n: int, fn, run, flags: int = 0, fp32_out: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, N]`` from ``run(x_ptr, rows, lda, y_ptr, ldc, io)`` (a call of kernel ``fn``, returning its
    status) over chunks of :data:`GEMM_ROWS` rows of
    ``x2``: fp32 rows go in as they are and are rounded to bf16 while the kernel packs them
    (``_GEMM_X_FP32``), other dtypes are cast to bf16 first; the result is fp32 when ``x2`` is fp32
    or ``fp32_out`` (written by the kernel: converting a bf16 result costs ~3 ms at 256x11008), else
    bf16 (``_GEMM_OUT_BF16``), written into ``out`` when given (unit column stride, any row stride)."""
    fp32 = x2.dtype == torch.float32
    x = x2 if fp32 else x2.to(torch.bfloat16)
    if x.stride(-1) != 1 or (not fp32 and x.stride(0) % 2):
        x = x.contiguous()
    out32 = fp32 or fp32_out
    io = (_GEMM_X_FP32 if fp32 else 0) | (0 if out32 else _GEMM_OUT_BF16) | flags
    y = torch.empty(x.shape[0], n, dtype=torch.float32 if out32 else torch.bfloat16) if out is None else out
    for r0 in range(0, x.shape[0], GEMM_ROWS):
        r1 = min(x.shape[0], r0 + GEMM_ROWS)
        st = run(_ptr(x) + x.element_size() * r0 * x.stride(0), r1 - r0, x.stride(0),
                 _ptr(y) + y.element_size() * r0 * y.stride(0), y.stride(0), io)
        if st:
            _raise(st, fn, M=r1 - r0, K=x.shape[1], N=n)
    return y


def int8_gemm(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, *,
              fp32_out: bool = False) -> torch.Tensor | None:
    """int8wo at large M (AVX512-BF16): ``x2 [M, K]`` -> ``[M, N]`` ``= (x2 @ q.T) * scale``
    with bf16 activations (fp32 ones rounded in the kernel, others cast), exact products and fp32
    accumulation; fp32 for fp32 ``x2`` or ``fp32_out``, else bf16; None where the kernel does not
    apply (no AVX512-BF16, odd K)."""
    lib = _lib()
    n, k = qweight.shape
    if x2.shape[1] != k or qweight.dtype != torch.int8:
        _refuse("int8_gemm", f"x2 {tuple(x2.shape)} and qweight {qweight.dtype} {tuple(qweight.shape)} do not fit "
                             "x2 [M, K], int8 [N, K]")
    if lib is None or lib.fxq512_int8_bf16_gemm is None or k % 2:
        return None
    w, rs, nt = qweight.contiguous(), scale.to(torch.float32).contiguous(), torch.get_num_threads()
    return _gemm_rows(x2, n, lib.fxq512_int8_bf16_gemm, lambda xp, rows, lda, yp, ldc, io: lib.fxq512_int8_bf16_gemm(
        xp, rows, k, lda, _ptr(w), n, _ptr(rs), yp, ldc, io, nt), fp32_out=fp32_out)


def bf16_gemm(x2: torch.Tensor, w: torch.Tensor, rs: torch.Tensor | None = None, *,
              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``(x2 @ w.T) * rs`` -> fp32 ``[M, N]`` (into ``out`` when given: fp32, unit column stride) for a
    bf16 weight ``w [N, K]`` (unit column stride, K even; AVX512-BF16): x2's values as bf16 (fp32 x
    rounded in the kernel), exact products, fp32 sums and result, ``rs`` fp32 ``[N]`` (None: 1) applied
    in fp32.  For weights whose values are bf16 numbers (float8, fpX) and bf16-valued x this is the
    fp32 reference up to the summation order: the blocked dequantize paths' exact GEMM.  None where
    it does not apply."""
    lib = _lib()
    n, k = w.shape
    if (lib is None or lib.fxq512_bf16_gemm is None or k % 2 or w.dtype != torch.bfloat16 or w.stride(1) != 1
            or (out is not None and (out.dtype != torch.float32 or out.stride(1) != 1 or out.shape != (x2.shape[0], n)))):
        return None
    r = None if rs is None else rs.to(torch.float32).contiguous()
    nt = torch.get_num_threads()
    return _gemm_rows(x2, n, lib.fxq512_bf16_gemm, lambda xp, rows, lda, yp, ldc, io: lib.fxq512_bf16_gemm(
        xp, rows, k, lda, _ptr(w), w.stride(0), n, _ptr(r), yp, ldc, io, nt), fp32_out=True, out=out)


def int4_gemm(x2: torch.Tensor, qweight: torch.Tensor, *, block_n: int, group_size: int, scale: torch.Tensor,
              zero: torch.Tensor | None, out_features: int, mid: float = 8.0, exact: bool = True) -> torch.Tensor | None:
    """4-bit int4pack tiles at large M (AVX512-BF16): ``x2 [M, K]`` -> ``[M, N]`` ``= x2 @ W.T``
    with ``W = (q - mid) * s + z``, bf16 activations (fp32 ones rounded once, in the kernel), fp32
    accumulation, fp32 result for fp32 ``x2`` (else bf16).  ``exact``: the codes multiplied as exact
    bf16 integers per group and the group's scale and offset applied in fp32 (the GEMV's numerics:
    products exact, sums fp32); otherwise ``W`` rounded once to bf16 first.  None where it does not
    apply (no AVX512-BF16, tiles other than 64 rows, non-bf16 scale / zero, odd group size)."""
    n, k = out_features, x2.shape[1]
    _check_tiles("int4_gemm", qweight, 4, k, n)
    lib = _lib()
    if (lib is None or lib.fxq512_int4t_bf16_gemm is None or block_n != 64 or group_size % 2
            or not _tile_scales_ok(scale, zero)):
        return None
    if k == 0 or k % group_size:
        return None
    w = qweight.contiguous()
    sg, sr = scale.stride()
    nt = torch.get_num_threads()
    return _gemm_rows(x2, n, lib.fxq512_int4t_bf16_gemm, lambda xp, rows, lda, yp, ldc, io: lib.fxq512_int4t_bf16_gemm(
        xp, rows, k, lda, _ptr(w), n, group_size, _ptr(scale), _ptr(zero), sr, sg, float(mid), yp, ldc, io, nt),
        _GEMM_EXACT if exact else 0)


def lut4_gemm(x2: torch.Tensor, codes: torch.Tensor, *, rows: int, table: torch.Tensor, scale: torch.Tensor,
              piece: int) -> torch.Tensor | None:
    """4-bit table codes at large M (AVX512-BF16): ``x2 [M, K]`` -> ``[M, rows]`` ``= x2 @ W.T`` with
    ``W[n, k] = table[code] * scale[(n * K + k) // piece]`` (codes flat uint8, two per byte, the first in the
    high nibble, ``K / 2`` bytes per row; ``scale`` fp32 per piece), ``W`` rounded once to bf16, bf16
    activations (fp32 ones rounded in the kernel), fp32 sums; fp32 for fp32 ``x2``, else bf16.  None
    where it does not apply (no AVX512-BF16; ``piece`` not a power of two >= 32 dividing ``K``)."""
    n, k = rows, x2.shape[1]
    if codes.numel() < n * k // 2 or scale.numel() < n * k // max(piece, 1) or table.numel() != 16:
        _refuse("lut4_gemm", f"codes {codes.numel()} bytes, scale {scale.numel()} values, table {table.numel()} "
                             f"entries: not {n} rows of K={k} in pieces of {piece} and a 16-entry table")
    lib = _lib()
    if (lib is None or lib.fxq512_lut4_bf16_gemm is None or piece < 32 or piece & (piece - 1) or k % piece
            or scale.dtype != torch.float32):
        return None
    c, sc, t, nt = codes.contiguous(), scale.contiguous(), table.float().contiguous(), torch.get_num_threads()
    shift = piece.bit_length() - 1
    return _gemm_rows(x2, n, lib.fxq512_lut4_bf16_gemm, lambda xp, m, lda, yp, ldc, io: lib.fxq512_lut4_bf16_gemm(
        xp, m, k, lda, _ptr(c), n, _ptr(t), _ptr(sc), shift, yp, ldc, io, nt))


def lut4_gemv(xh: torch.Tensor, xl: torch.Tensor, codes: torch.Tensor, *, rows: int, row_bytes: int,
              table: torch.Tensor, block_bytes: int, scale: torch.Tensor,
              dq: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
              round_x: bool = False, table_to_bf16: bool = True) -> torch.Tensor | None:
    """4-bit table codes, two per byte: row ``n`` is ``codes[n * row_bytes : (n + 1) * row_bytes]``
    (``codes`` flat uint8); a byte's high nibble meets ``xh [M, row_bytes]``, its low nibble ``xl``.
    ``W = table[code] * scale[block]`` with blocks of ``block_bytes`` bytes numbered row-major;
    ``scale`` fp32 or bf16 per block, or with ``dq = (absmax_code, absmax_scale, absmax_offset,
    absmax_blocksize)`` uint8 indices into ``absmax_code`` (bitsandbytes double quant:
    ``absmax_code[q[b]] * absmax_scale[b // absmax_blocksize] + absmax_offset``).
    ``round_x``: x's values rounded to bf16 (in C).  -> fp32 ``[M, rows]``."""
    _check_lut4("lut4_gemv", xh.shape[1], codes, rows, row_bytes, block_bytes, scale)
    if xl.shape != xh.shape:
        _refuse("lut4_gemv", f"xh {tuple(xh.shape)} and xl {tuple(xl.shape)} differ")
    lib, args = _lib(), _lut4_args(codes, rows, row_bytes, table, block_bytes, scale, dq)
    if lib is None or args is None:
        return None
    # bf16 values of x: the bf16 dot-product kernel (the table in bf16: exact for fpX tables, within
    # 2^-9 for bitsandbytes' NF4 / FP4 values (FP4's are sixths), which ``table_to_bf16=False`` keeps
    # out; exact products, fp32 sums)
    fn = lib.fxq512_lut4_bf16_gemv if (round_x or xh.dtype == torch.bfloat16) and table_to_bf16 else None
    if fn is None:
        fn, extra = lib.fxq_lut4_gemv, (_round_in_c(xh, round_x),)
        xh, xl = _fp32_rows(xh), _fp32_rows(xl)
    else:
        xh, xl, extra = xh.to(torch.bfloat16).contiguous(), xl.to(torch.bfloat16).contiguous(), ()
    y = _out(xh.shape[0], rows)
    st = fn(_ptr(xh), _ptr(xl), xh.shape[0], row_bytes, *args[0], _ptr(y), rows, *extra, torch.get_num_threads())
    if st:
        _raise(st, fn, M=xh.shape[0], K=2 * row_bytes, N=rows, block_bytes=block_bytes)
    return y


def lut4_gemv_x(x2: torch.Tensor, codes: torch.Tensor, *, rows: int, row_bytes: int, table: torch.Tensor,
                block_bytes: int, scale: torch.Tensor,
                dq: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
                round_x: bool = False, table_to_bf16: bool = True) -> torch.Tensor | None:
    """:func:`lut4_gemv` with ``x2 [M, 2 * row_bytes]`` whole: even columns meet the high nibbles, odd
    ones the low nibbles (bitsandbytes' order).  With the bf16 dot-product kernel the split and the
    bf16 rounding happen in C (two strided torch conversions cost ~40 us per call); otherwise
    :func:`lut4_gemv` on the two strided halves."""
    if x2.shape[1] != 2 * row_bytes:
        _refuse("lut4_gemv_x", f"x2 has K={x2.shape[1]} columns but the codes hold {2 * row_bytes} per row")
    lib = _lib()
    fn = None if lib is None else lib.fxq512_lut4_bf16_gemv_x
    if (fn is None or not (round_x or x2.dtype == torch.bfloat16) or not table_to_bf16
            or x2.dtype not in (torch.bfloat16, torch.float32) or not x2.is_contiguous()):
        return lut4_gemv(x2[:, 0::2], x2[:, 1::2], codes, rows=rows, row_bytes=row_bytes, table=table,
                         block_bytes=block_bytes, scale=scale, dq=dq, round_x=round_x, table_to_bf16=table_to_bf16)
    args = _lut4_args(codes, rows, row_bytes, table, block_bytes, scale, dq)
    if args is None:
        return None
    y = _out(x2.shape[0], rows)
    st = fn(_ptr(x2), int(x2.dtype == torch.bfloat16), x2.shape[0], row_bytes, *args[0], _ptr(y), rows,
            torch.get_num_threads())
    if st:
        _raise(st, fn, M=x2.shape[0], K=2 * row_bytes, N=rows, block_bytes=block_bytes)
    return y


def _check_lut4(wrapper: str, x_cols: int, codes: torch.Tensor, rows: int, row_bytes: int, block_bytes: int,
                scale: torch.Tensor) -> None:
    """Refuse an ``x`` that is not ``row_bytes`` columns (per half) or codes / scales that do not hold
    ``rows`` rows of ``row_bytes`` bytes in blocks of ``block_bytes``."""
    blocks = rows * (row_bytes // block_bytes) if block_bytes > 0 and row_bytes % block_bytes == 0 else -1
    if x_cols != row_bytes or codes.numel() < rows * row_bytes or scale.numel() < blocks:
        _refuse(wrapper, f"x has {x_cols} columns per half, codes {codes.numel()} bytes, scale {scale.numel()} "
                         f"values: not {rows} rows of {row_bytes} bytes in blocks of {block_bytes}")


def _lut4_args(codes, rows, row_bytes, table, block_bytes, scale, dq):
    """The kernel arguments after x's (``codes`` .. ``dq_block``) and the tensors they point into
    (kept alive by the caller for the call), or None when the layout does not apply."""
    if block_bytes < 1 or row_bytes % block_bytes or table.numel() != 16:
        return None
    if dq is None and scale.dtype not in (torch.float32, torch.bfloat16):
        return None
    mode = 2 if dq is not None else (0 if scale.dtype == torch.float32 else 1)
    t, sc, c = table.float().contiguous(), scale.contiguous(), codes.contiguous()
    dq_code = dq_scale = None
    offset, dq_block = 0.0, 1
    if dq is not None:
        dq_code, dq_scale = dq[0].float().contiguous(), dq[1].float().contiguous()
        if dq_code.numel() < 256:  # the AVX-512 kernels hold all 256 entries a uint8 index reaches
            dq_code = torch.cat([dq_code, dq_code.new_zeros(256 - dq_code.numel())])
        offset, dq_block = float(dq[2]), int(dq[3])
    args = (_ptr(c), row_bytes, rows, _ptr(t), block_bytes, mode, _ptr(sc), _ptr(dq_code), _ptr(dq_scale), offset,
            dq_block)
    return args, (t, sc, c, dq_code, dq_scale)


def onebit_gemv(x2: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                round_x: bool = False) -> torch.Tensor | None:
    """OneBit: ``x2 [M, K]``, ``sign_bits`` uint8 ``[N, ceil(K/8)]``, ``a`` bf16 ``[N]``, ``b`` bf16
    ``[K]`` -> fp32 ``[M, N]`` = ``((x ⊙ b) · Sᵀ) ⊙ a``, ``x ⊙ b`` made in the kernel in fp32 (x
    rounded to bf16 first with ``round_x``: then exact)."""
    n, cb = sign_bits.shape
    if x2.shape[1] != b.shape[0] or cb != (b.shape[0] + 7) // 8 or a.shape != (n,):
        _refuse("onebit_gemv", f"x2 {tuple(x2.shape)}, sign_bits {tuple(sign_bits.shape)}, a {tuple(a.shape)}, "
                               f"b {tuple(b.shape)} do not fit x2 [M, K], [N, ceil(K/8)], [N], [K]")
    lib = _lib()
    if lib is None or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return None
    x = _fp32_rows(x2)
    bits, av, bv = sign_bits.contiguous(), a.contiguous(), b.contiguous()
    y = _out(x.shape[0], n)
    st = lib.fxq_onebit_gemv(_ptr(x), x.shape[0], x.shape[1], _ptr(bv), cb, _ptr(bits), n, _ptr(av), _ptr(y), n,
                             _round_in_c(x2, round_x), torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_onebit_gemv, M=x.shape[0], K=x.shape[1], N=n)
    return y


def integer_table(table: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """A table of at most 16 values -> (int8 ``[16]`` = table * 2^f, 2^-f) when every value is a
    small integer times one power of two (exact), else None."""
    for f in range(0, 24):
        scaled = table.double() * 2.0**f
        if torch.equal(scaled, scaled.round()):
            if scaled.abs().max() > 127:
                return None
            out = torch.zeros(16, dtype=torch.int8)
            out[: table.numel()] = scaled.to(torch.int8)
            return out, 2.0**-f
    return None


def fpx_gemv(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, table: torch.Tensor,
             bits: int, in_features: int, *, round_x: bool = False) -> torch.Tensor | None:
    """fpX, X = 3 or 4 (:mod:`fxquant.formats.fpx` planes, ``qweight`` uint8 ``[N, Kp * X / 8]`` for
    ``K = in_features``), ``table`` the format's fp32 decode table, ``scale`` bf16 ``[N]`` -> fp32
    ``[M, N]``; exact products (every fpX value is a bf16 number), fp32 sums; ``round_x``: x's values
    rounded to bf16."""
    n, row_bytes = qweight.shape
    kp = -(-in_features // 8) * 8
    if x2.shape[1] != in_features or row_bytes != kp * bits // 8:
        _refuse("fpx_gemv", f"x2 has K={x2.shape[1]} columns, qweight {tuple(qweight.shape)}: not in_features="
                            f"{in_features} of {bits}-bit codes ({kp * bits // 8} bytes per row)")
    lib = _lib()
    if lib is None or bits not in (3, 4) or scale.dtype != torch.bfloat16:
        return None
    exact = integer_table(table)
    if exact is None:
        return None
    # 3 bits on bf16 values (bf16 x, or round_x): the bf16 dot-product kernel
    fn = lib.fxq512_fpx3_bf16_gemv if bits == 3 and (round_x or x2.dtype == torch.bfloat16) else None
    x = x2.to(torch.bfloat16).contiguous() if fn is not None else _fp32_rows(x2)
    extra = () if fn is not None else (_round_in_c(x2, round_x),)
    if fn is None:
        fn = lib.fxq_fpx_gemv
    if x.shape[1] != kp:
        x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    w, s = qweight.contiguous(), scale.contiguous()
    y = _out(x.shape[0], n)
    st = fn(_ptr(x), x.shape[0], kp, _ptr(w), row_bytes, n, bits, _ptr(exact[0]), _ptr(s), exact[1], _ptr(y), n,
            *extra, torch.get_num_threads())
    if st:
        _raise(st, fn, M=x.shape[0], K=kp, N=n, bits=bits)
    return y
