"""ctypes wrappers of the GGUF kernels in ``native_gguf.c`` (built into the one library of
:mod:`fxquant.kernels.native_build`): the small-M GEMV and the row decoder of the large-M path.

Both read ``blocks`` uint8 ``[N, row_bytes]`` (:mod:`fxquant.formats.gguf`) in place and decode each
value exactly as the reference does.  They return ``None`` where they do not apply (no native
library), raise ``ValueError`` when ``x``'s K is not the stored rows' and ``MemoryError`` when a
kernel's allocation fails (nothing written), as the other native wrappers.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..formats import gguf as fmt
from . import native_build
from .native_build import _raise
from .native_cpu import _fp32_rows, _out, _ptr, _refuse, _round_in_c

#: the row decoder's output dtypes (``out_dtype`` of ``fxq_gguf_dequant``)
_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _rows_fit(wrapper: str, blocks: torch.Tensor, q: fmt.QType, k: int) -> int:
    """Refuse ``blocks`` that are not uint8 rows of ``k`` values of type ``q`` -> the row bytes."""
    rb = k // q.block_size * q.type_size
    if k % q.block_size or blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != rb:
        _refuse(wrapper, f"blocks {blocks.dtype} {tuple(blocks.shape)} are not rows of K={k} {q.name} values "
                         f"(uint8 [N, {rb}])")
    return rb


#: the types the bf16 dot-product GEMV takes (the others: the fp32 one)
BF16_DOT_TYPES = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"})


def gguf_gemv(x2: torch.Tensor, blocks: torch.Tensor, qtype: "str | fmt.QType", *,
              round_x: bool = False, bf16_dot: bool = True) -> torch.Tensor | None:
    """``x2 [M, K]`` (any float dtype) times the GGUF rows ``blocks`` uint8 ``[N, row_bytes]`` -> fp32
    ``[M, N]``, None without the native library.  ``round_x``: x's values rounded to bf16 first.

    On bf16 values of x (bf16 x, or ``round_x``) with AVX512-BF16, for :data:`BF16_DOT_TYPES` unless
    ``bf16_dot`` is False: the bf16 dot-product kernel (per block ``A * sum(c x) + B * sum(x)`` with
    the integer codes ``c``: exact products, fp32 sums); otherwise the fp32 kernel (the reference's
    weight values times x, fp32 sums).  Either way only the order of fp32 sums differs from the
    reference on those x values."""
    q = fmt.qtype(qtype)
    k = x2.shape[1]
    rb = _rows_fit("gguf_gemv", blocks, q, k)
    lib = native_build._lib()
    if lib is None:
        return None
    w = blocks.contiguous()
    n = w.shape[0]
    fn = getattr(lib, "fxq512_gguf_bf16_gemv", None)
    if bf16_dot and fn is not None and q.name in BF16_DOT_TYPES and (round_x or x2.dtype == torch.bfloat16):
        xb = x2.to(torch.bfloat16).contiguous()
        y = _out(xb.shape[0], n)
        st = fn(q.ggml_type, _ptr(xb), xb.shape[0], k, _ptr(w), rb, n, _ptr(y), n, torch.get_num_threads())
        if st:
            _raise(st, fn, qtype=q.name, M=xb.shape[0], K=k, N=n)
        return y
    x = _fp32_rows(x2)
    y = _out(x.shape[0], n)
    st = lib.fxq_gguf_gemv(q.ggml_type, _ptr(x), x.shape[0], k, _ptr(w), rb, n, _ptr(y), n, _round_in_c(x2, round_x),
                           torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_gguf_gemv, qtype=q.name, M=x.shape[0], K=k, N=n)
    return y


def gguf_decoder(blocks: torch.Tensor, qtype: "str | fmt.QType",
                 in_features: int) -> Callable[[int, int, torch.Tensor], None] | None:
    """A block decoder (:mod:`fxquant.ops._dequant_gemm`): ``decode(r0, r1, out)`` writes rows ``r0:r1`` of
    ``W`` into ``out`` (contiguous ``[r1 - r0, K]``, fp32, bf16 or fp16: the fp32 values rounded once);
    None without the native library."""
    q = fmt.qtype(qtype)
    rb = _rows_fit("gguf_decoder", blocks, q, in_features)
    lib = native_build._lib()
    if lib is None:
        return None
    w = blocks.contiguous()
    k = in_features

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        if out.dtype not in _OUT_DTYPES or out.shape != (r1 - r0, k) or out.stride(1) != 1:
            raise ValueError(f"gguf_decoder: out must be fp32 / bf16 / fp16 [{r1 - r0}, {k}] with unit column "
                             f"stride, got {out.dtype} {tuple(out.shape)}")
        st = lib.fxq_gguf_dequant(q.ggml_type, _ptr(w) + r0 * rb, r1 - r0, rb, _ptr(out), out.stride(0),
                                  _OUT_DTYPES[out.dtype], torch.get_num_threads())
        if st == -2 and out.dtype == torch.float16:  # a compiler without F16C: the fp32 values, rounded by torch
            out.copy_(fmt.dequantize(w[r0:r1], q))
        elif st:
            _raise(st, lib.fxq_gguf_dequant, qtype=q.name, rows=r1 - r0, K=k)
    return decode
