"""VPTQ weights (Liu et al. 2024, *VPTQ: Extreme Low-bit Vector Post-Training Quantization*): vectors of
``v`` consecutive *output* rows of one input column, each replaced by the index of a codebook vector
(plus, optionally, the index of a residual codebook vector), a few outlier columns in a codebook of
their own, a column permutation and a per-column scale and bias.  The layout is the VPTQ library's
``VQuantLinear`` with ``is_indice_packed=True`` (``vector_quant_dim="out"``, the only one it runs),
tensor for tensor, so a checkpoint loads and writes back without conversion.

Sizes of an ``[N, K]`` weight (:class:`Layout`): ``G`` codebook groups (``group_num``) of ``gs``
columns (``group_size``) after ``o`` outlier columns, ``o + G * gs = K``; ``R = ceil(N / v)`` index
rows (``N`` padded to whole vectors; the padded rows are dropped); ``ib = log2(C)`` and
``rb = log2(Cr)`` (0 without residual) index bits, ``tb = ib + rb``.

Stored tensors (``dt`` = the codebook dtype, bf16 / fp16 / fp32; an absent part is an empty ``(0,)``):

- ``indices`` int32 ``[G, R, ceil(gs * tb / 32)]``: per ``(g, r)`` one little-endian bit stream of the
  ``gs`` merged indices ``(res << ib) | idx`` of ``tb`` bits each, index ``c`` at bits
  ``c*tb .. c*tb + tb - 1`` (least significant first) of the 32-bit words (VPTQ's ``pack_index``);
- ``centroids`` ``dt`` ``[G, C * v]`` (codebook ``g``'s vector ``t`` at ``[g, t*v : (t+1)*v]``);
- ``res_centroids`` ``dt`` ``[G, Cr * v]``;
- ``outlier_indices`` int16 ``[1, ceil(N / vo), o]`` (uint16 values in int16 bits, unpacked),
  ``outlier_centroids`` ``dt`` ``[1, Co * vo]``;
- ``perm`` int16 ``[K]`` (uint16 values: ``K <= 65536``);
- ``weight_scale``, ``weight_bias`` ``dt`` ``[K]``.

Dequantization (VPTQ's ``dequant`` order; fxquant computes every step in fp32 from the stored values):

1. main part ``M[r*v + j, g*gs + c] = centroids[g, idx[g,r,c]*v + j] (+ res_centroids[g, res[g,r,c]*v + j])``;
2. outliers ``O[r*vo + j, c] = outlier_centroids[0, oidx[0,r,c]*vo + j]``; ``Wp = [O | M][:N]``;
3. permutation ``W[:, perm[j]] = Wp[:, j]`` (VPTQ: ``Wp[:, argsort(perm)]``);
4. norm ``W = W * weight_scale + weight_bias`` (per input column).

VPTQ's own paths round in the model dtype between steps (its CUDA kernel adds the two codebook vectors in
fp16 / bf16, then one fused multiply-add; its torch path rounds after each of the three operations), so
its weight equals this fp32 weight rounded to its dtype up to those intermediate roundings (one unit in
the last place of the model dtype at most per step); without residual and norm it is this weight exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: largest codebook (VPTQ's unpacked indices are uint16)
MAX_CENTROIDS = 1 << 16
#: codes decoded per block by :func:`dequantize` (bounds the temporaries)
BLOCK_ELEMENTS = 1 << 22
_EMPTY = (0,)


@dataclass(frozen=True)
class Layout:
    """The sizes of one VPTQ weight (module docstring).  ``num_res_centroids`` 0: no residual codebook;
    ``outlier_size`` 0: no outlier columns."""

    out_features: int
    in_features: int
    vector_len: int
    num_centroids: int
    num_res_centroids: int = 0
    outlier_size: int = 0
    outlier_vector_len: int = 1
    num_outlier_centroids: int = 0
    group_num: int = 1
    enable_perm: bool = False
    enable_norm: bool = False

    @property
    def group_size(self) -> int:
        return (self.in_features - self.outlier_size) // max(self.group_num, 1)

    @property
    def index_bits(self) -> int:
        return index_bits(self.num_centroids)

    @property
    def res_bits(self) -> int:
        return index_bits(self.num_res_centroids) if self.num_res_centroids else 0

    @property
    def total_bits(self) -> int:
        return self.index_bits + self.res_bits

    @property
    def rows(self) -> int:
        """Index rows ``R = ceil(N / v)``."""
        return -(-self.out_features // self.vector_len)

    @property
    def words(self) -> int:
        return packed_words(self.group_size, self.total_bits)

    @property
    def outlier_rows(self) -> int:
        return -(-self.out_features // self.outlier_vector_len) if self.outlier_size else 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's shape (absent parts ``(0,)``)."""
        g, k = self.group_num, self.in_features
        return {"indices": (g, self.rows, self.words),
                "centroids": (g, self.num_centroids * self.vector_len),
                "res_centroids": (g, self.num_res_centroids * self.vector_len) if self.num_res_centroids else _EMPTY,
                "outlier_indices": (1, self.outlier_rows, self.outlier_size) if self.outlier_size else _EMPTY,
                "outlier_centroids": ((1, self.num_outlier_centroids * self.outlier_vector_len)
                                      if self.outlier_size else _EMPTY),
                "perm": (k,) if self.enable_perm else _EMPTY,
                "weight_scale": (k,) if self.enable_norm else _EMPTY,
                "weight_bias": (k,) if self.enable_norm else _EMPTY}

    def problem(self) -> str | None:
        """Why these sizes are not a valid layout (``None`` when they are)."""
        for name in ("out_features", "in_features"):
            if getattr(self, name) < 1:
                return f"{name}={getattr(self, name)} must be >= 1"
        if self.vector_len < 1 or (self.outlier_size and self.outlier_vector_len < 1):
            return "vector lengths must be >= 1"
        for name in ("num_centroids", "num_res_centroids", "num_outlier_centroids"):
            c = getattr(self, name)
            if (c or name == "num_centroids") and not is_codebook_size(c):
                return f"{name}={c} must be a power of two in 2..{MAX_CENTROIDS}"
        if self.outlier_size and not self.num_outlier_centroids:
            return f"outlier_size={self.outlier_size} needs num_outlier_centroids"
        if not 0 <= self.outlier_size < self.in_features:
            return f"outlier_size={self.outlier_size} must be in 0..in_features - 1 = {self.in_features - 1}"
        rest = self.in_features - self.outlier_size
        if self.group_num < 1 or rest % self.group_num:
            return (f"group_num={self.group_num} must divide the {rest} non-outlier columns "
                    f"(in_features {self.in_features} - outlier_size {self.outlier_size})")
        if self.enable_perm and self.in_features > 1 << 16:
            return f"a permutation of in_features={self.in_features} > 65536 columns does not fit int16 (uint16)"
        return None


def index_bits(num_centroids: int) -> int:
    return max(1, math.ceil(math.log2(num_centroids)))


def is_codebook_size(c) -> bool:
    return type(c) is int and 2 <= c <= MAX_CENTROIDS and c & (c - 1) == 0


def packed_words(count: int, bits: int) -> int:
    """int32 words of one packed row of ``count`` indices of ``bits`` bits."""
    return -(-count * bits // 32)


# ---- the index bit streams -------------------------------------------------------------------------------
def _positions(count: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(word, shift)`` int64 ``[count]``: where index ``c`` starts in its row's stream (made per call: a cached
    tensor would leak into fake-tensor tracing)."""
    start = torch.arange(count, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def pack_indices(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[..., count]`` (integers ``< 2**bits``, ``bits`` 1..32) -> int32
    ``[..., ceil(count*bits/32)]``: each row a little-endian bit stream (module docstring)."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits} is not supported; valid: 1..32")
    lead, count = codes.shape[:-1], codes.shape[-1]
    words = packed_words(count, bits)
    c = codes.reshape(-1, count).to(torch.int64) & ((1 << bits) - 1)
    word, shift = _positions(count, bits, codes.device)
    acc = torch.zeros(c.shape[0], words + 1, dtype=torch.int64, device=codes.device)
    # bit ranges never overlap, so a sum is an OR; the part past bit 31 goes to the next word
    acc.index_add_(1, word, (c << shift) & 0xFFFFFFFF)
    acc.index_add_(1, word + 1, c >> (32 - shift))  # shift 0: c >> 32 == 0 (codes < 2**32)
    acc = acc[:, :words]
    acc = torch.where(acc >= 1 << 31, acc - (1 << 32), acc)
    return acc.to(torch.int32).reshape(*lead, words)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: int32 ``[..., W]`` -> int64 ``[..., count]``."""
    if packed.dtype != torch.int32 or packed.shape[-1] != packed_words(count, bits):
        raise ValueError(f"{count} indices of {bits} bits pack into int32 [..., {packed_words(count, bits)}], "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], -1)  # a zero word after the last: the high half's source
    word, shift = _positions(count, bits, packed.device)
    both = w[..., word] | (w[..., word + 1] << 32)  # bits >= 63 may wrap: only bits shift..shift+31 are kept
    return (both >> shift) & ((1 << bits) - 1)


def merge(idx: torch.Tensor, res: torch.Tensor | None, ib: int) -> torch.Tensor:
    """``(res << ib) | idx`` (int64), the merged index VPTQ packs."""
    idx = idx.to(torch.int64)
    return idx if res is None else (res.to(torch.int64) << ib) | idx


def to_uint16_bits(values: torch.Tensor) -> torch.Tensor:
    """Integers in ``0 .. 65535`` -> int16 holding their bits (VPTQ's ``uint16`` viewed as ``int16``)."""
    v = values.to(torch.int64)
    return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16)


def from_uint16_bits(t: torch.Tensor) -> torch.Tensor:
    """int16 (or float16 bit patterns: VPTQ's ``indices_as_float``) -> int64 in ``0 .. 65535``."""
    if t.dtype == torch.float16:
        t = t.view(torch.int16)
    return t.to(torch.int64) & 0xFFFF


# ---- dequantize ------------------------------------------------------------------------------------------
def _vectors(book: torch.Tensor, groups: int, length: int) -> torch.Tensor:
    return book.reshape(groups, -1, length).float()


def decode_main_rows(indices: torch.Tensor, centroids: torch.Tensor, res_centroids: torch.Tensor, lay: Layout,
                     r0: int, r1: int) -> torch.Tensor:
    """Index rows ``r0 .. r1`` of the main part -> fp32 ``[(r1 - r0) * v, G * gs]`` (rows of ``Wp`` from
    ``r0 * v``, before the outlier columns, the permutation and the norm)."""
    g, v, gs = lay.group_num, lay.vector_len, lay.group_size
    codes = unpack_indices(indices[:, r0:r1], lay.total_bits, gs)  # [G, R', gs]
    gi = torch.arange(g, device=codes.device)[:, None, None]
    vals = _vectors(centroids, g, v)[gi, codes & ((1 << lay.index_bits) - 1)]  # [G, R', gs, v]
    if lay.num_res_centroids:
        vals = vals + _vectors(res_centroids, g, v)[gi, codes >> lay.index_bits]
    return vals.permute(1, 3, 0, 2).reshape((r1 - r0) * v, g * gs)


def decode_outlier_rows(outlier_indices: torch.Tensor, outlier_centroids: torch.Tensor, lay: Layout,
                        n0: int, n1: int) -> torch.Tensor:
    """Rows ``n0 .. n1`` of the outlier columns -> fp32 ``[n1 - n0, o]``."""
    vo = lay.outlier_vector_len
    r0, r1 = n0 // vo, -(-n1 // vo)
    codes = from_uint16_bits(outlier_indices[0, r0:r1])  # [R', o]
    vals = _vectors(outlier_centroids, 1, vo)[0][codes]  # [R', o, vo]
    rows = vals.permute(0, 2, 1).reshape((r1 - r0) * vo, lay.outlier_size)
    return rows[n0 - r0 * vo: n1 - r0 * vo]


def decode_permuted_rows(t: dict[str, torch.Tensor], lay: Layout, n0: int, n1: int) -> torch.Tensor:
    """Rows ``n0 .. n1`` of ``Wp = [O | M]`` (columns in the stored order) -> fp32 ``[n1 - n0, K]``."""
    v = lay.vector_len
    r0, r1 = n0 // v, -(-n1 // v)
    main = decode_main_rows(t["indices"], t["centroids"], t["res_centroids"], lay, r0, r1)[n0 - r0 * v: n1 - r0 * v]
    if not lay.outlier_size:
        return main
    return torch.cat([decode_outlier_rows(t["outlier_indices"], t["outlier_centroids"], lay, n0, n1), main], 1)


def perm_indices(perm: torch.Tensor) -> torch.Tensor:
    """The stored ``perm`` as int64 column numbers."""
    return from_uint16_bits(perm)


def decode_rows(t: dict[str, torch.Tensor], lay: Layout, n0: int, n1: int) -> torch.Tensor:
    """Rows ``n0 .. n1`` of the final ``W`` (permutation and norm applied) -> fp32 ``[n1 - n0, K]``."""
    wp = decode_permuted_rows(t, lay, n0, n1)
    if lay.enable_perm:
        w = torch.empty_like(wp)
        w[:, perm_indices(t["perm"])] = wp
    else:
        w = wp
    if lay.enable_norm:
        w = w * t["weight_scale"].float() + t["weight_bias"].float()
    return w


def dequantize(t: dict[str, torch.Tensor], lay: Layout) -> torch.Tensor:
    """The stored tensors (names of the module docstring) -> float32 ``[N, K]``."""
    n, k = lay.out_features, lay.in_features
    out = torch.empty(n, k, device=t["indices"].device)
    step = max(lay.vector_len * lay.outlier_vector_len, BLOCK_ELEMENTS // max(k, 1))
    step -= step % math.lcm(lay.vector_len, lay.outlier_vector_len)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        out[n0:n1] = decode_rows(t, lay, n0, n1)
    return out


def nbytes(lay: Layout, dtype: torch.dtype) -> int:
    """Exact stored bytes of a weight with this layout and codebook dtype."""
    size = {"indices": 4, "outlier_indices": 2, "perm": 2}
    return sum(math.prod(s) * size.get(name, dtype.itemsize) for name, s in lay.shapes().items() if s != _EMPTY)
