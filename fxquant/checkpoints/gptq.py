"""GPTQ checkpoints (``quant_method: "gptq"``: AutoGPTQ, GPTQModel, optimum / transformers), loaded packed
into fxquant's ``affine`` layers and written from them.

The layout, per quantized ``nn.Linear`` ``<p>`` (``N`` outputs, ``K`` inputs, ``b`` bits in 2, 3, 4, 8,
``G = ceil(K / g)`` groups, ``g = K`` when ``group_size`` is -1):

- ``<p>.qweight`` int32 ``[K*b/32, N]``: column ``n`` holds row ``n`` of the codes packed along K, code
  ``k`` at bits ``k*b .. k*b + b - 1`` of the column's little-endian bit stream (32/b codes per word for
  b = 2, 4, 8; for b = 3 every 3 words hold 32 codes with codes 10 and 21 split across words, AutoGPTQ's
  10-1-10-1-10 packing, which is the same stream).  So ``qweight.T`` is the affine format's ``qweight``.
- ``<p>.qzeros`` int32 ``[G, N*b/32]``: the zero points packed along N the same way.
  ``checkpoint_format`` ``"gptq"`` (v1, AutoGPTQ) stores ``z - 1``, read as ``(field & (2**b - 1)) + 1``;
  ``"gptq_v2"`` (GPTQModel) stores ``z``.  Symmetric GPTQ has ``z = 2**(b-1)`` (v1 stores ``2**(b-1) - 1``).
- ``<p>.scales`` fp16 ``[G, N]``; ``<p>.g_idx`` int32 ``[K]``, the group of each input column (``k // g``,
  or with ``desc_act`` ``invperm[k] // g`` for the act-order permutation); ``<p>.bias`` optional.

``W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]``.  fxquant holds such a layer as
``affine<b>-g<g>[-sym]-fp16`` (codes, integer zeros and scales copied), and an act-order layer as the
same weight with its columns sorted by group plus the permutation (``linear_affine_perm``): every value
bit for bit, no float weight made.  docs/checkpoints.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..formats import affine as affine_fmt
from ..ops import affine_perm
from ..schemes import Affine, QuantizedWeight
from . import _gptq_awq as common

__all__ = ["load_gptq", "save_gptq"]

LAYOUT = "GPTQ"
BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
NAMES = {"qweight", "qzeros", "scales", "g_idx"}


@dataclass(frozen=True)
class GptqLayout:
    """What a GPTQ ``quantization_config`` says about the stored tensors."""

    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    desc_act: bool
    v2: bool  # checkpoint_format "gptq_v2": qzeros hold z, not z - 1


def read_config(qc: Mapping[str, Any]) -> GptqLayout:
    """The layout fields of a GPTQ ``quantization_config`` (``ValueError`` naming the field otherwise).
    Other fields (calibration, kernels, ``damp_percent`` ...) do not change the stored tensors and are
    not read."""
    where = "GPTQ quantization_config"
    method = qc.get("quant_method", "gptq")
    if str(method).lower() != "gptq":
        raise ValueError(f"{where}.quant_method={method!r}; valid: 'gptq' (use fxquant.load_awq for 'awq')")
    bits = qc.get("bits")
    if type(bits) is not int or bits not in BITS:
        raise ValueError(f"{where}.bits={bits!r} is not supported; valid: {', '.join(map(str, BITS))}")
    group = qc.get("group_size", 128)
    if type(group) is not int or not (group >= 1 or group == -1):
        raise ValueError(f"{where}.group_size={group!r} is not valid; valid: an integer >= 1, or -1 (per channel)")
    flags = {}
    for name, default in (("sym", True), ("desc_act", False)):
        flags[name] = qc.get(name, default)
        if not isinstance(flags[name], bool):
            raise ValueError(f"{where}.{name}={flags[name]!r} is not valid; valid: true, false")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS or qc.get("is_marlin_format"):
        fmt = "marlin (is_marlin_format)" if qc.get("is_marlin_format") else fmt
        raise ValueError(f"{where}.checkpoint_format={fmt!r} is not supported; valid: {', '.join(map(repr, FORMATS))} "
                         "(other formats repack the codes for one kernel)")
    pack = qc.get("pack_dtype", "int32")
    if str(pack).removeprefix("torch.") != "int32":
        raise ValueError(f"{where}.pack_dtype={pack!r} is not supported; valid: 'int32'")
    dynamic = qc.get("dynamic") or {}
    overrides = [key for key in dynamic if not str(key).startswith("-:")] if isinstance(dynamic, Mapping) else [dynamic]
    if overrides:
        raise ValueError(f"{where}.dynamic: per-module overrides ({overrides[0]!r}) are not supported; valid: null, "
                         "{}, or only '-:' (not quantized) entries")
    return GptqLayout(bits, group, flags["sym"], flags["desc_act"], fmt.lower() == "gptq_v2")


# ---- one layer ------------------------------------------------------------------------------------------
def _check_shape(path: str, n: int, k: int, bits: int) -> None:
    if (k * bits) % 32 or (n * bits) % 32 or k == 0:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r} [{n}, {k}]: {bits}-bit codes are packed 32 to {bits} "
                         "int32 words along K (qweight) and N (qzeros); in_features*bits and out_features*bits must "
                         "be multiples of 32")


def _zeros(path: str, qzeros: torch.Tensor, lay: GptqLayout, n: int) -> torch.Tensor:
    """``qzeros`` -> the integer zero points uint8 ``[G, N]`` (v1: stored ``z - 1``)."""
    z = affine_fmt.unpack_rows(qzeros, lay.bits, n)
    if lay.v2:
        return z
    z = z.to(torch.int16) + 1
    if int(z.max()) > 255:
        raise ValueError(f"{LAYOUT} checkpoint: tensor {path + '.qzeros'!r}: a v1 zero point of 256 (stored 255 = "
                         "z - 1) is outside the 8-bit range 0..255 (a zero point 0 written by a v2 -> v1 conversion?)")
    return z.to(torch.uint8)


def _column_order(path: str, g_idx: torch.Tensor | None, k: int, g: int, groups: int) -> torch.Tensor | None:
    """``None`` when column ``k`` is in group ``k // g``; else the permutation sorting the columns by
    group (``ValueError`` when the groups are not ``g`` columns each: not an act-order ``g_idx``)."""
    if g_idx is None:
        return None
    gi, natural = g_idx.long(), torch.arange(k) // g
    if k and (int(gi.min()) < 0 or int(gi.max()) >= groups):
        raise ValueError(f"{LAYOUT} checkpoint: tensor {path + '.g_idx'!r}: groups {int(gi.min())}..{int(gi.max())} "
                         f"outside 0..{groups - 1} (scales has {groups} groups)")
    if torch.equal(gi, natural):
        return None
    perm = torch.sort(gi, stable=True).indices
    if not torch.equal(gi[perm], natural):
        counts = torch.bincount(gi, minlength=groups)
        bad = int((counts != torch.bincount(natural, minlength=groups)).nonzero()[0])
        raise ValueError(f"{LAYOUT} checkpoint: tensor {path + '.g_idx'!r}: group {bad} has {int(counts[bad])} "
                         f"columns; fxquant holds act-order g_idx whose groups have group_size={g} columns (the "
                         "last one the rest), as GPTQ's desc_act writes them")
    return perm.to(torch.int32)


def import_layer(lay: GptqLayout, path: str, t: Mapping[str, torch.Tensor], n: int,
                 k: int) -> tuple[QuantizedWeight, str]:
    """The GPTQ tensors of one layer (local names) -> ``(packed weight, scheme string)``, never through a
    float weight."""
    b = lay.bits
    _check_shape(path, n, k, b)
    g = k if lay.group_size == -1 else lay.group_size
    groups = -(-k // g)
    qweight = common.expect(t, path, "qweight", (torch.int32,), (k * b // 32, n), LAYOUT,
                            "int32 [in_features*bits/32, out_features]: the codes packed along K")
    qzeros = common.expect(t, path, "qzeros", (torch.int32,), (groups, n * b // 32), LAYOUT,
                           "int32 [groups, out_features*bits/32]: the zero points packed along N")
    scales = common.expect(t, path, "scales", affine_fmt.SCALE_DTYPES, (groups, n), LAYOUT,
                           "fp16 [groups, out_features]")
    g_idx = None
    if "g_idx" in t or lay.desc_act:
        g_idx = common.expect(t, path, "g_idx", (torch.int32,), (k,), LAYOUT,
                              "int32 [in_features]: each column's group")
    zero = _zeros(path, qzeros, lay, n).t().contiguous()
    symmetric = lay.sym and bool((zero == 1 << (b - 1)).all())
    perm = _column_order(path, g_idx, k, g, groups)
    rows = qweight.t().contiguous()  # [N, K*b/32]: each row's codes as the affine bit stream
    scheme = Affine(bits=b, group_size=None if lay.group_size == -1 else g, symmetric=symmetric,
                    scale_dtype=scales.dtype)
    scale, zero_point = scales.t().contiguous(), None if symmetric else zero
    try:
        if perm is None:
            return scheme.packed(rows, scale, zero_point, n, k), str(scheme)
        stored = affine_fmt.pack_rows(affine_fmt.unpack_rows(rows, b, k).index_select(1, perm), b)
        qw = affine_perm.packed(stored, scale, zero_point, perm, bits=b, group_size=g, symmetric=symmetric, n=n, k=k)
        return qw, f"{scheme}+perm"
    except ValueError as e:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: {e}") from None


def export_layer(path: str, lc: common.LayerCodes, v2: bool) -> dict[str, torch.Tensor]:
    """:class:`~._gptq_awq.LayerCodes` -> the layer's GPTQ tensors (``ValueError`` naming the layer when a
    value has no form in this layout)."""
    n, k = lc.shape
    b = lc.bits
    if b not in BITS:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: {b}-bit codes; GPTQ stores {', '.join(map(str, BITS))}")
    if n % 32 or k % 32:
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r} [{n}, {k}]: GPTQ readers allocate qweight "
                         f"[in_features // 32 * bits, N] and qzeros [G, out_features // 32 * bits]: both must be "
                         "multiples of 32")
    z = lc.zero.to(torch.int16)
    lo, hi = (0, (1 << b) - 1) if v2 else (1, 1 << b)
    if int(z.min()) < lo or int(z.max()) > hi:
        bad = int(z.min()) if int(z.min()) < lo else int(z.max())
        other = "'gptq'" if v2 else "'gptq_v2'"
        raise ValueError(f"{LAYOUT} checkpoint: layer {path!r}: zero point {bad} has no checkpoint_format "
                         f"{'gptq_v2' if v2 else 'gptq'!r} form (it stores {'z' if v2 else 'z - 1'} in {b} bits: "
                         f"zero points {lo}..{hi}); write checkpoint_format={other}")
    stored = (z if v2 else z - 1).to(torch.uint8).t()  # [G, N]
    return {"qweight": affine_fmt.pack_rows(lc.codes, b).t().contiguous(),
            "qzeros": affine_fmt.pack_rows(stored, b),
            "scales": common.fp16_scales(path, lc.scale, LAYOUT).t().contiguous(),
            "g_idx": lc.g_idx()}


# ---- the API ----------------------------------------------------------------------------------------------
def load_gptq(directory_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], model: nn.Module, *,
              config: Mapping | None = None) -> nn.Module:
    """Load a GPTQ checkpoint into the float skeleton ``model`` (CPU or meta device) and return it.

    Every ``nn.Linear`` whose ``<path>.qweight`` the checkpoint holds becomes a packed
    :class:`~fxquant.modules.QuantizedLinear` (``affine<b>-g<g>[-sym]-fp16``; an act-order layer
    ``...+perm``, op ``linear_affine_perm``; an ``nn.Linear`` subclass with its own ``forward`` keeps it,
    its weight a :class:`~fxquant.modules.PackedWeight`); every other tensor loads as stored.
    ``directory_or_state_dict``: a directory (``config.json`` with ``quantization_config``, or AutoGPTQ's
    ``quantize_config.json``; ``model.safetensors``, shards, or ``<model_file_base_name>.safetensors``)
    or a state dict, whose config is ``config`` or ``model.config.quantization_config``.
    ``checkpoint_format`` ``gptq`` (v1) and ``gptq_v2``; bits 2, 3, 4, 8.  A missing, extra, mis-shaped
    or mis-typed tensor, an unsupported config value, a ``g_idx`` that is not an act-order grouping, or an
    unreadable file raises ``ValueError`` naming it, before ``model`` changes."""
    qc, tensors = common.read_source(directory_or_state_dict, config, model, LAYOUT)
    lay = read_config(qc)
    notes = [f"GPTQ: {lay.bits} bits, group_size {lay.group_size}, checkpoint_format "
             f"{'gptq_v2' if lay.v2 else 'gptq'}{', desc_act' if lay.desc_act else ''}"]
    return common.load(model, tensors, lambda p, t, n, k: import_layer(lay, p, t, n, k), NAMES, LAYOUT, notes)


def save_gptq(model: nn.Module, directory: str | os.PathLike, *, checkpoint_format: str = "gptq") -> None:
    """Write ``model`` (packed by ``fxquant.quantize_`` or :func:`load_gptq`) as a GPTQ checkpoint in
    ``directory``: ``model.safetensors`` and ``config.json`` with a ``quantization_config``
    (``quant_method`` gptq, ``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format``) that
    ``transformers.GPTQConfig.from_dict`` reads.

    Exportable layers: ``affine<b>-g<g>[-sym]`` / ``-ch`` (b in 2, 3, 4, 8; scales written as fp16, which
    must hold them exactly), act-order layers :func:`load_gptq` made, ``int<b>wo-<g>-sym`` and ``int8wo``;
    every packed layer with the same bits and group size; in_features and out_features multiples of 32.
    ``checkpoint_format``: ``"gptq"`` (v1, stores ``z - 1``: every GPTQ reader; a zero point 0 has no v1
    form) or ``"gptq_v2"``.  Anything else raises ``ValueError`` naming the layer before a file is written."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is not supported; valid: "
                         f"{', '.join(map(repr, FORMATS))}")
    codes, owners = {}, {}
    for path, scheme, qw, owner in common.packed_layers(model, LAYOUT):
        codes[path], owners[path] = common.layer_codes(path, scheme, qw, LAYOUT), owner
    if not codes:
        raise ValueError("the model has no packed layer: quantize it with fxquant.quantize_ first")
    bits = _one(codes, "bits", lambda lc: lc.bits)
    group = _group_size(codes)
    layers = {p: export_layer(p, lc, checkpoint_format == "gptq_v2") for p, lc in codes.items()}
    from .. import __version__

    qc = {"quant_method": "gptq", "bits": bits, "group_size": group,
          "desc_act": any(lc.perm is not None for lc in codes.values()),
          "sym": all(lc.symmetric for lc in codes.values()), "checkpoint_format": checkpoint_format,
          "format": checkpoint_format, "static_groups": False,
          "lm_head": any(p == "lm_head" or p.endswith(".lm_head") for p in codes),
          "meta": {"quantizer": [f"fxquant:{__version__}"]}}
    common.write(model, directory, layers, owners, qc)


def _one(codes: dict, what: str, get) -> Any:
    values = {get(lc) for lc in codes.values()}
    if len(values) != 1:
        raise ValueError(f"{LAYOUT} checkpoint: one {what} for every layer; the model's packed layers have "
                         f"{sorted(values)} (e.g. {next(iter(codes))!r}: {get(next(iter(codes.values())))})")
    return values.pop()


def _group_size(codes: dict[str, common.LayerCodes]) -> int:
    """The config's ``group_size``: the group size of the grouped layers (-1 when every layer has one group
    per row); a one-group layer wider than it has no form then."""
    grouped = {p: lc for p, lc in codes.items() if lc.group_size is not None}
    if not grouped:
        return -1
    g = _one(grouped, "group_size", lambda lc: lc.group_size)
    for p, lc in codes.items():
        if lc.group_size is None and lc.shape[1] > g:
            raise ValueError(f"{LAYOUT} checkpoint: layer {p!r} has one group per row over {lc.shape[1]} inputs while "
                             f"the other layers use group_size={g}; a GPTQ checkpoint has one group size")
    return g
