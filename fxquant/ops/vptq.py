"""``fxquant::linear_vptq``: VPTQ vector-quantized linear (layout: :mod:`fxquant.formats.vptq`).

``y = x @ W.T + bias`` with ``W`` the VPTQ dequantization (codebook vectors along the output dim, an
optional residual codebook, outlier columns, a column permutation and a per-column scale / bias), which
the reference builds in fp32 (:func:`fxquant.formats.vptq.dequantize`).

The permutation and the norm move to the activations: with ``Wp`` the stored-order weight (before step 3
of the format) and ``W[:, perm[j]] = Wp[:, j] * s[perm[j]] + b[perm[j]]``,
``x @ W.T = (x[:, perm] * s[perm]) @ Wp.T + (x @ b)``: one gather of x's columns, a product and a
per-row sum, so every CPU and Triton path below works on ``Wp`` in the stored column order.

CPU (any M, under the ``compute_dtype`` policy of :func:`._cpu.numerics`; everything in fp32 on x's
values, rounded to bf16 first where the policy says, the result cast to x's dtype):

- up to :func:`native_max_rows` rows (``4 v``), the native GEMV (:mod:`fxquant.kernels.native_vptq`): the index streams
  read in place, one fused multiply-add of ``v`` lanes per index and row of x;
- without the native library, small M (``M * G * R * C <= LUT_MAX_ELEMENTS`` and ``C <= LUT_MAX_CENTROIDS``):
  the *centroid table* ``A[m, g, r, t] = Σ_{c : idx[g, r, c] = t} x'[m, c]``, the activations summed per
  (output block, centroid) by one ``index_add`` over the indices, then ``y[m, r*v + j] = Σ_{g, t} A[m, g, r, t]
  C_g[t, j]`` (one batched GEMM against the codebooks; the residual codebook the same way with its own table,
  outlier columns as a small dense product).  Work ``M (N K / v + N C)`` instead of decoding ``N K`` weights;
- otherwise rows of ``Wp * s[perm]`` decoded a block at a time (by the native decoder, else torch) into a
  reused buffer and multiplied while in cache (:func:`._dequant_gemm.blocked_linear`; bf16 GEMM only where a
  bf16 result is allowed).

CUDA: the Triton kernel of :mod:`fxquant.kernels.vptq` (indices unpacked and codebooks gathered per tile).
"""
from __future__ import annotations

import functools
import math

import torch

from ..formats import vptq as fmt
from . import _cpu
from . import _validate as v
from ._dequant_gemm import block_rows, blocked_linear
from ._linear import LinearOpDef, define

OP_NAME = "linear_vptq"
TENSORS = ("indices", "centroids", "res_centroids", "outlier_indices", "outlier_centroids", "perm",
           "weight_scale", "weight_bias")
SCALARS = (("vector_len", "int"), ("num_centroids", "int"), ("num_res_centroids", "int"), ("outlier_size", "int"),
           ("outlier_vector_len", "int"), ("num_outlier_centroids", "int"), ("group_num", "int"),
           ("enable_perm", "bool"), ("enable_norm", "bool"), ("out_features", "int"), ("in_features", "int"))
_SCALAR_NAMES = tuple(n for n, _ in SCALARS)

#: Largest centroid table ``M * G * R * C`` (fp32 elements) of the small-M path.
LUT_MAX_ELEMENTS = 1 << 21
#: The native GEMV (:mod:`fxquant.kernels.native_vptq`) runs up to ``NATIVE_ROWS_PER_LANE * v`` rows of x (at
#: least 8); above, rows of the weight decoded by the native decoder and a dense GEMM.  Its work per row of x is
#: one decode per index and ``v`` lanes, so longer vectors carry it further.  Measured (4096 x 4096, one thread,
#: loaded 2-core Zen 4, ms, GEMV / decode + GEMM / dense fp32): v8-c256-r256 M=1 2.4 / 20.0 / 4.4, M=32 23.5 /
#: 33.4, M=64 46.2 / 45.4; v4-c256 M=16 23.7 / 25.7, M=32 46.7 / 31.1.
NATIVE_ROWS_PER_LANE = 4


def native_max_rows(lay: fmt.Layout) -> int:
    """Largest M the native GEMV takes for this layout (``NATIVE_ROWS_PER_LANE``)."""
    return max(8, NATIVE_ROWS_PER_LANE * lay.vector_len)

#: Largest codebook the table path takes: its GEMM against the codebooks costs ``N C`` per row of x,
#: which beats decoding ``N K`` weights only while ``C`` is well below ``K``.
LUT_MAX_CENTROIDS = 1024


@functools.lru_cache(maxsize=256)
def _layout(vector_len, num_centroids, num_res_centroids, outlier_size, outlier_vector_len, num_outlier_centroids,
            group_num, enable_perm, enable_norm, out_features, in_features):
    """``(Layout, problem or None)`` of the op's scalars (cached: the check runs on every call)."""
    ints = (vector_len, num_centroids, num_res_centroids, outlier_size, outlier_vector_len, num_outlier_centroids,
            group_num, out_features, in_features)
    if not all(type(i) is int for i in ints) or not all(type(b) is bool for b in (enable_perm, enable_norm)):
        return None, "the size scalars must be ints and enable_perm / enable_norm bools"
    lay = fmt.Layout(out_features=out_features, in_features=in_features, vector_len=vector_len,
                     num_centroids=num_centroids, num_res_centroids=num_res_centroids, outlier_size=outlier_size,
                     outlier_vector_len=outlier_vector_len if outlier_size else 1,
                     num_outlier_centroids=num_outlier_centroids if outlier_size else 0, group_num=group_num,
                     enable_perm=enable_perm, enable_norm=enable_norm)
    if outlier_size and (outlier_vector_len < 1 or not fmt.is_codebook_size(num_outlier_centroids)):
        return lay, (f"outlier_size={outlier_size} needs outlier_vector_len >= 1 (got {outlier_vector_len}) and "
                     f"num_outlier_centroids a power of two in 2..{fmt.MAX_CENTROIDS} (got {num_outlier_centroids})")
    return lay, lay.problem()


def layout_of(scalars: dict) -> fmt.Layout:
    """The :class:`~fxquant.formats.vptq.Layout` of the op's scalar arguments (``ValueError`` if invalid)."""
    lay, problem = _layout(*(scalars[n] for n in _SCALAR_NAMES))
    if problem:
        v.fail(OP_NAME, problem)
    return lay


_INDEX_DTYPES = {"indices": (torch.int32,), "outlier_indices": (torch.int16,), "perm": (torch.int16,)}
_LAYOUTS = {"indices": "[G, ceil(N/v), ceil(gs*bits/32)]", "centroids": "[G, C*v]", "res_centroids": "[G, Cr*v]",
            "outlier_indices": "[1, ceil(N/vo), outlier_size]", "outlier_centroids": "[1, Co*vo]",
            "perm": "[K]", "weight_scale": "[K]", "weight_bias": "[K]"}


def check(x: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor, centroids: torch.Tensor,
          res_centroids: torch.Tensor, outlier_indices: torch.Tensor, outlier_centroids: torch.Tensor,
          perm: torch.Tensor, weight_scale: torch.Tensor, weight_bias: torch.Tensor, vector_len: int,
          num_centroids: int, num_res_centroids: int, outlier_size: int, outlier_vector_len: int,
          num_outlier_centroids: int, group_num: int, enable_perm: bool, enable_norm: bool, out_features: int,
          in_features: int) -> None:
    """Every stored tensor of the dtype and the exact shape the scalars imply (:mod:`fxquant.formats.vptq`;
    an absent part ``(0,)``); ``x`` ``[..., in_features]``; ``bias`` ``[out_features]``."""
    lay, problem = _layout(vector_len, num_centroids, num_res_centroids, outlier_size, outlier_vector_len,
                           num_outlier_centroids, group_num, enable_perm, enable_norm, out_features, in_features)
    if problem:
        v.fail(OP_NAME, problem)
    given = {"indices": indices, "centroids": centroids, "res_centroids": res_centroids,
             "outlier_indices": outlier_indices, "outlier_centroids": outlier_centroids, "perm": perm,
             "weight_scale": weight_scale, "weight_bias": weight_bias}
    for name, shape in _shapes(lay).items():
        t = given[name]
        dtypes = _INDEX_DTYPES.get(name, fmt.FLOAT_DTYPES)
        if t.dtype not in dtypes or t.shape != shape:
            v.stored_any(OP_NAME, name, t, dtypes, (tuple(shape),), _LAYOUTS[name] if shape != (0,) else "(absent)")
    v.activations(OP_NAME, x, in_features)
    v.bias(OP_NAME, bias, out_features)


@functools.lru_cache(maxsize=256)
def _shapes(lay: fmt.Layout) -> dict:
    return {name: torch.Size(s) for name, s in lay.shapes().items()}


def dequantize_weight(indices, centroids, res_centroids, outlier_indices, outlier_centroids, perm, weight_scale,
                      weight_bias, **scalars) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, K]``."""
    t = dict(indices=indices, centroids=centroids, res_centroids=res_centroids, outlier_indices=outlier_indices,
             outlier_centroids=outlier_centroids, perm=perm, weight_scale=weight_scale, weight_bias=weight_bias)
    return fmt.dequantize(t, layout_of(scalars))


# ---- CPU -------------------------------------------------------------------------------------------------
def moved_to_activations(x: torch.Tensor, t: dict, lay: fmt.Layout, scale_x: bool) -> tuple:
    """``(x', s_p, beta)``: ``x'`` fp32 ``[M, K]`` the columns of ``x`` in the stored order (times ``s[perm]``
    when ``scale_x``), ``s_p`` the scale in that order (``None`` without norm), ``beta`` fp32 ``[M]`` = ``x @ b``
    (``None`` without norm): ``x @ W.T = x' @ (Wp [* s_p]).T + beta`` (module docstring)."""
    xf = x.float()
    beta = s_p = None
    if lay.enable_norm:
        beta = xf @ t["weight_bias"].float()
        s_p = t["weight_scale"].float()
    if lay.enable_perm:
        p = fmt.perm_indices(t["perm"])
        xf = xf[:, p]
        s_p = None if s_p is None else s_p[p]
    if scale_x and s_p is not None:
        xf = xf * s_p
    return xf, s_p, beta


def _table_part(xm: torch.Tensor, codes: torch.Tensor, book: torch.Tensor, lay: fmt.Layout, count: int) -> torch.Tensor:
    """``Σ_c x[m, c] book_g[codes[g, r, c]]`` -> fp32 ``[M, R * v]`` through the centroid table."""
    m, (g, r, gs), vl = xm.shape[0], codes.shape, lay.vector_len
    flat = (torch.arange(g * r, dtype=torch.int64)[:, None] * count + codes.reshape(g * r, gs)).reshape(-1)
    src = xm.reshape(m, g, 1, gs).expand(m, g, r, gs).reshape(m, -1)
    table = torch.zeros(m, g * r * count)
    table.index_add_(1, flat, src)
    table = table.view(m, g, r, count).transpose(0, 1).reshape(g, m * r, count)
    y = torch.bmm(table, book.reshape(g, count, vl).float())  # [G, M*R, v]
    return (y.sum(0) if g > 1 else y[0]).reshape(m, r * vl)


def table_linear(xp: torch.Tensor, t: dict, lay: fmt.Layout) -> torch.Tensor:
    """The small-M path: ``xp`` fp32 ``[M, K]`` (stored column order, scaled) -> ``xp @ Wp.T`` fp32 ``[M, N]``."""
    n, o, gs = lay.out_features, lay.outlier_size, lay.group_size
    codes = fmt.unpack_indices(t["indices"], lay.total_bits, gs)
    xm = xp[:, o:].contiguous()
    y = _table_part(xm, codes & ((1 << lay.index_bits) - 1), t["centroids"], lay, lay.num_centroids)
    if lay.num_res_centroids:
        y += _table_part(xm, codes >> lay.index_bits, t["res_centroids"], lay, lay.num_res_centroids)
    y = y[:, :n]
    if o:
        outl = fmt.decode_outlier_rows(t["outlier_indices"], t["outlier_centroids"], lay, 0, n)
        y = torch.addmm(y, xp[:, :o], outl.t())
    return y


def table_applies(rows: int, lay: fmt.Layout) -> bool:
    big = max(lay.num_centroids, lay.num_res_centroids)
    return big <= LUT_MAX_CENTROIDS and rows * lay.group_num * lay.rows * big <= LUT_MAX_ELEMENTS


def _cpu_fast(x2: torch.Tensor, *, nm: _cpu.Numerics, **kw) -> torch.Tensor:
    from ..kernels import native_vptq

    t = {name: kw.pop(name) for name in TENSORS}
    lay = layout_of(kw)
    xv = nm.rounded(x2)
    m = x2.shape[0]
    y = None
    gemv = m <= native_max_rows(lay)
    if gemv or (table_applies(m, lay) and not native_vptq.available()):
        xp, _, beta = moved_to_activations(xv, t, lay, scale_x=True)
        y = native_vptq.gemv(xp, t, lay) if gemv else None
        if y is None and table_applies(m, lay):
            y = table_linear(xp, t, lay)
    if y is None:
        xp, s_p, beta = moved_to_activations(xv, t, lay, scale_x=False)
        dt = nm.gemm_dtype(x2)
        mult = math.lcm(lay.vector_len, lay.outlier_vector_len)
        rows = max(mult, block_rows(lay.in_features, dt) // mult * mult)
        native = native_vptq.decoder(t, lay, s_p)

        def decode(r0: int, r1: int, out: torch.Tensor) -> None:
            if native is not None and native(r0, r1, out):
                return
            w = fmt.decode_permuted_rows(t, lay, r0, r1)
            out.copy_(w if s_p is None else w.mul_(s_p))
        y = blocked_linear(xp.to(dt) if dt != torch.float32 else xp, lay.out_features, lay.in_features, decode,
                           None, dt, rows)
    return y if beta is None else y.float().add_(beta[:, None])


def _block_decoder(dtype, **kw):
    """Rows of the final ``W`` (the ``compute_dtype=float16`` path)."""
    t = {name: kw.pop(name) for name in TENSORS}
    lay = layout_of(kw)

    def decode(r0: int, r1: int, out: torch.Tensor) -> None:
        out.copy_(fmt.decode_rows(t, lay, r0, r1))
    return decode, None, math.lcm(lay.vector_len, lay.outlier_vector_len)


def _cuda(x2, *, bias, **kw):
    from ..kernels.vptq import vptq_linear

    return vptq_linear(x2, bias=bias, **kw)


OP = LinearOpDef(
    name=OP_NAME, tensors=TENSORS, scalars=SCALARS, dequantize=dequantize_weight,
    out_features=lambda out_features, **_: out_features, check=check, cpu_fast=_cpu_fast, cpu_fast_any_m=True,
    block_decoder=_block_decoder, cuda=_cuda,
    doc="x [..., K]; indices int32 [G, ceil(N/v), ceil(gs*bits/32)] (packed (res << ib) | idx); centroids "
        "[G, C*v]; res_centroids [G, Cr*v] or (0,); outlier_indices int16 [1, ceil(N/vo), o] or (0,); "
        "outlier_centroids [1, Co*vo] or (0,); perm int16 [K] or (0,); weight_scale, weight_bias [K] or (0,); "
        "bias [N] -> [..., N]; W = VPTQ's dequantization (fxquant.formats.vptq)",
)
linear_vptq = define(OP)
reference = OP.reference


