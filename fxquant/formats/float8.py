"""float8 weights (``float8wo``, ``float8wo-e5m2``) and dynamic float8 activations (``float8dq``).

Number formats: torch's ``float8_e4m3fn`` (4 exponent bits, bias 7, 3 mantissa bits, no inf,
NaN = ``S.1111.111``, max 448) and ``float8_e5m2`` (IEEE-like, bias 15, max 57344).  Encoding is
torch's fp32 -> float8 cast (round to nearest, ties to even) after clamping to ``±max`` (the cast
itself would give NaN / inf out of range), as torchao's ``_quantize_affine_float8`` does.

Scales (float32, as torchao's ``Float8Tensor`` and fbgemm): ``scale = amax / max`` over the
scaling unit (an output row of ``W`` for ``granularity="row"``, the whole tensor for
``"tensor"``), ``codes = float8(clamp(t / scale, -max, max))``, ``t ≈ codes * scale``.
Activations (dynamic, every call; fbgemm ``quantize_fp8_per_row`` / transformers
``FbgemmFp8Config``): ``amax`` is first clamped to ``[1e-12, activation_scale_ub]``, so rows with
outliers above the bound saturate instead of stretching the scale (default bound 1200.0).

Error bound (elementwise, for ``|t| <= amax``): half a float8 spacing at ``|t| / scale``:
``|t - t̂| <= scale * 2^(floor(log2(|t|/scale)) - mbits - 1)``, i.e. relative ``2^-4`` (e4m3fn)
or ``2^-3`` (e5m2) for normal values, absolute ``scale * 2^-10`` (e4m3fn) / ``scale * 2^-17``
(e5m2) in the subnormal range.

Storage: ``qweight`` float8 ``[N, K]`` row-major (as ``nn.Linear.weight``), ``scale`` float32
``[N]`` (row) or ``[1]`` (tensor).  Bytes: ``N * K + 4 * N`` (or ``N * K + 4``).
"""
from __future__ import annotations

import torch

from . import fpx

DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
GRANULARITIES = ("tensor", "row")
SCALE_DTYPE = torch.float32
EPS = 1e-12  # fbgemm's lower clamp of amax (avoids a zero scale for all-zero rows)
DEFAULT_ACTIVATION_SCALE_UB = 1200.0  # transformers.FbgemmFp8Config.activation_scale_ub


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype={dtype!r} is not a supported float8 dtype; valid: "
                     f"{', '.join(f'torch.float8_{n}' for n in DTYPES)}")


def fmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def scale_for(amax: torch.Tensor, dtype: torch.dtype, ub: float | None = None) -> torch.Tensor:
    """fp32 scale ``clamp(amax, EPS, ub) / max(dtype)``."""
    return amax.float().clamp(min=EPS, max=ub) / fmax(dtype)


def encode(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``float8(clamp(t / scale, -max, max))``; ``scale`` broadcasts against ``t``."""
    m = fmax(dtype)
    return (t.float() / scale).clamp_(-m, m).to(dtype)


def decode_table(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 ``[256]``: torch's own decoding of every float8 bit pattern (NaN codes included).
    Built per call (~10 µs), never cached: a cached tensor could be a fake one under tracing."""
    return torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8).view(dtype).float()


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 tensor -> ``dtype`` (fp32, bf16 and fp16 hold every finite float8 value exactly),
    equal to ``codes.to(dtype)`` bit for bit.

    A 256-entry table gather (``index_select`` on int32 indices): torch's float8 cast is scalar
    code on the CPU, measured 7x slower (and advanced indexing with int64 indices 6x slower)."""
    table = decode_table(codes.dtype, codes.device).to(dtype)
    return table.index_select(0, codes.reshape(-1).view(torch.uint8).to(torch.int32)).view(codes.shape)


EBITS = {torch.float8_e4m3fn: 4, torch.float8_e5m2: 5}
EXPONENT_OFFSET = {dt: fpx.fp16_exponent_offset(e) for dt, e in EBITS.items()}  # of decode_fp16_scaled
EXPONENT_OFFSET = {dt: fpx.fp16_exponent_offset(e) for dt, e in EBITS.items()}  # of decode_fp16_scaled


def decode_fp16_scaled(codes: torch.Tensor, *, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """float8 ``codes`` -> (float16 ``t``, ``e``) with ``codes.float() == t.float() * 2^e`` exactly
    for every non-NaN code (e4m3fn's NaN codes come out as ±480): a float8 byte *is* a
    top-aligned ``fpx`` code, see :func:`fxquant.formats.fpx.fp16_scaled`.  The CPU fast path;
    measured 2x faster than :func:`decode`.  ``scratch``: optional int16 buffer of ``codes``' shape."""
    return fpx.fp16_scaled(codes.view(torch.uint8), EBITS[codes.dtype], scratch=scratch), EXPONENT_OFFSET[codes.dtype]


# -- weights ------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                    granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` float ``[N, K]`` -> (``qweight`` float8 ``[N, K]``, ``scale`` fp32 ``[N]`` for
    ``"row"`` or ``[1]`` for ``"tensor"``)."""
    check_granularity(granularity)
    dtype_name(dtype)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if granularity == "row" else w.abs().amax().reshape(1)
    scale = scale_for(amax, dtype)
    return encode(w, scale[:, None], dtype), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(``qweight`` float8 ``[N, K]``, ``scale`` ``[N]`` or ``[1]``) -> float32 ``[N, K]``."""
    return decode(qweight) * scale.float()[:, None]


# -- activations --------------------------------------------------------------------------------
def quantize_activation(x2d: torch.Tensor, dtype: torch.dtype, granularity: str,
                        scale_ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2d`` float ``[M, K]`` -> (float8 ``[M, K]``, fp32 scale ``[M, 1]`` (row) or ``[1, 1]``
    (tensor)).  ``amax`` is clamped to ``[EPS, scale_ub]`` before the scale is taken."""
    a = x2d.detach().float().abs()
    amax = a.amax(dim=1, keepdim=True) if granularity == "row" else a.amax().reshape(1, 1)
    scale = scale_for(amax, dtype, scale_ub)
    return encode(x2d, scale, dtype), scale


def fake_quantize_activation(x2d: torch.Tensor, dtype: torch.dtype, granularity: str,
                             scale_ub: float | None) -> torch.Tensor:
    """What the activation becomes: ``dequant(quant(x2d))`` in fp32 ``[M, K]``."""
    q, scale = quantize_activation(x2d, dtype, granularity, scale_ub)
    return decode(q) * scale


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not supported; valid: {', '.join(GRANULARITIES)}")


def nbytes(n: int, k: int, granularity: str = "row") -> int:
    """Exact stored bytes of an ``[n, k]`` float8 weight (codes + fp32 scales)."""
    return n * k + (n if granularity == "row" else 1) * SCALE_DTYPE.itemsize
