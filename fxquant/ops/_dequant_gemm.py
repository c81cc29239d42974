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
"""
from __future__ import annotations

from typing import Callable

import torch

#: Decoded bytes per block.  Measured (float8wo, 11008x4096, fp32 blocks, AVX2 EPYC, shared machine):
#: 1 thread, M=1: 1 MB 57 ms, 4 MB 45 ms, 16 MB 79 ms (median; the unblocked decode 374 ms);
#: M=256: 1 MB 601 ms, 4 MB 539 ms, 16 MB 541 ms (fp32 F.linear alone 493 ms).  Fewer, larger blocks
#: also mean fewer OpenMP parallel regions, which matters on a loaded machine (each region can wait
#: for a descheduled worker thread: see docs/formats/float8.md, "CPU speed").
BLOCK_BYTES = 4 << 20

#: ``decode(r0, r1, out)`` writes rows ``r0:r1`` of the unscaled weight into ``out`` ``[r1 - r0, K]``.
Decoder = Callable[[int, int, torch.Tensor], None]


def block_rows(k: int, dtype: torch.dtype) -> int:
    return max(16, BLOCK_BYTES // max(1, k * torch.finfo(dtype).bits // 8))


def blocked_linear(x2: torch.Tensor, n: int, k: int, decode: Decoder, row_scale: torch.Tensor | None,
                   dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``(x2 @ W.T) * row_scale`` ``[M, N]`` in ``dtype``, where ``decode``
    produces ``W`` ``[N, K]`` in blocks of ``rows`` rows (default: :data:`BLOCK_BYTES` worth);
    ``row_scale`` ``None`` means 1."""
    rows = min(n, rows or block_rows(k, dtype))
    xd = x2.to(dtype)
    y = torch.empty(x2.shape[0], n, dtype=dtype, device=x2.device)
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
