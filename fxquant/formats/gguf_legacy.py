"""GGUF's legacy block types (q4_0, q4_1, q5_0, q5_1, q8_0): blocks of 32 values with an fp16 scale
(and an fp16 minimum for the ``_1`` types).  Layouts and formulas: :mod:`fxquant.formats.gguf`.

Decoders: uint8 ``[R, type_size]`` -> float32 ``[R, 32]``, the ``gguf`` package's values bit for bit.
Encoders: float32 ``[R, 32]`` -> uint8 ``[R, type_size]``, the ``gguf`` package's (= llama.cpp's
``quantize_row_*_ref``) round to nearest byte for byte: the same fp32 operations in the same order
(``x * (1/d) + 8.5`` truncated, not a rounding of ``x / d``), the codes chosen against the fp32 scale
before it is stored in fp16.
"""
from __future__ import annotations

import torch

QK = 32
_HALF = QK // 2


# ---- shared pieces ---------------------------------------------------------------------------------
def f16_at(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``offset`` of each row of uint8 ``b`` -> float32 ``[R, 1]``."""
    bits = b[:, offset:offset + 1].to(torch.int32) | (b[:, offset + 1:offset + 2].to(torch.int32) << 8)
    return bits.to(torch.uint16).view(torch.float16).float()


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 ``[R, 1]`` -> its fp16 (round to nearest even) as little-endian uint8 ``[R, 2]``."""
    bits = v.to(torch.float16).view(torch.uint16).to(torch.int32)
    return torch.cat([bits & 0xFF, bits >> 8], 1).to(torch.uint8)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, 16]`` -> int32 ``[R, 32]``: the low nibbles (values 0..15), then the high ones."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0xF, q >> 4], 1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, 4]`` (a little-endian uint32) -> int32 ``[R, 32]``: bit ``i`` for value ``i``."""
    shifts = torch.arange(8, dtype=torch.int32, device=qh.device)
    return ((qh.to(torch.int32)[:, :, None] >> shifts) & 1).reshape(qh.shape[0], QK)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int codes ``[R, 32]`` -> uint8 ``[R, 16]``: value ``i`` in the low nibble of byte ``i``, value
    ``i + 16`` in the high one (bits above the nibble dropped, as the package's uint8 shift does)."""
    q = q.to(torch.int32)
    return ((q[:, :_HALF] & 0xF) | ((q[:, _HALF:] << 4) & 0xF0)).to(torch.uint8)


def _pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """int codes ``[R, 32]`` -> uint8 ``[R, 4]``: bit 4 of value ``i`` at bit ``i`` (numpy's
    ``packbits(..., bitorder="little")``)."""
    bit = ((q.to(torch.int32) >> 4) & 1).reshape(q.shape[0], 4, 8)
    shifts = torch.arange(8, dtype=torch.int32, device=q.device)
    return (bit << shifts).sum(-1).to(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / d``, 0 where ``d == 0`` (the package's ``np.where(d == 0, 0, 1 / d)``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _signed_max(w: torch.Tensor) -> torch.Tensor:
    """Per row the value of largest magnitude, with its sign (the first one on ties, as ``argmax``)."""
    return torch.gather(w, 1, w.abs().argmax(1, keepdim=True))


def _trunc_codes(v: torch.Tensor, hi: int) -> torch.Tensor:
    """``trunc(v)`` as codes clipped to ``0 .. hi`` (the package truncates, then casts and clips)."""
    return torch.trunc(v).clamp_(0, hi).to(torch.int32)


# ---- decode ----------------------------------------------------------------------------------------
def decode_q4_0(b: torch.Tensor) -> torch.Tensor:
    return f16_at(b, 0) * (_nibbles(b[:, 2:18]) - 8).float()


def decode_q4_1(b: torch.Tensor) -> torch.Tensor:
    return f16_at(b, 0) * _nibbles(b[:, 4:20]).float() + f16_at(b, 2)


def decode_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << 4)
    return f16_at(b, 0) * (q - 16).float()


def decode_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << 4)
    return f16_at(b, 0) * q.float() + f16_at(b, 2)


def decode_q8_0(b: torch.Tensor) -> torch.Tensor:
    return f16_at(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


# ---- encode (round to nearest: the gguf package's quantize_blocks) ------------------------------
def encode_q4_0(w: torch.Tensor) -> torch.Tensor:
    d = _signed_max(w) / -8
    q = _trunc_codes(w * _inverse(d) + 8.5, 15)
    return torch.cat([f16_bytes(d), _pack_nibbles(q)], 1)


def encode_q4_1(w: torch.Tensor) -> torch.Tensor:
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    d = (hi - lo) / 15
    q = _trunc_codes((w - lo) * _inverse(d) + 0.5, 15)
    return torch.cat([f16_bytes(d), f16_bytes(lo), _pack_nibbles(q)], 1)


def encode_q5_0(w: torch.Tensor) -> torch.Tensor:
    d = _signed_max(w) / -16
    q = _trunc_codes(w * _inverse(d) + 16.5, 31)
    return torch.cat([f16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], 1)


def encode_q5_1(w: torch.Tensor) -> torch.Tensor:
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    d = (hi - lo) / 31
    q = _trunc_codes((w - lo) * _inverse(d) + 0.5, 31)
    return torch.cat([f16_bytes(d), f16_bytes(lo), _pack_fifth_bits(q), _pack_nibbles(q)], 1)


def encode_q8_0(w: torch.Tensor) -> torch.Tensor:
    d = w.abs().amax(1, keepdim=True) / 127
    v = w * _inverse(d)
    # round half away from zero exactly as the package's np_roundf: floor(a) + floor(2 * (a - floor(a)))
    a = v.abs()
    fl = torch.floor(a)
    q = (torch.sign(v) * (fl + torch.floor(2 * (a - fl)))).to(torch.int8)
    return torch.cat([f16_bytes(d), q.view(torch.uint8)], 1)
