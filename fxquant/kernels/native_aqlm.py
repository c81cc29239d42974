"""ctypes wrappers of the AQLM kernels in ``native_aqlm.c`` (built into the one library of
:mod:`fxquant.kernels.native_build`): the small-M table GEMV and the row decoder of the large-M path.

Both read the stored ``codes`` (int8 / int16 ``[O, G, M]``, :mod:`fxquant.formats.aqlm`) in place; the
codebooks and scales are passed as fp32 copies made once per tensor (cached while the stored tensor lives
unchanged: a few KB for 8-bit codebooks).  They return ``None`` where they do not apply (no native
library), raise ``ValueError`` when ``x``'s width is not the stored groups' and ``MemoryError`` when a
kernel's allocation fails (nothing written), as the other native wrappers.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import _cpu
from . import native_build
from .native_build import _raise
from .native_cpu import _fp32_rows, _out, _ptr, _refuse, _round_in_c

#: the decoder's output dtypes (``out_dtype`` of ``fxq_aqlm_decode``)
_OUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_CB_T: dict = {}  # id(codebooks) -> fp32 [ig, M*2**B*og]
_CB: dict = {}  # id(codebooks) -> fp32 [M*2**B*og, ig]
_SC: dict = {}  # id(scales) -> fp32 [O]


def _codes_fit(wrapper: str, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> tuple:
    """Refuse tensors that are not one AQLM layout -> ``(O, G, NC, nbits, og, ig, code bytes)``."""
    nc, e, og, ig = codebooks.shape
    nbits = e.bit_length() - 1
    if (codes.dim() != 3 or codes.dtype not in (torch.int8, torch.int16) or codes.shape[2] != nc or e != 1 << nbits
            or scales.numel() != codes.shape[0] or (codes.dtype == torch.int8) != (nbits <= 8)):
        _refuse(wrapper, f"codes {codes.dtype} {tuple(codes.shape)}, codebooks {tuple(codebooks.shape)} and scales "
                         f"{tuple(scales.shape)} are not one AQLM layout")
    return codes.shape[0], codes.shape[1], nc, nbits, og, ig, codes.element_size()


def lut_gemv(x2: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, *,
             out_features: int, round_x: bool = False) -> torch.Tensor | None:
    """``x2 [M, G*ig]`` (any float dtype; the stored, padded width) times the AQLM weight -> fp32
    ``[M, out_features]`` by the codeword-by-activation table (fp32 products and sums; ``round_x``: x
    rounded to bf16 first, in the kernel).  None without the native library."""
    o, g, nc, nbits, og, ig, cbytes = _codes_fit("aqlm_lut_gemv", codes, codebooks, scales)
    if x2.dim() != 2 or x2.shape[1] != g * ig:
        _refuse("aqlm_lut_gemv", f"x has {x2.shape[-1]} columns, the stored groups take {g * ig}")
    lib = native_build._lib()
    if lib is None:
        return None
    x, c = _fp32_rows(x2), codes.contiguous()
    cbt = _cpu.memo_per_tensor(_CB_T, codebooks, lambda t: t.float().reshape(-1, ig).t().contiguous())
    sc = _cpu.memo_per_tensor(_SC, scales, lambda t: t.float().reshape(-1).contiguous())
    y = _out(x.shape[0], out_features)
    st = lib.fxq_aqlm_lut_gemv(_ptr(x), x.shape[0], g * ig, _ptr(c), cbytes, nbits, o, g, nc, _ptr(cbt), og, ig,
                               _ptr(sc), out_features, _ptr(y), out_features, _round_in_c(x2, round_x),
                               torch.get_num_threads())
    if st:
        _raise(st, lib.fxq_aqlm_lut_gemv, M=x.shape[0], K=g * ig, N=out_features, codebooks=tuple(codebooks.shape))
    return y


def decoder(codes: torch.Tensor, codebooks: torch.Tensor,
            scales: torch.Tensor) -> Callable[[int, int, torch.Tensor], bool] | None:
    """``decode(o0, o1, out)`` writes out groups ``o0 .. o1`` of the scaled weight (rows ``o0*og .. o1*og``,
    ``G*ig`` columns) into ``out`` (fp32 or bf16, rows of stride ``out.stride(0)``) and returns True, or
    False for an output dtype the kernel does not write; None without the native library."""
    o, g, nc, nbits, og, ig, cbytes = _codes_fit("aqlm_decoder", codes, codebooks, scales)
    lib = native_build._lib()
    if lib is None:
        return None
    c = codes.contiguous()
    cb = _cpu.memo_per_tensor(_CB, codebooks, lambda t: t.float().reshape(-1, ig).contiguous())
    sc = _cpu.memo_per_tensor(_SC, scales, lambda t: t.float().reshape(-1).contiguous())

    def decode(o0: int, o1: int, out: torch.Tensor) -> bool:
        kind = _OUT_DTYPES.get(out.dtype)
        if kind is None or out.stride(1) != 1 or out.shape[1] != g * ig or out.shape[0] != (o1 - o0) * og:
            return False
        st = lib.fxq_aqlm_decode(_ptr(c), cbytes, nbits, o, g, nc, _ptr(cb), og, ig, _ptr(sc), o0, o1, _ptr(out),
                                 out.stride(0), kind, torch.get_num_threads())
        if st:
            _raise(st, lib.fxq_aqlm_decode, rows=(o0, o1), codebooks=tuple(codebooks.shape), dtype=out.dtype)
        return True
    return decode
