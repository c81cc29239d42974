"""GGUF's k-quants (q2_k, q3_k, q4_k, q5_k, q6_k): super-blocks of 256 values with an fp16 scale (and
an fp16 ``dmin``), sub-blocks of 16 or 32 values with their own small integer scales (and minimums).
Layouts and formulas: :mod:`fxquant.formats.gguf`; byte maps below (llama.cpp ``block_q*_K``).

Decoders: uint8 ``[R, type_size]`` -> float32 ``[R, 256]``, the ``gguf`` package's values bit for
bit.  Within a super-block, value ``i = 128 * h + 32 * s + l`` (halves ``h``, 32-value pieces ``s``)
is where the 2-bit types keep bits ``2s .. 2s+1`` of byte ``32h + l``; the 4-bit types keep value
``64 * j + l`` in the low nibble of byte ``32j + l`` and ``64 * j + 32 + l`` in its high nibble.
"""
from __future__ import annotations

import torch

from .gguf_legacy import f16_at

QK_K = 256


def _bits(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """uint8 ``[R, C]`` -> int32 ``[R, count, C]``: field ``t`` (bits ``t*width ..``) of every byte."""
    shifts = torch.arange(0, count * width, width, dtype=torch.int32, device=b.device)
    return (b.to(torch.int32)[:, None, :] >> shifts[:, None]) & ((1 << width) - 1)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """2-bit codes, uint8 ``[R, 64]`` -> int32 ``[R, 256]`` (value ``128h + 32s + l``: bits ``2s`` of
    byte ``32h + l``)."""
    r = qs.shape[0]
    return _bits(qs.reshape(r * 2, 32), 2, 4).reshape(r, QK_K)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """4-bit codes, uint8 ``[R, 128]`` -> int32 ``[R, 256]`` (value ``64j + 32n + l``: nibble ``n`` of
    byte ``32j + l``)."""
    r = qs.shape[0]
    return _bits(qs.reshape(r * 4, 32), 4, 2).reshape(r, QK_K)


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k / q5_k's 12 scale bytes -> (6-bit scales, 6-bit minimums), int32 ``[R, 8]`` each
    (llama.cpp ``get_scale_min_k4``: bytes 0-3 scales 0-3, 4-7 minimums 0-3, 8-11 the low nibbles of
    scales / minimums 4-7, whose top two bits are the top bits of bytes 0-3 / 4-7)."""
    s = scales.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 0xF) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return sc, mn


def decode_q2_k(b: torch.Tensor) -> torch.Tensor:
    """84 bytes: scales 0-15 (low nibble scale, high nibble minimum, per 16 values), qs 16-79,
    d 80-81, dmin 82-83."""
    r = b.shape[0]
    sc = b[:, 0:16].to(torch.int32)
    dl = f16_at(b, 80) * (sc & 0xF).float()
    ml = f16_at(b, 82) * (sc >> 4).float()
    q = _crumbs(b[:, 16:80]).float().reshape(r, 16, 16)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(r, QK_K)


def decode_q3_k(b: torch.Tensor) -> torch.Tensor:
    """110 bytes: hmask 0-31 (bit ``t`` of byte ``l``: the high bit of value ``32t + l``), qs 32-95,
    scales 96-107 (6-bit, biased by 32, per 16 values), d 108-109.  A clear high bit subtracts 4."""
    r = b.shape[0]
    sb = b[:, 96:108].to(torch.int32)
    low = torch.cat([sb[:, 0:8] & 0xF, sb[:, 0:8] >> 4], 1)
    high = _bits(b[:, 104:108], 2, 4).reshape(r, 16)
    dl = f16_at(b, 108) * ((low | (high << 4)) - 32).float()
    hbit = _bits(b[:, 0:32], 1, 8).reshape(r, QK_K)
    q = (_crumbs(b[:, 32:96]) - ((hbit ^ 1) << 2)).float().reshape(r, 16, 16)
    return (dl[:, :, None] * q).reshape(r, QK_K)


def decode_q4_k(b: torch.Tensor) -> torch.Tensor:
    """144 bytes: d 0-1, dmin 2-3, scales 4-15 (:func:`scale_min_k4`, per 32 values), qs 16-143."""
    r = b.shape[0]
    sc, mn = scale_min_k4(b[:, 4:16])
    dl = f16_at(b, 0) * sc.float()
    ml = f16_at(b, 2) * mn.float()
    q = _nibbles(b[:, 16:144]).float().reshape(r, 8, 32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(r, QK_K)


def decode_q5_k(b: torch.Tensor) -> torch.Tensor:
    """176 bytes: d 0-1, dmin 2-3, scales 4-15, qh 16-47 (bit ``t`` of byte ``l``: the fifth bit of value
    ``32t + l``), qs 48-175 (as q4_k)."""
    r = b.shape[0]
    sc, mn = scale_min_k4(b[:, 4:16])
    dl = f16_at(b, 0) * sc.float()
    ml = f16_at(b, 2) * mn.float()
    q = _nibbles(b[:, 48:176]) | (_bits(b[:, 16:48], 1, 8).reshape(r, QK_K) << 4)
    return (dl[:, :, None] * q.float().reshape(r, 8, 32) - ml[:, :, None]).reshape(r, QK_K)


def decode_q6_k(b: torch.Tensor) -> torch.Tensor:
    """210 bytes: ql 0-127 (per half ``h``: value ``128h + 64n + l`` in nibble ``n`` of byte
    ``64h + l``), qh 128-191 (2 bits, as the 2-bit types), scales 192-207 (int8, per 16 values),
    d 208-209; codes biased by 32."""
    r = b.shape[0]
    ql = _bits(b[:, 0:128].reshape(r * 2, 64), 4, 2).reshape(r, QK_K)
    q = (ql | (_crumbs(b[:, 128:192]) << 4)) - 32
    dl = f16_at(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (dl[:, :, None] * q.float().reshape(r, 16, 16)).reshape(r, QK_K)
