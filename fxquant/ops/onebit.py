"""``fxquant::linear_onebit``: OneBit sign-times-rank-1 linear (Xu et al. 2024).

``y = ((x ⊙ b) · Sᵀ) ⊙ a + bias`` with ``S`` the ±1 signs unpacked from ``sign_bits``; layout and
init in :mod:`fxquant.formats.onebit`.  ``K = len(b)`` and ``N = len(a)``: the shapes of the
stored vectors are the op's only size information, so there is no scalar that could disagree.

The reference is the paper's formula (``LinearOpDef.reference_fn``), not "dequantize, then
``F.linear``": the two are equal in exact arithmetic (``Σ_k x_k b_k S_nk a_n``), but in a 16-bit
``compute_dtype`` they round different things (``x ⊙ b`` and the output, vs every ``a_n b_k`` of
an ``N x K`` weight), and the fast paths (CPU and Triton) compute the paper's form, so it is the
one they are held to.  It also never builds the float ``N x K`` product ``a bᵀ``.
tests/ops/test_onebit.py checks that both forms agree.

CPU fast path (rows < :func:`fxquant.ops._cpu.large_m_threshold`, ``compute_dtype`` None or
bf16): at M <= ``NATIVE_MAX_ROWS`` the native GEMV (:mod:`fxquant.kernels.native_cpu`) reads the sign
bits in place, in fp32; above, the sign bits become int8 *scaled bit planes* (one vectorised AND per element,
:func:`fxquant.formats.onebit.bit_planes_into`) in a reused per-thread workspace, and go to
``torch._weight_int8pack_mm`` against matching bf16 activations (:func:`plane_activations`).
Only the packed bits are kept; the planes are scratch.  docs/formats/onebit.md has the measured
alternatives (a cached int8 or int4 copy, table unpack, unpack-then-dense).  Large M: the
reference (unpack, dense GEMM in ``compute_dtype``).
CUDA: Triton kernel in :mod:`fxquant.kernels.onebit`.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..formats import onebit as fmt
from ..kernels import native_cpu
from . import _cpu
from ._linear import LinearOpDef, define

#: Largest M for the native GEMV (:func:`fxquant.kernels.native_cpu.onebit_gemv`, fp32 throughout);
#: above it the bit planes + ``_weight_int8pack_mm``.  Measured (11008x4096, 2 threads, ms, native /
#: planes): M=1 2.3 / 8.3, M=2 5.7 / 8.8, M=4 8.3 / 8.7, M=8 13.9 / 15.6.
NATIVE_MAX_ROWS = 8

#: Most int8 bytes of bit planes per ``_weight_int8pack_mm`` call.  Measured (11008x4096, M=1,
#: interleaved, this 2-core AVX2 machine shared with other jobs): 1 thread, CPU time: 2 MiB chunks
#: 10.2 ms, 8 MiB 10.8, 16 MiB 12.2, one 45 MB call 12.1 (bf16 F.linear 10.2); 2 threads, median
#: wall: 662 / 119 / 90 / 48 ms.  Cache-sized chunks win alone, but every chunk is two OpenMP
#: parallel regions whose barrier waits for the other thread, which on a busy machine means a
#: scheduler slice per barrier; a few large calls are robust.  64 MiB holds the planes of a
#: 14336x4096 weight in one call.
CHUNK_BYTES = 64 << 20
#: extra int8 columns after the planes: three 1s meet the three bf16 parts of -sum(x ⊙ b), then
#: zeros up to a reduction length ``_weight_int8pack_mm`` computes right (:func:`._cpu.int8pack_k_ok`)
_CORRECTION_ONES = 3


def _extra_cols(c: int) -> int:
    """Correction columns after the ``8 c`` plane columns."""
    return _CORRECTION_ONES + (-(8 * c + _CORRECTION_ONES)) % _cpu.INT8PACK_K_MULTIPLE
#: activation factor of plane j: 2 / PLANE_VALUES[j] (a power of two: exact in any float dtype)
_PLANE_X = torch.tensor([2.0 / v for v in fmt.PLANE_VALUES])


def reference_onebit(x: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                     bias: torch.Tensor | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Definition: ``x [..., K]`` -> ``((x ⊙ b) · Sᵀ) ⊙ a + bias`` ``[..., N]`` in ``x.dtype``,
    every step in ``compute_dtype`` (fp32 when ``None``)."""
    cd = compute_dtype or torch.float32
    signs = fmt.unpack_signs(sign_bits, b.shape[0]).to(cd)
    y = F.linear(x.to(cd) * b.to(cd), signs) * a.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)


def dequantize_weight(sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]`` (used for autograd and the report's error)."""
    return fmt.dequantize(sign_bits, a, b)


def plane_activations(x2: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> bf16 ``[M, 8 C + _extra_cols(C)]``: the activations that, against
    :func:`fxquant.formats.onebit.bit_planes_into`'s planes (row-major ``[8, C]`` per output) and
    the correction columns, sum to ``Σ_k x'_k S_nk`` with ``x' = bf16(x ⊙ b)``.

    ``S = 2 B - 1`` gives ``Σ_k x'_k S_nk = Σ_{j,c} (2 x'_{8c+j} / PLANE_VALUES[j]) planes[n, j, c]
    - Σ_k x'_k``: the plane factors are exact powers of two, and ``-Σ_k x'_k`` (summed in fp64)
    rides in three bf16 parts whose sum carries ~24 bits, so the cancellation between the two
    terms happens inside the kernel's fp32 accumulator, never in a bf16 output (a separate
    ``- sum(x)`` after the GEMV would lose ``2^-9 Σ|x|`` — all of ``y`` for non-negative inputs)."""
    m, k = x2.shape
    c = fmt.packed_cols(k)
    xb = (x2.float() * b.float()).to(torch.bfloat16)
    if 8 * c != k:
        xb = F.pad(xb, (0, 8 * c - k))
    rest = -xb.sum(dim=1, keepdim=True, dtype=torch.float64)
    parts = []
    for _ in range(3):
        parts.append(rest.to(torch.bfloat16))
        rest = rest - parts[-1].double()
    planes = (xb.float().view(m, c, 8).transpose(1, 2) * _PLANE_X.view(1, 8, 1)).to(torch.bfloat16)
    pad = xb.new_zeros(m, _extra_cols(c) - len(parts))
    return torch.cat([planes.reshape(m, 8 * c), *parts, pad], dim=1)


_WORKSPACE = threading.local()


def _workspace(rows: int, c: int) -> torch.Tensor:
    """int8 ``[rows, 8 c + _extra_cols(c)]`` scratch for the planes, its last columns holding the correction columns
    (``_CORRECTION_ONES`` ones after the planes, then zeros).

    Kept per thread and reused: a fresh 45 MB tensor per call costs ~30 ms of page faults here
    (12 ms -> 45 ms per call at 11008x4096).  It grows to the largest layer run (at most
    ``CHUNK_BYTES``); :func:`clear_workspace` frees it.  It is scratch, not weight state."""
    width = 8 * c + _extra_cols(c)
    need = rows * width
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < need:
        buf = _WORKSPACE.buf = torch.empty(need, dtype=torch.int8)
        _WORKSPACE.layout = None
    view = buf[:need].view(rows, width)
    # planes of another layout overwrote these columns (keyed by c, not the width: with the padding
    # two plane counts can share a width, e.g. c = 4 and 5 both give 48 columns)
    if _WORKSPACE.layout != (rows, c):
        view[:, 8 * c:] = 0
        view[:, 8 * c:8 * c + _CORRECTION_ONES] = 1
        _WORKSPACE.layout = (rows, c)
    return view


def clear_workspace() -> None:
    """Free this thread's plane workspace (it is re-made on the next CPU fast-path call)."""
    _WORKSPACE.buf = _WORKSPACE.layout = None


def _cpu_fast(x2: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[M, K]`` -> ``[M, N]`` bf16: scaled bit planes of up to ``CHUNK_BYTES`` rows at a time (one
    AND per element) into the workspace, then ``torch._weight_int8pack_mm(activations, planes, a)``.

    Only the packed bits are kept: the planes are scratch.  bf16 activations (the int8 kernel is
    10-50x slower with fp32 input) with fp32 accumulation; ``a`` is the stored bf16 scale.
    Versus the fp32 reference: ``x ⊙ b`` and the output each rounded once to bf16."""
    n, c = sign_bits.shape
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x2.new_zeros(m, n)
    if m <= NATIVE_MAX_ROWS:
        y = native_cpu.onebit_gemv(x2.float() * b.float(), sign_bits, a)
        if y is not None:
            return y
    sign_bits = sign_bits.contiguous()
    xp = plane_activations(x2, b)
    scale = a.to(torch.bfloat16)
    width = 8 * c + _extra_cols(c)
    rows = min(n, max(1, CHUNK_BYTES // width))
    buf = _workspace(rows, c)
    if rows == n:
        fmt.bit_planes_into(sign_bits, buf[:, : 8 * c].view(n, 8, c))
        return torch._weight_int8pack_mm(xp, buf, scale)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        chunk = buf[: r1 - r0]
        fmt.bit_planes_into(sign_bits[r0:r1], chunk[:, : 8 * c].view(r1 - r0, 8, c))
        out[:, r0:r1] = torch._weight_int8pack_mm(xp, chunk, scale[r0:r1])
    return out


def _cuda(x2, sign_bits, a, b, *, bias):
    from ..kernels.onebit import onebit_linear

    return onebit_linear(x2, sign_bits, a, b, bias)


OP = LinearOpDef(
    name="linear_onebit", tensors=("sign_bits", "a", "b"), scalars=(),
    dequantize=dequantize_weight, out_features=lambda a, **_: a.shape[0],
    cpu_fast=_cpu_fast, cuda=_cuda, reference_fn=reference_onebit,
    doc="x [..., K]; sign_bits uint8 [N, ceil(K/8)] (bit j of byte c = sign of column 8c+j, 1 = +1); "
        "a bf16 [N]; b bf16 [K]; bias [N] -> ((x * b) @ sign.T) * a + bias [..., N]",
)
linear_onebit = define(OP)
reference = OP.reference
