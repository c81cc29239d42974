"""OneBit weights (``onebit``): a sign bit per weight and two value vectors (Xu et al. 2024).

Math (the paper's Sign-Value-Independent Decomposition, SVID): ``W ≈ S ⊙ (a bᵀ)`` with
``S = sign(W)`` in {-1, +1} ``[N, K]``, ``a`` ``[N]`` (one value per output) and ``b`` ``[K]`` (one
per input).  A linear layer then never forms ``W``: ``y = ((x ⊙ b) · Sᵀ) ⊙ a``.

Init (here; the calibrated fit to a layer's output error is ``fxquant.methods.OneBit``, which
stores through the same :func:`pack`; knowledge distillation with the paper's post-linear
LayerNorm is not implemented): ``S = sign(W)`` and ``a bᵀ`` = the best rank-1
approximation of ``|W|`` in the Frobenius norm.  Since ``S ⊙ W = |W|`` and ``S ⊙ S = 1``,
``||W - S ⊙ (a bᵀ)||_F = || |W| - a bᵀ ||_F``: fitting ``|W|`` is fitting ``W``.  The paper fits
``|W|`` by rank-1 NMF (sklearn, random init); fxquant uses the leading singular pair of ``|W|``
instead, because for rank 1 the two problems have the same optimum: by Eckart-Young the leading
singular pair is the best rank-1 matrix of all, and by Perron-Frobenius the leading singular
vectors of a non-negative matrix can be chosen non-negative, so that optimum is also feasible for
NMF.  SVD reaches it deterministically, without sklearn, where an NMF solver stops at a tolerance
from a random start.  The pair is computed by power iteration on ``|W|`` from the all-ones
vector: every iterate stays non-negative (no sign fixing), iterate 0 is exactly the per-row scale
``a = mean_k |W|``, ``b = 1``, and each further step can only lower the error
(``||A - (A v) vᵀ||² = ||A||² - ||A v||²`` and ``||A v||`` grows along power iteration), so the
result is never worse than per-row scaling even if the iteration is stopped early.

Storage (what a module's buffers hold and what is saved):
- ``sign_bits`` uint8 ``[N, ceil(K / 8)]``: row ``n``, byte ``c``, bit ``j`` (``j = 0`` the least
  significant) holds ``S[n, 8c + j]``; bit 1 means +1, bit 0 means -1; ``W = 0`` (either sign of
  zero) and NaN get +1.  The bits past ``K`` in a row's last byte are 0 and never read.  This is
  ``numpy.packbits(W >= 0, axis=1, bitorder="little")``; rows start on byte boundaries so a row
  slice is a slice of the tensor.  (The paper's inference code uses the same bit order with the
  opposite polarity, bit 1 = -1.)
- ``a`` bfloat16 ``[N]``, ``b`` bfloat16 ``[K]``.  ``b`` is scaled to RMS 1, so ``x ⊙ b`` stays on
  the activations' scale and ``a`` carries the weight magnitude (for a row-uniform ``|W|``,
  ``a ≈ mean_k |W[n, k]|``); ``a`` is then refit against the stored ``b`` (least squares) before
  rounding.  bf16, not the paper's fp16: same 2 bytes, float32's exponent range (no overflow or
  flush to zero for any weight scale), and it is the scale dtype of the CPU kernels fxquant feeds.
  Its 8-bit mantissa costs nothing measurable: the rounding error (≤ 2^-8 relative per element)
  is orthogonal-ish to and ~300x smaller than the rank-1 sign approximation's error (≈ 0.60 of
  ``||W||`` for Gaussian weights), and the two add in quadrature.

Error bound: exact when ``|W|`` has rank 1 (up to the bf16 rounding of ``a`` and ``b``); otherwise
``||W - Ŵ||_F = sqrt(||W||² - σ₁(|W|)²)``, never above per-row scaling's error.  For i.i.d.
Gaussian weights that is ``sqrt(1 - 2/π) ≈ 0.603`` of ``||W||``.
"""
from __future__ import annotations

import math

import torch

SCALE_DTYPE = torch.bfloat16
POWER_ITERS = 64  # cap; measured: 3 steps on Gaussian W, 4-5 on SmolLM2-135M (σ₂/σ₁ of |W| 0.07-0.23)
POWER_TOL = 1e-6  # stop when the unit right vector moves less than this (2-norm)


def _bit_weights(device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 ``[8]``: ``1 << j``.  Built per call, never a module-level tensor: under fake-tensor
    tracing (autograd through ``torch.compile`` / ``opcheck``) a real constant is an error."""
    return torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8, device=device),
                                    torch.arange(8, dtype=torch.uint8, device=device))


def sign_table(device: torch.device | str | None = None) -> torch.Tensor:
    """int8 ``[256, 8]``: row ``v`` holds the ±1 signs byte ``v`` stands for (bit ``j`` -> column ``j``)."""
    v = torch.arange(256, dtype=torch.int16, device=device)[:, None]
    bits = torch.bitwise_right_shift(v, torch.arange(8, dtype=torch.int16, device=device)) & 1
    return (2 * bits - 1).to(torch.int8)


#: value of a set bit j in :func:`bit_planes_into`'s int8 planes (bit 7 = 0x80 reads as -128)
PLANE_VALUES = (1, 2, 4, 8, 16, 32, 64, -128)


def packed_cols(k: int) -> int:
    """Bytes per row of ``sign_bits`` for ``k`` input features."""
    return -(-k // 8)


def pack_signs(weight: torch.Tensor) -> torch.Tensor:
    """Float ``[N, K]`` -> ``sign_bits`` uint8 ``[N, ceil(K/8)]`` (bit 1 = +1; zeros and NaN -> +1)."""
    n, k = weight.shape
    positive = ~(weight.detach() < 0)  # -0.0 < 0 and NaN < 0 are False: both map to +1
    padded = torch.zeros(n, 8 * packed_cols(k), dtype=torch.uint8, device=weight.device)
    padded[:, :k] = positive.to(torch.uint8)
    bits = padded.reshape(n, -1, 8) * _bit_weights(weight.device)
    return bits.sum(dim=-1, dtype=torch.uint8)  # distinct powers of two: the sum is an OR


def unpack_signs(sign_bits: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """``sign_bits`` uint8 ``[N, C]`` -> int8 ``[N, in_features]`` of ±1 (all ``8 C`` columns,
    padding included, when ``in_features`` is None).  The reference's unpack; the CPU fast path
    uses :func:`bit_planes_into` instead."""
    n, c = sign_bits.shape
    out = unpack_signs_into(sign_bits, torch.empty(n, 8 * c, dtype=torch.int8, device=sign_bits.device))
    return out if in_features is None else out[:, :in_features]


def unpack_signs_into(sign_bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_signs` of all ``8 C`` columns into the contiguous int8 ``out`` ``[N, 8 C]``."""
    # One gather of whole 8-byte table rows, through an int64 view of the table: each packed byte
    # costs one 8-byte load (measured 4-8x faster than shift-and-mask passes over the int8 result).
    table = sign_table(sign_bits.device).view(torch.int64).reshape(256)
    idx = sign_bits.reshape(-1).to(torch.int32)  # index_select's int32 path: ~3x faster than int64
    torch.index_select(table, 0, idx, out=out.view(torch.int64).reshape(-1))
    return out


def bit_planes_into(sign_bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Scaled bit planes, the CPU fast path's form of the signs: ``sign_bits`` uint8 ``[R, C]`` ->
    ``out`` int8 ``[R, 8, C]`` (any strides) with ``out[n, j, c] = PLANE_VALUES[j] * bit j of
    sign_bits[n, c]``, i.e. ``(S[n, 8c + j] + 1) / 2 * PLANE_VALUES[j]``.

    One vectorised AND per element (a 4th of the table unpack's cost), because each plane keeps
    its bit where it is: the power of two is undone on the activation side (exactly, in any float
    dtype), and the ``-1`` of ``S = 2 B - 1`` becomes one ``-sum(x)`` term; see
    :func:`fxquant.ops.onebit.plane_activations`."""
    r, c = sign_bits.shape
    masks = _bit_weights(sign_bits.device).view(1, 8, 1)
    torch.bitwise_and(sign_bits.view(r, 1, c), masks, out=out.view(torch.uint8))
    return out


def svid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 fit of ``|W|``: float ``[N, K]`` -> (``a`` fp32 ``[N]``, ``b`` fp32 ``[K]``), both
    non-negative, ``a bᵀ`` the leading singular pair of ``|W|`` (power iteration, see the module
    docstring), ``b`` with RMS 1.  An all-zero weight gives ``a = 0``, ``b = 1``."""
    mag = weight.detach().float().abs()
    n, k = mag.shape
    v = torch.full((k,), 1 / math.sqrt(k), device=mag.device)
    u = mag @ v
    for _ in range(POWER_ITERS):
        u_norm = u.norm()
        if u_norm == 0:
            break
        w = mag.T @ (u / u_norm)
        v_new = w / w.norm()
        moved = (v_new - v).norm()
        v, u = v_new, mag @ v_new
        if moved < POWER_TOL:
            break
    # a bᵀ = (A v) vᵀ, rescaled so that rms(b) = 1
    return u / math.sqrt(k), v * math.sqrt(k)


def fit_a(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least-squares ``a`` fp32 ``[N]`` for a given ``b``: ``argmin_a || |W| - a bᵀ ||_F``."""
    bf = b.float()
    denom = bf.dot(bf)
    return (weight.detach().float().abs() @ bf) / denom if denom > 0 else bf.new_zeros(weight.shape[0])


def pack(sign: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Given signs and value vectors -> the stored buffers (the one packing path of the format).

    ``sign`` float ``[N, K]``: only its sign is kept, as :func:`pack_signs` reads it (``>= 0``,
    NaN and both zeros -> +1), so the weight itself or a ±1 matrix both work; ``a`` ``[N]`` and
    ``b`` ``[K]`` any float dtype, rounded to nearest ``SCALE_DTYPE`` (bf16: unchanged).  Returns
    ``sign_bits`` uint8 ``[N, ceil(K/8)]``, ``a`` bf16 ``[N]``, ``b`` bf16 ``[K]``; the weight they
    stand for is :func:`dequantize` of them.  Used by :func:`quantize` and by the calibrated
    ``fxquant.methods.OneBit``."""
    n, k = sign.shape
    if a.shape != (n,) or b.shape != (k,):
        raise ValueError(f"onebit pack: a {tuple(a.shape)} and b {tuple(b.shape)} must be [{n}] and [{k}] "
                         f"for signs of shape {tuple(sign.shape)}")
    return {"sign_bits": pack_signs(sign), "a": a.to(SCALE_DTYPE), "b": b.to(SCALE_DTYPE)}


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float ``[N, K]`` -> stored buffers ``sign_bits`` uint8 ``[N, ceil(K/8)]``, ``a`` bf16 ``[N]``,
    ``b`` bf16 ``[K]`` (SVID init, round to nearest; ``a`` refit to the rounded ``b``)."""
    _, b = svid(weight)
    b = b.to(SCALE_DTYPE)
    a = fit_a(weight, b).to(SCALE_DTYPE)
    return pack(weight, a, b)


def dequantize(sign_bits: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stored buffers -> float32 ``W ≈ S ⊙ (a bᵀ)`` ``[N, K]`` with ``K = len(b)``."""
    signs = unpack_signs(sign_bits, b.shape[0]).float()
    return signs * (a.float()[:, None] * b.float()[None, :])


def nbytes(n: int, k: int) -> int:
    """Exact stored bytes of an ``[n, k]`` onebit weight: sign bytes + ``a`` + ``b``."""
    return n * packed_cols(k) + (n + k) * SCALE_DTYPE.itemsize
