"""GGUF block quantization types (``gguf-q4_0`` ... ``gguf-q6_k``): llama.cpp's tensors, kept as the
bytes a ``.gguf`` file holds.

Layout (one weight ``[N, K]``, row-major as ``nn.Linear.weight``): each row of ``K`` values is cut into
blocks of ``QK`` consecutive values (32 for the legacy types, 256 for the k-quants), each block stored
in ``type_size`` bytes; the stored tensor ``blocks`` is uint8 ``[N, K // QK * type_size]``, the file's
row bytes as they are, so a loader views the file's data and reshapes it (:func:`pack_rows`).
``K`` must be a multiple of ``QK`` (GGUF itself has no partial blocks).

Per type (llama.cpp ``ggml-common.h`` / ``ggml-quants.c``; ``d``, ``m``, ``dmin`` are fp16):

=======  ====  ====  ==========================================================================
type     QK    size  value of element ``i`` of a block
=======  ====  ====  ==========================================================================
q4_0     32    18    ``d * (q - 8)``; 4-bit q: ``i < 16`` low nibble of byte ``i``, else high of ``i-16``
q4_1     32    20    ``d * q + m``
q5_0     32    22    ``d * (q - 16)``; 5th bit: bit ``i`` of a little-endian uint32 ``qh``
q5_1     32    24    ``d * q + m``
q8_0     32    34    ``d * q``, q int8
q2_k     256   84    ``d * sc_j * q - dmin * m_j`` (4-bit ``sc_j``, ``m_j`` per 16 values), 2-bit q
q3_k     256   110   ``d * (s_j - 32) * (q - 4 * !hbit)``, 6-bit ``s_j`` per 16 values, 2+1-bit q
q4_k     256   144   ``d * sc_j * q - dmin * m_j`` (6-bit ``sc_j``, ``m_j`` per 32 values), 4-bit q
q5_k     256   176   as q4_k with 5-bit q
q6_k     256   210   ``d * s_j * (q - 32)``, int8 ``s_j`` per 16 values, 4+2-bit q
=======  ====  ====  ==========================================================================

Dequantization (:func:`dequantize`) is the ``gguf`` package's ``gguf.quants.dequantize`` bit for bit
(fp32): every product above is exact in fp32 (at most 11 + 7 + 6 significant bits), so each value
is rounded at most once, at the ``+ m`` / ``- dmin * m_j``; the decoders here, in the native CPU
kernels and in the Triton kernel all compute those same values.  Quantization (:func:`quantize`) is
implemented for the legacy types only, as the ``gguf`` package's round to nearest (llama.cpp's
``quantize_row_*_ref``), byte for byte; the k-quants are load-only (llama.cpp's k-quant search has
no reference in the package to hold it to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import gguf_kquants, gguf_legacy

__all__ = ["QType", "QTYPES", "QTYPE_BY_GGML", "qtype", "row_bytes", "pack_rows", "dequantize", "decode_rows",
           "quantize", "nbytes"]

#: values decoded per piece by :func:`dequantize` (bounds the temporaries)
BLOCK_VALUES = 1 << 21


@dataclass(frozen=True)
class QType:
    """One GGUF block type: ``name`` (``"q4_k"``), ``ggml_type`` (the ``gguf.GGMLQuantizationType``
    value a file stores), ``block_size`` (values per block, QK) and ``type_size`` (bytes per block)."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int
    #: uint8 ``[R, type_size]`` -> float32 ``[R, block_size]``
    decode: Callable[[torch.Tensor], torch.Tensor]
    #: float32 ``[R, block_size]`` -> uint8 ``[R, type_size]`` (None: load-only)
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def quantizable(self) -> bool:
        return self.encode is not None


#: every supported type by name, in ggml's order (values: ``gguf.GGMLQuantizationType``, sizes:
#: ``gguf.GGML_QUANT_SIZES``; the tests hold them to the package's)
QTYPES: dict[str, QType] = {q.name: q for q in (
    QType("q4_0", 2, 32, 18, gguf_legacy.decode_q4_0, gguf_legacy.encode_q4_0),
    QType("q4_1", 3, 32, 20, gguf_legacy.decode_q4_1, gguf_legacy.encode_q4_1),
    QType("q5_0", 6, 32, 22, gguf_legacy.decode_q5_0, gguf_legacy.encode_q5_0),
    QType("q5_1", 7, 32, 24, gguf_legacy.decode_q5_1, gguf_legacy.encode_q5_1),
    QType("q8_0", 8, 32, 34, gguf_legacy.decode_q8_0, gguf_legacy.encode_q8_0),
    QType("q2_k", 10, 256, 84, gguf_kquants.decode_q2_k),
    QType("q3_k", 11, 256, 110, gguf_kquants.decode_q3_k),
    QType("q4_k", 12, 256, 144, gguf_kquants.decode_q4_k),
    QType("q5_k", 13, 256, 176, gguf_kquants.decode_q5_k),
    QType("q6_k", 14, 256, 210, gguf_kquants.decode_q6_k),
)}
#: the same types by ``ggml_type`` (an ``int`` or a ``gguf.GGMLQuantizationType``, an IntEnum)
QTYPE_BY_GGML: dict[int, QType] = {q.ggml_type: q for q in QTYPES.values()}


def qtype(value: "str | int | QType") -> QType:
    """A type by name (``"q4_k"``, ``"Q4_K"``), ``ggml_type`` value / ``GGMLQuantizationType``, or itself;
    ``ValueError`` naming the value and the supported types otherwise."""
    if isinstance(value, QType):
        return value
    if isinstance(value, str) and value.lower() in QTYPES:
        return QTYPES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and int(value) in QTYPE_BY_GGML:
        return QTYPE_BY_GGML[int(value)]
    name = getattr(value, "name", None)
    shown = f"{value!r}" + (f" ({name})" if name and name != value else "")
    raise ValueError(f"GGUF type {shown} is not supported; valid: {', '.join(QTYPES)} "
                     f"(ggml types {', '.join(str(q.ggml_type) for q in QTYPES.values())})")


def row_bytes(qt: "str | int | QType", k: int) -> int:
    """Bytes of one stored row of ``k`` values (``k`` a multiple of the block size, else ``ValueError``)."""
    q = qtype(qt)
    if k % q.block_size:
        raise ValueError(f"GGUF {q.name}: in_features={k} is not a multiple of its block size {q.block_size}")
    return k // q.block_size * q.type_size


def nbytes(qt: "str | int | QType", n: int, k: int) -> int:
    """Exact stored bytes of an ``[n, k]`` weight."""
    return n * row_bytes(qt, k)


def pack_rows(qtype_: "str | int | QType", raw: torch.Tensor, n: int, k: int, *,
              compute_dtype: torch.dtype | None = None):
    """A GGUF tensor's bytes -> the :class:`~fxquant.schemes.QuantizedWeight` of ``linear_gguf``.

    ``raw``: uint8 holding ``n`` rows of ``row_bytes(qtype, k)`` bytes, in the file's order (any shape
    with that many elements, e.g. the ``[n, row_bytes]`` view of a memory-mapped file; viewed, not
    copied, when contiguous).  ``qtype_`` a name or a ggml type value.  ``ValueError`` naming the type,
    the expected and the actual shape when they do not fit; ``raw`` is never modified."""
    from ..schemes._base import QuantizedWeight

    q = qtype(qtype_)
    if type(n) is not int or type(k) is not int or n < 0 or k < 0:
        raise ValueError(f"GGUF {q.name}: n={n!r}, k={k!r} must be integers >= 0")
    rb = row_bytes(q, k)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.numel() != n * rb:
        got = f"{raw.dtype} of shape {tuple(raw.shape)}" if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"GGUF {q.name} weight [{n}, {k}] is uint8 [{n}, {rb}] ({k // q.block_size} blocks of "
                         f"{q.type_size} bytes per row), got {got}")
    blocks = raw.reshape(n, rb)
    attrs = {"qtype": q.name, "out_features": n, "in_features": k}
    if compute_dtype is not None:
        attrs["compute_dtype"] = compute_dtype
    return QuantizedWeight("linear_gguf", {"blocks": blocks}, attrs, n, k)


def decode_rows(blocks: torch.Tensor, qt: "str | QType", r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``r0 .. r1`` of ``W`` into ``out`` ``[r1 - r0, K]`` (any float dtype): decoded in fp32 (the
    reference values), then rounded once to ``out``'s dtype."""
    q = qtype(qt)
    rows = blocks[r0:r1]
    w = q.decode(rows.reshape(-1, q.type_size)).reshape(rows.shape[0], -1)
    return out.copy_(w)


def dequantize(blocks: torch.Tensor, qt: "str | int | QType", k: int | None = None) -> torch.Tensor:
    """uint8 ``[N, row_bytes]`` -> float32 ``[N, K]``, ``gguf.quants.dequantize`` bit for bit
    (``k`` checked against the row bytes when given)."""
    q = qtype(qt)
    n, rb = blocks.shape
    if rb % q.type_size or (k is not None and rb != row_bytes(q, k)):
        raise ValueError(f"GGUF {q.name}: blocks [{n}, {rb}] are not whole rows of {q.type_size}-byte blocks"
                         + (f" for in_features={k}" if k is not None else ""))
    kk = rb // q.type_size * q.block_size
    out = torch.empty(n, kk, device=blocks.device)
    step = max(1, BLOCK_VALUES // max(kk, 1))
    for r0 in range(0, n, step):
        decode_rows(blocks, q, r0, min(n, r0 + step), out[r0:r0 + step])
    return out


def quantize(weight: torch.Tensor, qt: "str | int | QType") -> torch.Tensor:
    """float ``[N, K]`` -> uint8 ``[N, row_bytes]``: the ``gguf`` package's ``gguf.quants.quantize`` byte
    for byte (fp32 arithmetic on the weight's values).  Legacy types only (``ValueError`` for a
    k-quant: load-only); ``K`` a multiple of 32."""
    q = qtype(qt)
    if q.encode is None:
        raise ValueError(f"GGUF {q.name} is load-only: read it from a GGUF file (fxquant.from_gguf)")
    n, k = weight.shape
    rb = row_bytes(q, k)
    w = weight.detach().float().reshape(-1, q.block_size)
    return q.encode(w).reshape(n, rb)
