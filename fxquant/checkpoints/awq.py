"""AWQ checkpoints (``quant_method: "awq"``, ``version: "gemm"``: AutoAWQ's ``WQLinear_GEMM``, read by
transformers / GPTQModel and vLLM), loaded packed into fxquant's ``affine`` layers and written from them.

The GEMM layout, per quantized ``nn.Linear`` ``<p>`` (``N`` outputs, ``K`` inputs, 4 bits, ``G = K / g``
groups, ``g = K`` when ``group_size`` is -1; AutoAWQ requires ``K % g == 0`` and ``N % 8 == 0``):

- ``<p>.qweight`` int32 ``[K, N/8]``: row ``k`` holds the codes ``q[k, :]`` packed along N, eight per word,
  nibble ``i`` (bits ``4i .. 4i + 3``) of word ``j`` holding output column ``8j + ORDER[i]`` with
  ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the interleave its CUDA kernel dequantizes in);
- ``<p>.qzeros`` int32 ``[G, N/8]``: the zero points ``z`` (no offset) packed the same way;
- ``<p>.scales`` fp16 ``[G, N]``; ``<p>.bias`` optional.

``W[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n]``.  fxquant holds such a layer as
``affine4-g<g>-fp16`` (codes, integer zeros and scales copied, every value bit for bit).
docs/checkpoints.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..formats import affine as affine_fmt
from ..schemes import Affine, QuantizedWeight
from . import _gptq_awq as common

__all__ = ["load_awq", "save_awq"]

LAYOUT = "AWQ"
BITS = 4
#: nibble i of a word holds column ORDER[i] of its 8 (AutoAWQ's AWQ_ORDER); INVERSE undoes it
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
INVERSE = tuple(ORDER.index(c) for c in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
NAMES = {"qweight", "qzeros", "scales"}


@dataclass(frozen=True)
class AwqLayout:
    group_size: int  # -1: one group per output row


def read_config(qc: Mapping[str, Any]) -> AwqLayout:
    """The layout fields of an AWQ ``quantization_config`` (``ValueError`` naming the field otherwise); the
    others (fusing, kernels, calibration, ``modules_to_not_convert``: the tensors say which layers are
    quantized) are not read."""
    where = "AWQ quantization_config"
    method = qc.get("quant_method", "awq")
    if str(method).lower() != "awq":
        raise ValueError(f"{where}.quant_method={method!r}; valid: 'awq' (use fxquant.load_gptq for 'gptq')")
    bits = qc.get("bits", 4)
    if bits != BITS or type(bits) is not int:
        raise ValueError(f"{where}.bits={bits!r} is not supported; valid: 4 (the GEMM layout packs 8 nibbles a word)")
    group = qc.get("group_size", 128)
    if type(group) is not int or not (group >= 1 or group == -1):
        raise ValueError(f"{where}.group_size={group!r} is not valid; valid: an integer >= 1, or -1 (per channel)")
    if qc.get("zero_point", True) is not True:
        raise ValueError(f"{where}.zero_point={qc.get('zero_point')!r} is not supported; valid: true (the GEMM "
                         "layout stores zero points)")
    version = qc.get("version") or qc.get("format") or "gemm"
    if qc.get("backend") == "llm-awq":
        version = "llm-awq"
    if str(getattr(version, "value", version)).lower() != "gemm":
        raise ValueError(f"{where}.version={version!r} is not supported; valid: 'gemm' (GEMV / llm-awq / marlin / "
                         "exllama layouts pack the codes differently)")
    return AwqLayout(group)


# ---- the packing along N ----------------------------------------------------------------------------------
def unpack_columns(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ``[R, N/8]`` in AWQ's order -> uint8 ``[R, N]`` in column order."""
    u = affine_fmt.unpack_rows(packed, BITS, n)
    return u.reshape(u.shape[0], -1, 8)[:, :, list(INVERSE)].reshape(u.shape[0], n)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, N]`` (N a multiple of 8, values 0..15) -> int32 ``[R, N/8]`` in AWQ's order."""
    r, n = values.shape
    return affine_fmt.pack_rows(values.reshape(r, -1, 8)[:, :, list(ORDER)].reshape(r, n), BITS)


# ---- one layer ------------------------------------------------------------------------------------------
def _check_shape(path: str, n: int, k: int, g: int) -> None:
    if n % 8 or k == 0 or k % g:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r} [{n}, {k}]: the GEMM layout needs out_features a "
                         f"multiple of 8 and in_features a multiple of group_size={g}")


def import_layer(lay: AwqLayout, path: str, t: Mapping[str, torch.Tensor], n: int,
                 k: int) -> tuple[QuantizedWeight, str]:
    """The AWQ tensors of one layer (local names) -> ``(packed weight, scheme string)``."""
    g = k if lay.group_size == -1 else lay.group_size
    _check_shape(path, n, k, g)
    groups = k // g
    qweight = common.expect(t, path, "qweight", (torch.int32,), (k, n // 8), LAYOUT,
                            "int32 [in_features, out_features/8]: the codes packed along N")
    qzeros = common.expect(t, path, "qzeros", (torch.int32,), (groups, n // 8), LAYOUT,
                           "int32 [groups, out_features/8]: the zero points packed along N")
    scales = common.expect(t, path, "scales", affine_fmt.SCALE_DTYPES, (groups, n), LAYOUT,
                           "fp16 [groups, out_features]")
    codes = unpack_columns(qweight, n).t()  # [N, K]
    zero = unpack_columns(qzeros, n).t().contiguous()
    scheme = Affine(bits=BITS, group_size=None if lay.group_size == -1 else g, scale_dtype=scales.dtype)
    try:
        return scheme.packed(affine_fmt.pack_rows(codes, BITS), scales.t().contiguous(), zero, n, k), str(scheme)
    except ValueError as e:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: {e}") from None


def export_layer(path: str, lc: common.LayerCodes, g: int) -> dict[str, torch.Tensor]:
    """:class:`~._gptq_awq.LayerCodes` -> the layer's AWQ GEMM tensors (``ValueError`` naming the layer when
    it has no form in this layout)."""
    n, k = lc.shape
    if lc.bits != BITS:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: {lc.bits}-bit codes; the AWQ GEMM layout stores 4")
    if lc.perm is not None:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: its input columns are permuted (a GPTQ act-order "
                         "layer); AWQ has no g_idx (write it with fxquant.save_gptq)")
    _check_shape(path, n, k, g)
    if lc.scale.shape[1] != k // g:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r} has {lc.scale.shape[1]} groups per row, group_size={g} "
                         f"over {k} inputs needs {k // g}; an AWQ checkpoint has one group size")
    if int(lc.zero.max()) > 15:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: zero point {int(lc.zero.max())} is outside AWQ's "
                         "4-bit 0..15")
    return {"qweight": pack_columns(lc.codes.t()), "qzeros": pack_columns(lc.zero.t()),
            "scales": common.fp16_scales(path, lc.scale, LAYOUT).t().contiguous()}


# ---- the API ----------------------------------------------------------------------------------------------
def load_awq(directory_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module, *,
             config: Mapping | None = None) -> nn.Module:
    """Load an AWQ GEMM checkpoint into the float skeleton ``model`` (CPU or meta device) and return it.

    Every ``nn.Linear`` whose ``<path>.qweight`` the checkpoint holds becomes a packed
    :class:`~fxquant.modules.QuantizedLinear` (``affine4-g<g>-fp16``; an ``nn.Linear`` subclass with its
    own ``forward`` keeps it, its weight a :class:`~fxquant.modules.PackedWeight`); every other tensor
    loads as stored.  ``directory_or_state_dict`` and ``config`` as :func:`fxquant.load_gptq`.  4 bits,
    ``zero_point: true``, ``version: gemm`` only; a missing, extra, mis-shaped or mis-typed tensor, an
    unsupported config value or an unreadable file raises ``ValueError`` naming it, before ``model``
    changes."""
    qc, tensors = common.read_source(directory_or_state_dict, config, model, LAYOUT)
    lay = read_config(qc)
    notes = [f"AWQ GEMM: 4 bits, group_size {lay.group_size}"]
    return common.load(model, tensors, lambda p, t, n, k: import_layer(lay, p, t, n, k), NAMES, LAYOUT, notes)


def save_awq(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (packed by ``fxquant.quantize_`` or :func:`load_awq`) as an AWQ GEMM checkpoint in
    ``directory``: ``model.safetensors`` and ``config.json`` with a ``quantization_config``
    (``quant_method`` awq, ``bits`` 4, ``group_size``, ``zero_point`` true, ``version`` gemm,
    ``modules_to_not_convert``: the layers left in float) that ``transformers.AwqConfig.from_dict`` reads.

    Exportable layers: 4-bit ``affine4-g<g>[-sym]`` / ``-ch`` and ``int4wo-<g>-sym`` (IntX) with one group
    size for all, ``K % g == 0``, ``N % 8 == 0``, scales that are fp16 numbers (symmetric layers are written
    with zero points 8).  Anything else raises ``ValueError`` naming the layer before a file is written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    codes, owners = {}, {}
    for path, scheme, qw, owner in common.packed_layers(model, LAYOUT):
        codes[path], owners[path] = common.layer_codes(path, scheme, qw, LAYOUT), owner
    if not codes:
        raise ValueError("the model has no packed layer: quantize it with fxquant.quantize_ first")
    grouped = {lc.group_size for lc in codes.values() if lc.group_size is not None}
    if len(grouped) > 1:
        raise ValueError(f"{LAYOUT} checkpoint: one group_size for every layer; the model's packed layers have "
                         f"{sorted(grouped)}")
    group = grouped.pop() if grouped else -1
    layers = {p: export_layer(p, lc, lc.shape[1] if group == -1 else group) for p, lc in codes.items()}
    float_layers = common.float_linears(model)
    qc = {"quant_method": "awq", "bits": BITS, "group_size": group, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": float_layers or None}
    common.write(model, directory, layers, owners, qc)
