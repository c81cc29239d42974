"""ctypes wrapper of the affine GEMV in ``native_affine.c`` (built into the one library of
:mod:`fxquant.kernels.native_build`): ``linear_affine``'s small-M path, reading ``qweight`` in place.

It returns ``None`` where it does not apply (no native library), raises ``ValueError`` when ``x``'s K is
not the stored rows' and ``MemoryError`` when the kernel's allocation fails (nothing written), as the
other native wrappers.
"""
from __future__ import annotations

import torch

from . import native_build
from .native_build import _raise
from .native_cpu import _fp32_rows, _out, _ptr, _refuse, _round_in_c


def affine_gemv(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *,
                bits: int, group_size: int, round_x: bool = False,
                kernels=None) -> torch.Tensor | None:
    """``x2 [M, K]`` (any float dtype) times ``W = (q - z) * s``: ``qweight`` int32 ``[N, ceil(K*bits/32)]``
    (each row a little-endian bit stream of codes), ``scale`` fp32 ``[N, ceil(K/group_size)]`` (the stored
    scales, converted exactly), ``zero`` uint8 like ``scale`` or ``None`` (symmetric: ``z = 2**(bits-1)``)
    -> fp32 ``[M, N]``: fp32 products and sums (``round_x``: x rounded to bf16 first, in the kernel).
    ``kernels``: one instruction set's (:func:`native_build.kernels`), default the ops' own.  None without
    the native library."""
    k = x2.shape[1]
    n, words = qweight.shape if qweight.dim() == 2 else (-1, -1)
    groups = -(-k // group_size) if group_size >= 1 else -1
    if (qweight.dtype != torch.int32 or words != -(-k * bits // 32) or scale.dtype != torch.float32
            or tuple(scale.shape) != (n, groups) or not 1 <= bits <= 8
            or (zero is not None and (zero.dtype != torch.uint8 or zero.shape != scale.shape))):
        _refuse("affine_gemv", f"qweight {qweight.dtype} {tuple(qweight.shape)}, scale {scale.dtype} "
                               f"{tuple(scale.shape)}, zero {None if zero is None else (zero.dtype, tuple(zero.shape))}"
                               f" are not the {bits}-bit affine layout of K={k} inputs in groups of {group_size}")
    lib = kernels or native_build._lib()
    if lib is None:
        return None
    x, w, s = _fp32_rows(x2), qweight.contiguous(), scale.contiguous()
    z = None if zero is None else zero.contiguous()
    y = _out(x.shape[0], n)
    st = lib.fxq_affine_gemv(_ptr(x), x.shape[0], k, _ptr(w), words, bits, n, group_size, _ptr(s), _ptr(z),
                             float(1 << (bits - 1)), _ptr(y), n, _round_in_c(x2, round_x), torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_affine_gemv, M=x.shape[0], K=k, N=n, bits=bits, group_size=group_size)
    return y
