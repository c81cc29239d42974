"""Native decoders of stored weights to bf16 (``native_avx512_decode.c``, AVX512-BF16) for the
dequantize + dense GEMM path at large M (:mod:`fxquant.ops._dequant_gemm`): block decoders with the
:data:`~fxquant.ops._dequant_gemm.Decoder` protocol writing the same bf16 values as the PyTorch decoders
they stand in for, bit for bit.

That path is what CPUs with AMX run at large M (oneDNN's AMX bf16 GEMM outruns the decode-inside-the-GEMM
kernels there: :func:`fxquant.ops._cpu.amx`), so its decode is what separates a weight-only format's
prefill from bf16's.  Each function returns None where its kernel is not available (no AVX512-BF16,
``FXQUANT_NATIVE=0``) or the layout is not the one it reads; the caller keeps its PyTorch decoder.
"""
from __future__ import annotations

import torch

from .native_cpu import _lib, _ptr, _raise


def int4_tiles_decoder_t(qweight: torch.Tensor, *, block_n: int, group_size: int, scale: torch.Tensor,
                         zero: torch.Tensor | None, n_stored: int, mid: float = 8.0):
    """A transposed block decoder (``decode.transposed``: ``decode(r0, r1, out)`` writes ``W[r0:r1].T``
    into ``out [K, r1 - r0]``, unit column stride) of int4 tiles (int4pack's CPU layout, 64-row tiles)
    with ``W = (q - mid) * s + z`` rounded once to bf16 (``addcmul`` in bf16, as
    :func:`fxquant.ops.int4wo._block_decoder`); ``scale`` / ``zero`` bf16 ``[K / g, >= n_stored]`` views
    (any strides; ``zero`` None: 0).  ``r0`` must be a multiple of 64."""
    lib = _lib()
    if (lib is None or getattr(lib, "fxq512_int4t_to_bf16t", None) is None or block_n != 64 or qweight.dtype != torch.uint8
            or scale.dtype != torch.bfloat16 or (zero is not None and (zero.dtype != torch.bfloat16
                                                                      or zero.stride() != scale.stride()))):
        return None
    w, k = qweight.contiguous(), qweight.shape[1] * 2
    if k % group_size or scale.shape[0] != k // group_size:
        return None
    sg, sr = scale.stride()

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        if (out.dtype != torch.bfloat16 or out.shape != (k, r1 - r0) or out.stride(1) != 1 or r0 % 64
                or r1 > n_stored):
            raise ValueError(f"int4 tile decoder: out must be bf16 [{k}, {r1 - r0}] with unit column stride, "
                             f"rows {r0}:{r1} from a multiple of 64 within {n_stored}")
        st = lib.fxq512_int4t_to_bf16t(_ptr(w), k, r0, r1, group_size, _ptr(scale), _ptr(zero), sr, sg, n_stored,
                                       float(mid), _ptr(out), out.stride(0), torch.get_num_threads())
        if st:
            _raise(st, lib.fxq512_int4t_to_bf16t, rows=r1 - r0, K=k)
    decode.transposed = True
    return decode


def lut4_into(codes: torch.Tensor, *, k: int, r0: int, r1: int, table: torch.Tensor, scale: torch.Tensor,
              piece: int, out: torch.Tensor) -> bool:
    """Rows ``r0:r1`` of a 4-bit table weight (codes flat uint8, two per byte, the first in the high
    nibble, ``K / 2`` bytes per row) into bf16 ``out [r1 - r0, K]`` (unit column stride): ``table[code] *
    scale[(n * K + k) // piece]`` in fp32 rounded once, as the chunked decode + cast
    (:func:`fxquant.ops.bnb4._chunked_linear`).  ``scale`` fp32, one per piece of the whole weight;
    ``piece`` a power of two >= 32 dividing K.  False (nothing written) where the kernel does not apply."""
    lib = _lib()
    if (lib is None or getattr(lib, "fxq512_lut4_to_bf16", None) is None or piece < 32 or piece & (piece - 1)
            or k % piece or scale.dtype != torch.float32 or not scale.is_contiguous() or not codes.is_contiguous()
            or table.numel() != 16 or codes.numel() * 2 < r1 * k or scale.numel() * piece < r1 * k):
        return False
    if out.dtype != torch.bfloat16 or out.shape != (r1 - r0, k) or out.stride(1) != 1:
        raise ValueError(f"lut4 decoder: out must be bf16 [{r1 - r0}, {k}] with unit column stride")
    t = table.to(torch.float32).contiguous()
    st = lib.fxq512_lut4_to_bf16(_ptr(codes), k, r0, r1, _ptr(t), _ptr(scale), piece.bit_length() - 1, _ptr(out),
                                 out.stride(0), torch.get_num_threads())
    if st:
        _raise(st, lib.fxq512_lut4_to_bf16, rows=r1 - r0, K=k)
    return True


def affine_rows_into(qweight: torch.Tensor, *, bits: int, group_size: int, in_features: int, scale: torch.Tensor,
                     zero: torch.Tensor | None, r0: int, r1: int, out: torch.Tensor) -> bool:
    """Rows ``r0:r1`` of an integer affine weight (:mod:`fxquant.formats.affine`: ``qweight`` int32 rows of
    bit streams) into ``out [r1 - r0, K]`` (bf16 or fp32, unit column stride): ``(q - z) * s`` in fp32,
    rounded once to ``out``'s dtype, as :func:`fxquant.formats.affine.decode_rows`.  ``scale`` fp32
    ``[N, G]`` contiguous (the stored scale's exact copy), ``zero`` uint8 ``[N, G]`` or None (symmetric).
    False (nothing written) where the kernel does not apply."""
    lib = _lib()
    k, g = in_features, group_size
    groups = -(-k // g)
    if (lib is None or getattr(lib, "fxq512_affine_to_rows", None) is None or out.dtype not in (torch.bfloat16,
                                                                                               torch.float32)
            or out.shape != (r1 - r0, k) or out.stride(1) != 1 or not qweight.is_contiguous()
            or qweight.dtype != torch.int32 or scale.dtype != torch.float32 or not scale.is_contiguous()
            or scale.shape != (qweight.shape[0], groups) or not 0 <= r0 <= r1 <= qweight.shape[0]
            or (zero is not None and (zero.dtype != torch.uint8 or zero.shape != scale.shape
                                      or not zero.is_contiguous()))):
        return False
    st = lib.fxq512_affine_to_rows(_ptr(qweight), qweight.shape[1], k, r0, r1, bits, g, _ptr(scale), _ptr(zero),
                                   groups, _ptr(out), out.stride(0), int(out.dtype == torch.bfloat16),
                                   torch.get_num_threads())
    if st:
        _raise(st, lib.fxq512_affine_to_rows, rows=r1 - r0, K=k, bits=bits)
    return True
