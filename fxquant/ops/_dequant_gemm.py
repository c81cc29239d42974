"""Dequantize-then-GEMM for formats no PyTorch CPU kernel reads (float8, fp<X>_e<A>m<B>), and for
the large-M path of the others (``LinearOpDef.block_decoder``).

The weight is decoded a block of output rows at a time into one reused buffer in the dense
compute dtype and multiplied right away, so the decoded block is still in cache when the GEMM
reads it: the decoded weight never makes a round trip through DRAM, and no page is allocated
per block.  The per-row scale is applied to the ``[M, N]`` output instead of the ``[N, K]``
weight (``x @ (v * s).T == (x @ v.T) * s``), except in float16: there unscaled codes (int8 up to
127) times large activations overflow the GEMM's fp16 output where the reference's scaled weight
keeps it finite, so each decoded block is scaled first (fp32 product rounded once to fp16: the
reference's fp16 weight).

``exact_in_bf16`` decoders (float8, fpX: every decoded value is a bf16 number): for bf16 x (bf16
activations, or fp32 ones the ``compute_dtype`` policy rounded, :class:`._cpu.Numerics`) each block is
decoded to bf16 and multiplied by the native bf16 GEMM with fp32 output and the row scale applied in
fp32 (:func:`fxquant.kernels.native_cpu.bf16_gemm`, AVX512-BF16): the fp32 GEMM's result (exact
products, fp32 sums) at the bf16 GEMM's speed, whichever of the two ``dtype`` asked for.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels import native_cpu

#: Decoded bytes per block.  Measured (float8wo, 11008x4096, fp32 blocks, AVX2 EPYC, shared machine):
#: 1 thread, M=1: 1 MB 57 ms, 4 MB 45 ms, 16 MB 79 ms (median; the unblocked decode 374 ms);
#: M=256: 1 MB 601 ms, 4 MB 539 ms, 16 MB 541 ms (fp32 F.linear alone 493 ms).  Fewer, larger blocks
#: also mean fewer OpenMP parallel regions, which matters on a loaded machine (each region can wait
#: for a descheduled worker thread: see docs/formats/float8.md, "CPU speed").
BLOCK_BYTES = 4 << 20

#: ``decode(r0, r1, out)`` writes rows ``r0:r1`` of the unscaled weight into ``out`` ``[r1 - r0, K]``;
#: a decoder with ``transposed = True`` writes them transposed into ``out [K, r1 - r0]`` (unit column
#: stride; bf16 only, never float16's in-weight scaling): the layout int4 tiles decode to without a
#: transpose (:func:`fxquant.kernels.native_decode.int4_tiles_decoder_t`).
Decoder = Callable[[int, int, torch.Tensor], None]


#: Decoded bf16 bytes per block of the native exact path (``exact_in_bf16``): its GEMM packs x again for
#: every block, so larger blocks than :data:`BLOCK_BYTES`.  Measured (float8wo 11008x4096, M=256, 2 threads,
#: same-process medians, the 2-core machine shared with other jobs, load ~5, ms): 2 MB 717 / 775, 8 MB
#: 629 / 462, 32 MB 433 / 447 (the bf16 torch path, 4 MB blocks, 571 / 685); fp6_e3m2: 2 MB 1093 / 1131,
#: 8 MB 611 / 708, 32 MB 552 / 592 (704 / 682).  8 MB: the decode's scratch stays ~20 MB.
NATIVE_BLOCK_BYTES = 8 << 20


def block_rows(k: int, dtype: torch.dtype) -> int:
    return max(16, BLOCK_BYTES // max(1, k * torch.finfo(dtype).bits // 8))


def native_applies(x2: torch.Tensor, k: int, dtype: torch.dtype, exact_in_bf16: bool) -> bool:
    """Whether :func:`blocked_linear` takes the native exact GEMM (module docstring)."""
    return (exact_in_bf16 and dtype in (torch.float32, torch.bfloat16) and x2.dtype == torch.bfloat16
            and k % 2 == 0 and native_cpu.has_bf16_gemm())


def plan_rows(x2: torch.Tensor, k: int, dtype: torch.dtype, exact_in_bf16: bool = False) -> int:
    """Rows per block :func:`blocked_linear` will decode for these arguments (callers size their decode
    scratch with it): :data:`NATIVE_BLOCK_BYTES` of bf16 on the native exact path, else
    :data:`BLOCK_BYTES` of ``dtype``."""
    if native_applies(x2, k, dtype, exact_in_bf16):
        return max(16, NATIVE_BLOCK_BYTES // (2 * k))
    return block_rows(k, dtype)


def blocked_linear(x2: torch.Tensor, n: int, k: int, decode: Decoder, row_scale: torch.Tensor | None,
                   dtype: torch.dtype, rows: int | None = None, exact_in_bf16: bool = False) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``(x2 @ W.T) * row_scale`` ``[M, N]`` in ``dtype``, where ``decode``
    produces ``W`` ``[N, K]`` in blocks of ``rows`` rows (default: :data:`BLOCK_BYTES` worth);
    ``row_scale`` ``None`` means 1; ``exact_in_bf16``: ``W``'s values are bf16 numbers (module
    docstring: the native exact GEMM for bf16 x and fp32 ``dtype``)."""
    if native_applies(x2, k, dtype, exact_in_bf16):
        return _native_blocked(x2, n, k, decode, row_scale, rows)
    rows = min(n, rows or block_rows(k, dtype))
    xd = x2.to(dtype)
    y = torch.empty(x2.shape[0], n, dtype=dtype, device=x2.device)
    if getattr(decode, "transposed", False):  # writes W[r0:r1].T [K, rows]: the GEMM reads it as it is
        buf_t = torch.empty(k, rows, dtype=dtype, device=x2.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            block_t = buf_t[:, : r1 - r0]
            decode(r0, r1, block_t)
            torch.mm(xd, block_t, out=y[:, r0:r1])
        return y if row_scale is None else y.mul_(row_scale.to(dtype))
    buf = torch.empty(rows, k, dtype=dtype, device=x2.device)
    in_weight = row_scale is not None and dtype == torch.float16  # scale each block, not the output
    if in_weight:
        col = row_scale.float().reshape(-1, 1)
        scaled = torch.empty(rows, k, device=x2.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = buf[: r1 - r0]
        decode(r0, r1, block)
        if in_weight:
            block.copy_(torch.mul(block, col[r0:r1], out=scaled[: r1 - r0]))
        torch.mm(xd, block.t(), out=y[:, r0:r1])
    return y if row_scale is None or in_weight else y.mul_(row_scale.to(dtype))


def _native_blocked(x2: torch.Tensor, n: int, k: int, decode: Decoder, row_scale: torch.Tensor | None,
                    rows: int | None) -> torch.Tensor:
    """:func:`blocked_linear` with blocks decoded to bf16 and multiplied by the native bf16 GEMM into
    fp32 columns of ``y`` (the row scale applied in fp32)."""
    rows = min(n, rows or max(16, NATIVE_BLOCK_BYTES // (2 * k)))
    y = torch.empty(x2.shape[0], n)
    buf = torch.empty(rows, k, dtype=torch.bfloat16)
    rs = None if row_scale is None else row_scale.float().expand(n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = buf[: r1 - r0]
        decode(r0, r1, block)
        if native_cpu.bf16_gemm(x2, block, None if rs is None else rs[r0:r1], out=y[:, r0:r1]) is None:
            raise RuntimeError(f"native bf16 GEMM refused a block [{r1 - r0}, {k}] it was checked to take")
    return y
