"""``fxquant::linear_aqlm``: additive-quantization (AQLM) weight-only linear.

``y = x @ W.T + bias`` with ``W[o*og + r, j*ig + i] = scales[o] * sum_c codebooks[c, codes[o, j, c], r, i]``;
layout, code storage (the aqlm library's signed int8 / int16) and exactness in :mod:`fxquant.formats.aqlm`.

CPU (every path under the ``compute_dtype`` policy of :func:`._cpu.numerics`; fp32 arithmetic on x's
values, rounded to bf16 once where the policy says):

- **small M, codebooks of at most 256 entries** (``M <= LUT_MAX_ROWS``, ``2**B * og <= N``): the
  codeword-by-activation table.  For each row of x, each in group ``j``, codebook ``c`` and entry ``e``,
  ``T[j, c, e, r] = x[j*ig : (j+1)*ig] · codebooks[c, e, r, :]`` (one small GEMM: ``G*M*2**B*og*ig`` MACs
  per row, a few hundred KB at most); then ``y[o*og + r] = scales[o] * sum_{j,c} T[j, c, codes[o, j, c], r]``,
  one table lookup per stored code instead of ``ig`` multiply-adds per weight.  The lookups run as one
  ``embedding_bag`` (sum) over the table transposed to ``[entries, M]``, so every row of x shares each
  lookup, with the table offsets of the codes computed once per weight and cached
  (:func:`_lut_index`, int32, 4 bytes per stored code).
- **otherwise** (larger M, or ``B > 8``: a 2**16-entry table would cost more than decoding the weight):
  blocks of rows decoded by codebook gathers (:func:`fxquant.formats.aqlm.decode_rows`, fp32 sums, scaled)
  into a reused buffer and multiplied while in cache (:func:`._dequant_gemm.blocked_linear`).

CUDA: the Triton kernel in :mod:`fxquant.kernels.aqlm` (codewords gathered and summed into the weight
tile in registers, then ``tl.dot``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import aqlm as fmt
from ..kernels import native_aqlm
from . import _cpu
from . import _validate as v
from ._linear import LinearOpDef, define

OP_NAME = "linear_aqlm"

#: Largest M for the table path (the blocked decode + GEMM above).  Measured with tools/bench_aqlm_ops.py (2 threads,
#: the 2-core Zen 4 shared with other jobs, minimum us, table / blocked): M = 4: 1536x576 2x8-g8 317 / 536,
#: 576x1536 1x8-g4 468 / 555, 576x576 2x8-g8 185 / 195, 4096x4096 2x8-g8 9784 / 17318; M = 8: 624 / 605,
#: 926 / 658, 346 / 240, 21013 / 24647 (the table's cost grows with M, the decode's does not).
LUT_MAX_ROWS = 4


def dequantize_weight(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, num_codebooks: int,
                      nbits_per_codebook: int, in_group_size: int, out_group_size: int, out_features: int,
                      in_features: int) -> torch.Tensor:
    """Stored tensors -> float32 ``[out_features, in_features]``."""
    return fmt.dequantize(codes, codebooks, scales, nbits_per_codebook, out_features, in_features)


def check(x: torch.Tensor, bias: torch.Tensor | None, codes: torch.Tensor, codebooks: torch.Tensor,
          scales: torch.Tensor, num_codebooks: int, nbits_per_codebook: int, in_group_size: int,
          out_group_size: int, out_features: int, in_features: int) -> None:
    """``codes`` int8 (B <= 8) / int16 ``[O, G, M]``; ``codebooks`` fp16 / bf16 / fp32 ``[M, 2**B, og, ig]``;
    ``scales`` fp16 / bf16 / fp32 ``[O, 1, 1, 1]`` (``O = ceil(N/og)``, ``G = ceil(K/ig)``); ``x``
    ``[..., K]``; ``bias`` ``[N]``."""
    op = OP_NAME
    m, b, ig, og = num_codebooks, nbits_per_codebook, in_group_size, out_group_size
    if not (type(m) is int and m >= 1 and b in fmt.NBITS and type(b) is int and type(ig) is int and ig >= 1
            and type(og) is int and og >= 1 and v.is_size(out_features) and v.is_size(in_features)):
        v.size(op, "out_features", out_features)
        v.size(op, "in_features", in_features)
        v.scalars(op, (("num_codebooks", m, type(m) is int and m >= 1, "an integer >= 1"),
                       ("nbits_per_codebook", b, type(b) is int and b in fmt.NBITS, "1..16"),
                       ("in_group_size", ig, type(ig) is int and ig >= 1, "an integer >= 1"),
                       ("out_group_size", og, type(og) is int and og >= 1, "an integer >= 1")))
    o, g = fmt.padded(out_features, in_features, og, ig)
    v.stored(op, "codes", codes, fmt.code_dtype(b), (o, g, m),
             f"[ceil(N/out_group_size), ceil(K/in_group_size), num_codebooks] for {b}-bit codes")
    v.stored_any(op, "codebooks", codebooks, fmt.PARAM_DTYPES, ((m, 1 << b, og, ig),),
                 "[num_codebooks, 2**nbits_per_codebook, out_group_size, in_group_size]")
    v.stored_any(op, "scales", scales, fmt.PARAM_DTYPES, ((o, 1, 1, 1),), "[ceil(N/out_group_size), 1, 1, 1]")
    v.activations(op, x, in_features)
    v.bias(op, bias, out_features)


# ---- the table path ----------------------------------------------------------------------------------------
_LUT_INDEX: dict = {}
_CODEBOOKS_F32: dict = {}


def _lut_index(codes: torch.Tensor, nbits: int, og: int) -> torch.Tensor:
    """int32 ``[O*og, G*M]``: for output row ``o*og + r`` and stored code ``(j, c)`` the offset of its
    table entry ``((j*M + c) * 2**B + code) * og + r`` (cached while ``codes`` lives unchanged)."""
    def build(t: torch.Tensor) -> torch.Tensor:
        o, g, m = t.shape
        base = torch.arange(g * m, dtype=torch.int64).view(1, g * m) << nbits  # (j*M + c) * 2**B
        idx = (base + fmt.unsigned(t, nbits).view(o, g * m)) * og  # [O, G*M]
        rows = idx[:, None, :] + torch.arange(og, dtype=torch.int64).view(1, og, 1)
        return rows.reshape(o * og, g * m).to(torch.int32)
    return _cpu.memo_per_tensor(_LUT_INDEX, codes, build)


def _codebooks_f32(codebooks: torch.Tensor) -> torch.Tensor:
    """fp32 ``[M*2**B*og, ig]`` copy of the codebooks (cached)."""
    return _cpu.memo_per_tensor(_CODEBOOKS_F32, codebooks,
                                lambda t: t.float().reshape(-1, t.shape[-1]).contiguous())


def lut_applies(m_rows: int, nbits: int, out_group_size: int, out_features: int) -> bool:
    """Whether the table path computes ``m_rows`` rows (module docstring)."""
    return m_rows <= LUT_MAX_ROWS and nbits <= 8 and (1 << nbits) * out_group_size <= max(out_features, 1)


def lut_linear(x2: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, nbits: int,
               out_features: int) -> torch.Tensor:
    """The table path: ``x2`` ``[M, G*ig]`` (the stored, padded width; any float dtype, used in fp32)
    -> fp32 ``[M, out_features]`` without bias."""
    m = x2.shape[0]
    og, ig = codebooks.shape[2], codebooks.shape[3]
    g = codes.shape[1]
    table = torch.mm(x2.float().reshape(m * g, ig), _codebooks_f32(codebooks).t())  # [M*G, M_c*2^B*og]
    table_t = table.view(m, -1).t().contiguous()  # [G*M_c*2^B*og, M]: one lookup serves every row of x
    idx = _lut_index(codes, nbits, og)[:out_features]
    y = F.embedding_bag(idx, table_t, mode="sum")  # [N, M]
    row_scale = scales.float().view(-1).repeat_interleave(og)[:out_features] if og > 1 else \
        scales.float().view(-1)[:out_features]
    return y.mul_(row_scale[:, None]).t()


def _cpu_fast(x2, codes, codebooks, scales, num_codebooks, nbits_per_codebook, in_group_size, out_group_size,
              out_features, in_features, *, nm: _cpu.Numerics):
    if not lut_applies(x2.shape[0], nbits_per_codebook, out_group_size, out_features):
        return None  # the blocked decode + GEMM (block_decoder)
    y = native_aqlm.lut_gemv(x2, codes, codebooks, scales, out_features=out_features, round_x=nm.round_x)
    if y is None:  # no native library: the same table, looked up by embedding_bag
        y = lut_linear(nm.rounded(x2), codes, codebooks, scales, nbits_per_codebook, out_features)
    return y


def _block_decoder(codes, codebooks, scales, num_codebooks, nbits_per_codebook, in_group_size, out_group_size,
                   out_features, in_features, dtype):
    """Rows of the scaled ``W`` (at the stored width ``G*ig``) decoded into the GEMM's buffer."""
    og = out_group_size
    native = native_aqlm.decoder(codes, codebooks, scales)

    def groups(o0: int, o1: int, out: torch.Tensor) -> None:
        if native is None or not native(o0, o1, out):
            fmt.decode_rows(codes, codebooks, scales, nbits_per_codebook, o0, o1, out)

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        o0, o1 = r0 // og, -(-r1 // og)
        if (o1 - o0) * og == r1 - r0:
            groups(o0, o1, out)
        else:  # a partial last out group: decode it whole, keep its real rows
            tmp = torch.empty((o1 - o0) * og, out.shape[1], dtype=out.dtype)
            groups(o0, o1, tmp)
            out.copy_(tmp[: r1 - r0])
    return decode, None, og


def _cuda(x2, codes, codebooks, scales, *, bias, num_codebooks, nbits_per_codebook, in_group_size, out_group_size,
          out_features, in_features):
    from ..kernels import aqlm as kernel

    return kernel.aqlm_linear(x2, codes, codebooks, scales, bias, num_codebooks=num_codebooks,
                              nbits_per_codebook=nbits_per_codebook, in_group_size=in_group_size,
                              out_group_size=out_group_size, out_features=out_features, in_features=in_features)


OP = LinearOpDef(
    name=OP_NAME, tensors=("codes", "codebooks", "scales"),
    scalars=(("num_codebooks", "int"), ("nbits_per_codebook", "int"), ("in_group_size", "int"),
             ("out_group_size", "int"), ("out_features", "int"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda out_features, **_: out_features, check=check,
    cpu_fast=_cpu_fast, cpu_fast_any_m=True, block_decoder=_block_decoder, cuda=_cuda,
    stored_in_features=lambda in_features, in_group_size, **_: -(-in_features // in_group_size) * in_group_size,
    doc="x [..., K]; codes int8/int16 [ceil(N/og), ceil(K/ig), M] (signed storage of B-bit codes); codebooks "
        "fp16/bf16/fp32 [M, 2**B, og, ig]; scales [ceil(N/og), 1, 1, 1]; bias [N] -> [..., N]; "
        "W[o*og+r, j*ig+i] = scales[o] * sum_c codebooks[c, codes[o, j, c], r, i]",
)
linear_aqlm = define(OP)
reference = OP.reference
