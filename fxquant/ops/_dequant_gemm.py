"""Dequantize-then-GEMM for formats no PyTorch CPU kernel reads (float8, fp<X>_e<A>m<B>).

The weight is decoded a block of output rows at a time into one reused buffer in the dense
compute dtype and multiplied right away, so the decoded block is still in cache when the GEMM
reads it: the decoded weight never makes a round trip through DRAM, and no page is allocated
per block.  The per-row scale is applied to the ``[M, N]`` output instead of the ``[N, K]``
weight (``x @ (v * s).T == (x @ v.T) * s``).
"""
from __future__ import annotations

from typing import Callable

import torch

#: Decoded bytes per block.  Measured with one thread (tools/bench_cases/float8.py --sweep, 11008x4096,
#: float8wo, M=1, AVX2 EPYC, shared machine, ±30% noise): 0.5 MB 65 ms, 1 MB 49 ms, 2 MB 51 ms,
#: 4 MB 47 ms with a reused buffer; the whole weight at once 580 ms.
BLOCK_BYTES = 2 << 20

#: ``decode(r0, r1, out)`` writes rows ``r0:r1`` of the unscaled weight into ``out`` ``[r1 - r0, K]``.
Decoder = Callable[[int, int, torch.Tensor], None]


def block_rows(k: int, dtype: torch.dtype) -> int:
    return max(16, BLOCK_BYTES // max(1, k * torch.finfo(dtype).bits // 8))


def blocked_linear(x2: torch.Tensor, n: int, k: int, decode: Decoder, row_scale: torch.Tensor,
                   dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> ``(x2 @ W.T) * row_scale`` ``[M, N]`` in ``dtype``, where ``decode``
    produces ``W`` ``[N, K]`` in blocks of ``rows`` rows (default: :data:`BLOCK_BYTES` worth)."""
    rows = min(n, rows or block_rows(k, dtype))
    xd = x2.to(dtype)
    y = torch.empty(x2.shape[0], n, dtype=dtype, device=x2.device)
    buf = torch.empty(rows, k, dtype=dtype, device=x2.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = buf[: r1 - r0]
        decode(r0, r1, block)
        torch.mm(xd, block.t(), out=y[:, r0:r1])
    return y.mul_(row_scale.to(dtype))
