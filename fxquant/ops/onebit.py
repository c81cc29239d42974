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

CPU fast path (the ``compute_dtype`` policy of :func:`fxquant.ops._cpu.numerics`): at M <=
``NATIVE_MAX_ROWS`` the native GEMV (:mod:`fxquant.kernels.native_cpu`) reads the sign bits in place,
in fp32 (``x ⊙ b`` made in the kernel, x rounded to bf16 first where the policy says); above, the
sign bits become int8 *scaled bit planes* (one vectorised AND per element,
:func:`fxquant.formats.onebit.bit_planes_into`) in a reused per-thread workspace, multiplied with
matching bf16 activations (:func:`plane_activations`): with AVX512-BF16 by the native int8 GEMM at
every M, ``x ⊙ b`` split into bf16 parts whose sum is it (two parts when x's values are bf16: exact;
three for fp32 values), fp32 result: the reference up to fp32 sums; elsewhere by
``torch._weight_int8pack_mm`` (``x ⊙ b`` and the output rounded to bf16) below
:func:`fxquant.ops._cpu.large_m_threshold` where a bf16 result is allowed, the native GEMV there
where the result must be fp32-exact, and the reference (unpack, dense GEMM) above.  Only the packed
bits are kept; the planes are scratch.  docs/formats/onebit.md has the measured alternatives (a
cached int8 or int4 copy, table unpack, unpack-then-dense).
CUDA: Triton kernel in :mod:`fxquant.kernels.onebit`.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..formats import onebit as fmt
from ..kernels import native_cpu
from . import _cpu
from . import _validate as v
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


def check(x: torch.Tensor, bias: torch.Tensor | None, sign_bits: torch.Tensor, a: torch.Tensor,
          b: torch.Tensor) -> None:
    """``a`` bf16 ``[N]``, ``b`` bf16 ``[K]``, ``sign_bits`` uint8 ``[N, ceil(K/8)]``, ``x`` ``[..., K]``,
    ``bias`` ``[N]``."""
    op = "linear_onebit"
    if a.dim() != 1 or b.dim() != 1:
        v.fail(op, f"a and b must be 1-D bf16 tensors [N] and [K], got a of shape {tuple(a.shape)} and b "
                   f"of shape {tuple(b.shape)}")
    n, k = a.shape[0], b.shape[0]
    v.stored(op, "a", a, torch.bfloat16, (n,), "[N]")
    v.stored(op, "b", b, torch.bfloat16, (k,), "[K]")
    v.stored(op, "sign_bits", sign_bits, torch.uint8, (n, (k + 7) // 8), "[N, ceil(K/8)] (N = len(a), K = len(b))")
    v.activations(op, x, k)
    v.bias(op, bias, n)


def dequantize_weight(sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]`` (used for autograd and the report's error)."""
    return fmt.dequantize(sign_bits, a, b)


def plane_activations(x2: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x2`` ``[M, K]`` -> bf16 ``[M, 8 C + _extra_cols(C)]``: :func:`plane_activations_of` ``x' =
    bf16(x ⊙ b)``."""
    return plane_activations_of((x2.float() * b.float()).to(torch.bfloat16))


def plane_activations_of(xb: torch.Tensor) -> torch.Tensor:
    """bf16 ``x'`` ``[M, K]`` -> bf16 ``[M, 8 C + _extra_cols(C)]``: the activations that, against
    :func:`fxquant.formats.onebit.bit_planes_into`'s planes (row-major ``[8, C]`` per output) and
    the correction columns, sum to ``Σ_k x'_k S_nk``.

    ``S = 2 B - 1`` gives ``Σ_k x'_k S_nk = Σ_{j,c} (2 x'_{8c+j} / PLANE_VALUES[j]) planes[n, j, c]
    - Σ_k x'_k``: the plane factors are exact powers of two, and ``-Σ_k x'_k`` (summed in fp64)
    rides in three bf16 parts whose sum carries ~24 bits, so the cancellation between the two
    terms happens inside the kernel's fp32 accumulator, never in a bf16 output (a separate
    ``- sum(x)`` after the GEMV would lose ``2^-9 Σ|x|`` — all of ``y`` for non-negative inputs)."""
    m, k = xb.shape
    c = fmt.packed_cols(k)
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


def _native_gemm() -> bool:
    """Whether the native int8 GEMM (AVX512-BF16) runs here: the planes' exact path at every M."""
    lib = native_cpu._lib()
    return lib is not None and lib.fxq512_int8_bf16_gemm is not None


def native_row_limit(nm: _cpu.Numerics) -> int:
    """Rows up to which the op runs the native GEMV: its own limit, and where the result must be
    fp32-exact and no native GEMM runs, up to the large-M threshold (its per-row cost is the planes
    path's at M <= 8, measured above; linear in M)."""
    if nm.exact and not _native_gemm():
        return max(NATIVE_MAX_ROWS, _cpu.large_m_threshold() - 1)
    return NATIVE_MAX_ROWS


def _cpu_fast(x2: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
              nm: _cpu.Numerics | None = None) -> torch.Tensor | None:
    """``[M, K]`` -> ``[M, N]`` (module docstring) or None (the reference); ``nm``: the call's policy
    (default: ``compute_dtype=None``'s for ``x2``)."""
    nm = nm or _cpu.numerics(x2.dtype, None)
    n, c = sign_bits.shape
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x2.new_zeros(m, n)
    gemm = _native_gemm()
    large = m >= _cpu.large_m_threshold()
    if m <= native_row_limit(nm):
        y = native_cpu.onebit_gemv(x2, sign_bits, a, b, round_x=nm.round_x)
        if y is not None:
            return y
    if gemm:
        # x ⊙ b (x's values per the policy) as bf16 parts: two when x's values are bf16 numbers (their
        # 16-bit products with b split exactly), three for fp32 values (24 bits); one GEMM on all parts
        xb = nm.rounded(x2).float() * b.float()
        parts = []
        for _ in range(2 if nm.bf16_values(x2) else 3):
            parts.append(xb.to(torch.bfloat16))
            xb = xb - parts[-1].float()
        y = _planes_linear(plane_activations_of(torch.cat(parts)), sign_bits, a, gemm=True)
        return y.view(len(parts), m, n).sum(0)
    if large or not nm.bf16_gemm(x2):
        return None  # the reference
    return _planes_linear(plane_activations(x2, b), sign_bits, a, gemm=False)


def _planes_linear(xp: torch.Tensor, sign_bits: torch.Tensor, a: torch.Tensor, *, gemm: bool) -> torch.Tensor:
    """Plane activations ``xp`` ``[R, 8 C + extra]`` -> ``[R, N]``: scaled bit planes of up to
    ``CHUNK_BYTES`` rows at a time (one AND per element) into the workspace, then
    ``(xp @ planes.T) * a``: the native int8 GEMM (``gemm``: exact products, fp32 sums, fp32 result)
    or ``torch._weight_int8pack_mm`` (bf16 result; fp32 input is 10-50x slower).  Only the packed
    bits are kept: the planes are scratch; ``a`` is the stored bf16 scale."""
    n, c = sign_bits.shape
    sign_bits = sign_bits.contiguous()
    scale = a.to(torch.bfloat16)
    width = 8 * c + _extra_cols(c)
    rows = min(n, max(1, CHUNK_BYTES // width))
    buf = _workspace(rows, c)

    def mm(planes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if gemm:
            return native_cpu.int8_gemm(xp, planes, s, fp32_out=True)
        return torch._weight_int8pack_mm(xp, planes, s)
    if rows == n:
        fmt.bit_planes_into(sign_bits, buf[:, : 8 * c].view(n, 8, c))
        return mm(buf, scale)
    out = torch.empty(xp.shape[0], n, dtype=torch.float32 if gemm else torch.bfloat16)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        chunk = buf[: r1 - r0]
        fmt.bit_planes_into(sign_bits[r0:r1], chunk[:, : 8 * c].view(r1 - r0, 8, c))
        out[:, r0:r1] = mm(chunk, scale[r0:r1])
    return out


def _cuda(x2, sign_bits, a, b, *, bias):
    from ..kernels.onebit import onebit_linear

    return onebit_linear(x2, sign_bits, a, b, bias)


OP = LinearOpDef(
    name="linear_onebit", tensors=("sign_bits", "a", "b"), scalars=(),
    dequantize=dequantize_weight, out_features=lambda a, **_: a.shape[0], check=check,
    cpu_fast=_cpu_fast, cuda=_cuda, reference_fn=reference_onebit,
    cpu_fast_any_m=True,  # the native GEMM's planes path at every M; _cpu_fast returns None for the reference
    doc="x [..., K]; sign_bits uint8 [N, ceil(K/8)] (bit j of byte c = sign of column 8c+j, 1 = +1); "
        "a bf16 [N]; b bf16 [K]; bias [N] -> ((x * b) @ sign.T) * a + bias [..., N]",
)
linear_onebit = define(OP)
reference = OP.reference
