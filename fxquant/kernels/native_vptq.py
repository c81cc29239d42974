"""ctypes wrappers of the VPTQ kernels in ``native_vptq.c`` (built into the one library of
:mod:`fxquant.kernels.native_build`): the small-M GEMV and the row decoder of the large-M path.

Both read the stored ``indices`` (int32 bit streams) and ``outlier_indices`` (int16) in place; the codebooks
are passed as fp32 copies made once per tensor (cached while the stored tensor lives unchanged: a few KB to
a few MB).  The permutation and the norm are the caller's (:func:`fxquant.ops.vptq.moved_to_activations`):
the GEMV takes x in the stored column order, scaled; the decoder takes the scale in that order.  They
return ``None`` where they do not apply (no native library, vectors longer than ``MAX_VECTOR_LEN``),
and raise ``MemoryError`` / ``ValueError`` on a kernel's status as the other native wrappers.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..formats import vptq as fmt
from ..ops import _cpu
from . import native_build
from .native_build import _raise
from .native_cpu import _out, _ptr

#: longest vector the kernels take (VQ_MAX_V in native_vptq.c)
MAX_VECTOR_LEN = 64
_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_BOOKS: dict = {}  # id(codebook) -> fp32 contiguous copy


def _book(t: torch.Tensor) -> torch.Tensor | None:
    if t.numel() == 0:
        return None
    return _cpu.memo_per_tensor(_BOOKS, t, lambda b: b.float().contiguous())


def _layout_args(t: dict, lay: fmt.Layout) -> tuple | None:
    """The kernels' layout arguments (see ``native_build._VPTQ_LAYOUT``), or None when they do not apply."""
    if lay.vector_len > MAX_VECTOR_LEN or (lay.outlier_size and lay.outlier_vector_len > MAX_VECTOR_LEN):
        return None
    idx = t["indices"].contiguous()
    oidx = t["outlier_indices"].contiguous() if lay.outlier_size else None
    keep = (idx, oidx)  # the pointers below stay valid while these live
    return keep, (_ptr(idx), lay.group_num, lay.rows, lay.words, lay.group_size, lay.outlier_size, lay.index_bits,
                  lay.total_bits, _ptr(_book(t["centroids"])), lay.num_centroids,
                  _ptr(_book(t["res_centroids"])) if lay.num_res_centroids else None, max(lay.num_res_centroids, 1),
                  lay.vector_len, _ptr(oidx), _ptr(_book(t["outlier_centroids"])) if lay.outlier_size else None,
                  lay.outlier_vector_len, lay.out_features)


def gemv(xp: torch.Tensor, t: dict, lay: fmt.Layout) -> torch.Tensor | None:
    """``xp`` fp32 ``[M, K]`` (stored column order, scaled) -> ``xp @ Wp.T`` fp32 ``[M, N]``; None when the
    native library is missing or the layout is not one the kernel takes."""
    lib = native_build._lib()
    if lib is None:
        return None
    args = _layout_args(t, lay)
    if args is None:
        return None
    keep, layout = args
    x = xp.float().contiguous()
    y = _out(x.shape[0], lay.out_features)
    st = lib.fxq_vptq_gemv(_ptr(x), x.shape[0], x.shape[1], *layout, _ptr(y), lay.out_features, torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_vptq_gemv, M=x.shape[0], K=x.shape[1], layout=lay)
    del keep
    return y


def decoder(t: dict, lay: fmt.Layout, scale: torch.Tensor | None) -> Callable[[int, int, torch.Tensor], bool] | None:
    """``decode(n0, n1, out)`` writes rows ``n0 .. n1`` of ``Wp * scale`` (``scale`` fp32 ``[K]`` in the stored
    order, or None) into ``out`` (fp32 or bf16, unit column stride) and returns True, or False for an output
    it does not write; None without the native library."""
    lib = native_build._lib()
    if lib is None:
        return None
    args = _layout_args(t, lay)
    if args is None:
        return None
    keep, layout = args
    s = None if scale is None else scale.float().contiguous()

    def decode(n0: int, n1: int, out: torch.Tensor) -> bool:
        kind = _OUT_DTYPES.get(out.dtype)
        if kind is None or out.stride(1) != 1 or out.shape != (n1 - n0, lay.in_features):
            return False
        st = lib.fxq_vptq_decode(*layout, _ptr(s), n0, n1, _ptr(out), out.stride(0), kind, torch.get_num_threads())
        if st:
            _raise(st, lib.fxq_vptq_decode, rows=(n0, n1), layout=lay, dtype=out.dtype)
        return True

    decode.keep = (keep, s)  # the tensors the pointers refer to live as long as the decoder
    return decode


def available() -> bool:
    """Whether the native library (and so these kernels) loaded."""
    return native_build._lib() is not None
