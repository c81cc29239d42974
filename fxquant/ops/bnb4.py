"""``fxquant::linear_bnb4`` and ``fxquant::linear_bnb4_dq``: bitsandbytes NF4 / FP4 linears.

``y = x @ W.T + bias`` with ``W = code_table[q] * absmax[block]`` over the row-major flattened
weight (blocks may straddle rows); layout and math in :mod:`fxquant.formats.bnb4`.  One op per
storage shape: ``linear_bnb4`` takes the fp32 ``absmax``, ``linear_bnb4_dq`` the double-quantized
one (``absmax_q``, ``absmax_code``, ``absmax_scale``, ``absmax_offset``).  The code table is an
argument, so NF4 and FP4 (or any 16-entry table) share the ops.

CPU: PyTorch has no kernel that looks up a 16-entry table inside a matmul (the packed ATen kernels
``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` apply affine dequantization only; see
docs/formats/bnb4.md for what was measured), so the fast path is dequantize + dense GEMM done in
row chunks: each chunk of about ``CHUNK_ELEMENTS`` weights is decoded with one gather per code
*byte pair* (:func:`fxquant.formats.bnb4.dequantize_span`, bit-identical to the reference) into a
cache-sized buffer and multiplied at once, so the full dequantized weight never exists (in bf16
only where a bf16 output is allowed, :meth:`._cpu.Numerics.gemm_dtype`).  At M <= ``NATIVE_MAX_ROWS``
and even K the native GEMV (:func:`fxquant.kernels.native_cpu.lut4_gemv_x`) reads the codes in place
instead: blocks of whole rows as they are, blocks that straddle rows (``K % blocksize != 0``,
bitsandbytes' flat layout kept bit for bit) as pieces of ``gcd(K, blocksize) >= NATIVE_MIN_PIECE``
elements with a scale each (see :func:`_native`); on bf16 values its bf16 dot-product form, which
multiplies the table rounded to bf16 (NF4's values and FP4's, which are sixths, move by up to 2^-9,
so fp32-exact results take the fp32 form: :func:`table_in_bf16`).  From ``NATIVE_GEMM_MIN_ROWS`` rows,
where a bf16 GEMM computes the call (bf16 x, AVX512-BF16 without AMX), the native GEMM
(:func:`fxquant.kernels.native_cpu.lut4_gemm`) decodes panels of codes to bf16 inside its microkernel
calls instead of the chunked path (level with bf16 ``F.linear`` at M=512; see :func:`_native_gemm`).
CUDA: the Triton kernel in :mod:`fxquant.kernels.bnb4`.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

from ..formats import bnb4 as fmt
from ..kernels import native_cpu, native_decode
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

#: Weights decoded per chunk of the CPU path (scratch: 5 bytes per weight of a chunk, 7 with bf16
#: GEMMs).  Measured at M=1, 11008x4096, on the 2-core AVX2 EPYC shared with other jobs (load 5-7),
#: minimum of 12 runs: 1 thread 2^20: 113 ms, 2^21: 119, 2^22: 144; 2 threads 2^20: 584,
#: 2^21: 474, 2^22: 402.  Each chunk runs ~3 multi-threaded ops, and on a loaded machine every
#: multi-threaded op can wait a scheduler tick for its second thread: 2^21 is the compromise.
CHUNK_ELEMENTS = 1 << 21


def dequantize_weight(codes: torch.Tensor, absmax: torch.Tensor, code_table: torch.Tensor, blocksize: int,
                      out_features: int, in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[out_features, in_features]`` (the reference dequantization)."""
    return fmt.dequantize_4bit(codes, absmax, code_table, blocksize, (out_features, in_features))


def dequantize_weight_dq(codes: torch.Tensor, absmax_q: torch.Tensor, absmax_code: torch.Tensor,
                         absmax_scale: torch.Tensor, absmax_offset: torch.Tensor, code_table: torch.Tensor,
                         blocksize: int, absmax_blocksize: int, out_features: int,
                         in_features: int) -> torch.Tensor:
    """Double-quant buffers -> float32 ``[out_features, in_features]``."""
    absmax = fmt.double_dequantize(absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize)
    return fmt.dequantize_4bit(codes, absmax, code_table, blocksize, (out_features, in_features))


def _check_common(op: str, x: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor,
                  code_table: torch.Tensor, blocksize: int, out_features: int, in_features: int) -> int:
    """What both ops check: sizes, ``codes``, ``code_table``, ``x``, ``bias`` -> number of blocks."""
    if blocksize not in fmt.BLOCKSIZES:
        v.fail(op, f"blocksize={blocksize!r} is not supported; valid: {', '.join(map(str, fmt.BLOCKSIZES))}")
    v.size(op, "out_features", out_features)
    v.size(op, "in_features", in_features)
    numel = out_features * in_features
    v.stored(op, "codes", codes, torch.uint8, ((numel + 1) // 2,), "[ceil(N*K/2)]")
    v.stored(op, "code_table", code_table, torch.float32, (16,))
    v.activations(op, x, in_features)
    v.bias(op, bias, out_features)
    return -(-numel // blocksize)


def check(x: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor, absmax: torch.Tensor,
          code_table: torch.Tensor, blocksize: int, out_features: int, in_features: int) -> None:
    """``codes`` uint8 ``[ceil(N*K/2)]``, ``absmax`` fp32 ``[ceil(N*K/blocksize)]``, ``code_table``
    fp32 ``[16]``, ``x`` ``[..., in_features]``, ``bias`` ``[out_features]``."""
    op = "linear_bnb4"
    blocks = _check_common(op, x, bias, codes, code_table, blocksize, out_features, in_features)
    v.stored(op, "absmax", absmax, torch.float32, (blocks,), "[ceil(N*K/blocksize)]")


def check_dq(x: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor, absmax_q: torch.Tensor,
             absmax_code: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor,
             code_table: torch.Tensor, blocksize: int, absmax_blocksize: int, out_features: int,
             in_features: int) -> None:
    """As :func:`check`, the absmax double-quantized: ``absmax_q`` uint8 ``[blocks]``, ``absmax_code``
    fp32 ``[256]``, ``absmax_scale`` fp32 ``[ceil(blocks/absmax_blocksize)]``, ``absmax_offset`` fp32
    with one element."""
    op = "linear_bnb4_dq"
    blocks = _check_common(op, x, bias, codes, code_table, blocksize, out_features, in_features)
    if type(absmax_blocksize) is not int or absmax_blocksize < 1:
        v.fail(op, f"absmax_blocksize={absmax_blocksize!r} is not supported; valid: an integer >= 1")
    v.stored(op, "absmax_q", absmax_q, torch.uint8, (blocks,), "[ceil(N*K/blocksize)]")
    v.stored(op, "absmax_code", absmax_code, torch.float32, (256,))
    v.stored(op, "absmax_scale", absmax_scale, torch.float32, (-(-blocks // absmax_blocksize),),
             "[ceil(blocks/absmax_blocksize)]")
    v.stored_any(op, "absmax_offset", absmax_offset, (torch.float32,), ((), (1,)))


_WORKSPACE = threading.local()  # per-thread scratch buffers of the CPU path (10 MB per thread)


def _chunk_rows(k: int, blocksize: int) -> int:
    """Rows per chunk: whole blocks per chunk (so chunks start on a block), about CHUNK_ELEMENTS."""
    step = blocksize // math.gcd(k, blocksize)
    return step * max(1, CHUNK_ELEMENTS // (k * step))


def _chunked_linear(x2: torch.Tensor, codes: torch.Tensor, code_table: torch.Tensor, blocksize: int,
                    out_features: int, span_absmax: Callable[[int, int], torch.Tensor],
                    dt: torch.dtype) -> torch.Tensor:
    """``x2 @ W.T`` decoding ``W`` chunk by chunk, in ``dt`` -> ``[M, N]``.

    ``span_absmax(first_block, stop_block)`` gives the fp32 absmax of those blocks.  Scratch
    buffers are reused across chunks and calls: allocating them fresh costs more than the decode
    on the VM this was measured on (a fresh 1 MB tensor: up to 20 ms, the munmap waiting for the
    other vCPU)."""
    n, k = out_features, x2.shape[1]
    if n == 0 or k == 0:
        return x2.new_zeros((x2.shape[0], n), dtype=dt)
    ws = _WORKSPACE.__dict__.setdefault("buffers", {})
    xt = x2.to(dt).t()
    yt = torch.empty(n, x2.shape[0], dtype=dt)  # rows of y.T are contiguous: mm writes them in place
    rows = _chunk_rows(k, blocksize)
    piece = math.gcd(k, blocksize)
    flat = codes.reshape(-1)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        e0, e1 = r0 * k, r1 * k
        absmax = span_absmax(e0 // blocksize, -(-e1 // blocksize))
        if dt == torch.bfloat16:  # the native decoder (AVX512-BF16): the same bf16 values, at memory speed
            w = fmt.buffer(ws, "cast", (r1 - r0) * k, dt).view(r1 - r0, k)
            if native_decode.lut4_into(flat[e0 // 2:e1 // 2], k=k, r0=0, r1=r1 - r0, table=code_table,
                                       scale=_piece_scales(absmax.float(), blocksize, piece, r1 - r0, k), piece=piece,
                                       out=w):
                torch.mm(w, xt, out=yt[r0:r1])
                continue
        w = fmt.dequantize_span(codes, absmax, code_table, blocksize, e0, e1, workspace=ws).view(r1 - r0, k)
        if dt != torch.float32:
            w = fmt.buffer(ws, "cast", w.numel(), dt).view_as(w).copy_(w)
        torch.mm(w, xt, out=yt[r0:r1])
    return yt.t()


#: Largest M for the native GEMV.  Measured (11008x4096, nf4 bs64, 2 threads, AVX2, ms, through the
#: op, native / chunked decode + GEMM): M=1 3.8 / 68, M=8 25 / 105, M=16 50 / 72, M=32 100 / 104,
#: M=64 197 / 136.
NATIVE_MAX_ROWS = 16
#: Fewest rows for the native large-M GEMM (:func:`native_cpu.lut4_gemm`) where it applies (bf16 x, AVX512-BF16,
#: no AMX).  Measured (Zen 4, 2 threads, bf16 x, nf4, ms, GEMV / GEMM): 5632x2048 M=8 0.70 / 1.25, M=12
#: 1.42 / 1.22, M=16 1.80 / 1.19; 2048x2048 M=8 0.26 / 0.45, M=12 0.48 / 0.44.  At M=512 the GEMM is level
#: with bf16 F.linear (27.2 / 27.2 at 5632x2048; the chunked decode + GEMM it replaces: 38.7).
NATIVE_GEMM_MIN_ROWS = 11
#: Smallest piece (elements) of a block that straddles rows the native GEMV takes (K % blocksize != 0,
#: pieces of gcd(K, blocksize)): its 16-byte step.  Below it every piece would be a masked tail plus
#: a scale multiply; not measured (no quiet machine was available), those shapes keep the chunked path.
NATIVE_MIN_PIECE = 32


_TABLE_IN_BF16: dict[int, tuple[tuple, bool]] = {}  # id(table) -> ((data_ptr, version), exact in bf16)


def table_in_bf16(table: torch.Tensor) -> bool:
    """Whether every entry of ``table`` is a bf16 number (not NF4's or bitsandbytes' FP4), remembered per table
    tensor while it lives (the op asks on every call)."""
    return _cpu.memo_per_tensor(_TABLE_IN_BF16, table, _exact_in_bf16)


def _exact_in_bf16(table: torch.Tensor) -> bool:
    t = table.float()
    return bool(torch.equal(t.to(torch.bfloat16).float(), t))


def _piece_scales(absmax: torch.Tensor, blocksize: int, piece: int, out_features: int, k: int) -> torch.Tensor:
    """One scale per piece of ``piece`` elements (``gcd(K, blocksize)``: inside one block and one row) from
    the per-block ``absmax``: the block's value repeated ``blocksize / piece`` times (itself when equal)."""
    if piece == blocksize:
        return absmax
    return absmax.repeat_interleave(blocksize // piece)[: out_features * k // piece]


def _native(x2, codes, code_table, blocksize, out_features, in_features, scale, nm, dq=None, absmax=None):
    """The native GEMV when it applies (small M, rows starting on a byte: K even), else None.

    The kernel numbers blocks row by row, so blocks must not straddle rows.  When they do (bitsandbytes'
    flat blocks, ``K % blocksize != 0``), rows are cut into pieces of ``g = gcd(K, blocksize)``
    elements, each inside one block and one row, and the kernel gets one fp32 scale per piece: its
    block's absmax (``absmax()``, double quant decoded), repeated ``blocksize / g`` times (``N*K/g``
    floats per call, e.g. 9 per row at K = 576, blocksize 128: pieces of 64)."""
    k = in_features
    if x2.shape[0] > NATIVE_MAX_ROWS or k % 2:
        return None
    piece = math.gcd(k, blocksize)
    if piece != blocksize:
        if piece < NATIVE_MIN_PIECE:
            return None
        scale, dq = _piece_scales(absmax(), blocksize, piece, out_features, k), None
    bf16_table = not nm.exact or not nm.bf16_values(x2) or table_in_bf16(code_table)
    return native_cpu.lut4_gemv_x(x2, codes, rows=out_features, row_bytes=k // 2, table=code_table,
                                  block_bytes=piece // 2, scale=scale, dq=dq, round_x=nm.round_x,
                                  table_to_bf16=bf16_table)


def _native_gemm(x2, codes, code_table, blocksize, out_features, in_features, nm, absmax):
    """The native large-M GEMM (decode inside the GEMM, W rounded to bf16 once, as the chunked path's
    bf16 GEMM) when it applies: from :data:`NATIVE_GEMM_MIN_ROWS` rows, a bf16 GEMM allowed (:meth:`._cpu.Numerics.bf16_gemm`),
    AVX512-BF16 without AMX (there dequantize + oneDNN's AMX GEMM is faster: :func:`._cpu.amx`), pieces of
    ``gcd(K, blocksize) >= 32`` elements; else None.  ``absmax()``: the fp32 absmax of every block."""
    if (x2.shape[0] < NATIVE_GEMM_MIN_ROWS or not nm.bf16_gemm(x2) or _cpu.dense_dtype() != torch.bfloat16
            or _cpu.amx() or not native_cpu.has_bf16_gemm()):
        return None
    piece = math.gcd(in_features, blocksize)
    if piece < NATIVE_MIN_PIECE:  # the kernel's unit: 32 codes
        return None
    scale = _piece_scales(absmax(), blocksize, piece, out_features, in_features)
    return native_cpu.lut4_gemm(x2, codes, rows=out_features, table=code_table, scale=scale, piece=piece)


def _cpu_fast(x2, codes, absmax, code_table, blocksize, out_features, in_features, *, nm: _cpu.Numerics):
    y = _native_gemm(x2, codes, code_table, blocksize, out_features, in_features, nm, lambda: absmax.float())
    if y is None:
        y = _native(x2, codes, code_table, blocksize, out_features, in_features, absmax, nm,
                    absmax=lambda: absmax.float())
    if y is not None:
        return y
    return _chunked_linear(nm.rounded(x2), codes, code_table, blocksize, out_features, lambda b0, b1: absmax[b0:b1],
                           nm.gemm_dtype(x2))


def _cpu_fast_dq(x2, codes, absmax_q, absmax_code, absmax_scale, absmax_offset, code_table, blocksize,
                 absmax_blocksize, out_features, in_features, *, nm: _cpu.Numerics):
    def span_absmax(b0: int, b1: int) -> torch.Tensor:
        return fmt.double_dequantize_span(absmax_q, absmax_code, absmax_scale, absmax_offset, absmax_blocksize,
                                          b0, b1)

    y = _native_gemm(x2, codes, code_table, blocksize, out_features, in_features, nm,
                     lambda: span_absmax(0, absmax_q.numel()))
    if y is None:
        y = _native(x2, codes, code_table, blocksize, out_features, in_features, absmax_q, nm,
                    dq=(absmax_code, absmax_scale, absmax_offset, absmax_blocksize),
                    absmax=lambda: span_absmax(0, absmax_q.numel()))
    if y is not None:
        return y
    return _chunked_linear(nm.rounded(x2), codes, code_table, blocksize, out_features, span_absmax, nm.gemm_dtype(x2))


def _cuda(x2, codes, absmax, code_table, *, bias, blocksize, out_features, in_features):
    from ..kernels.bnb4 import bnb4_linear

    return bnb4_linear(x2, codes, absmax, code_table, bias, blocksize=blocksize, out_features=out_features,
                       in_features=in_features)


def _cuda_dq(x2, codes, absmax_q, absmax_code, absmax_scale, absmax_offset, code_table, *, bias, blocksize,
             absmax_blocksize, out_features, in_features):
    from ..kernels.bnb4 import bnb4_linear_dq

    return bnb4_linear_dq(x2, codes, absmax_q, absmax_code, absmax_scale, absmax_offset, code_table, bias,
                          blocksize=blocksize, absmax_blocksize=absmax_blocksize, out_features=out_features,
                          in_features=in_features)


_SHAPES = (("out_features", "int"), ("in_features", "int"))
OP = LinearOpDef(
    name="linear_bnb4", tensors=("codes", "absmax", "code_table"),
    scalars=(("blocksize", "int"), *_SHAPES),
    dequantize=dequantize_weight, out_features=lambda out_features, **_: out_features, check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, cpu_fast_any_m=True,  # chunked decode + GEMM beats the reference at every M
    doc="x [..., K]; codes uint8 [ceil(N*K/2)] (flattened row-major, first code in the high nibble); "
        "absmax fp32 [ceil(N*K/blocksize)]; code_table fp32 [16]; bias [N] -> [..., N]",
)
OP_DQ = LinearOpDef(
    name="linear_bnb4_dq",
    tensors=("codes", "absmax_q", "absmax_code", "absmax_scale", "absmax_offset", "code_table"),
    scalars=(("blocksize", "int"), ("absmax_blocksize", "int"), *_SHAPES),
    dequantize=dequantize_weight_dq, out_features=lambda out_features, **_: out_features, check=check_dq,
    cpu_fast=_cpu_fast_dq, cuda=_cuda_dq, cpu_fast_any_m=True,
    doc="as linear_bnb4 with the block absmax double-quantized: absmax_code[absmax_q] * "
        "absmax_scale[block // absmax_blocksize] + absmax_offset (absmax_q uint8, absmax_code fp32 [256], "
        "absmax_scale fp32, absmax_offset fp32 [])",
)
linear_bnb4 = define(OP)
linear_bnb4_dq = define(OP_DQ)
reference = OP.reference
reference_dq = OP_DQ.reference
