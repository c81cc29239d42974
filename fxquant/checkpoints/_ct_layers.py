"""One linear layer between fxquant's packed formats and compressed-tensors' stored tensors.

compressed-tensors (``pack-quantized``, 0.20) stores a weight-only integer layer as
``weight_packed`` int32 ``[N, ceil(K*b/32)]`` (signed codes ``c`` plus ``2**(b-1)``, each row a
little-endian bit stream: :func:`fxquant.formats.affine.pack_rows`), ``weight_scale`` ``[N, G]`` in
the model dtype, ``weight_shape`` ``[N, K]`` and, when asymmetric, ``weight_zero_point`` int32
``[ceil(N*b/32), G]`` (the signed zero points plus ``2**(b-1)``, packed along N);
``W = (c - z) * s``.  Its ``int-quantized`` / ``naive-quantized`` formats store the signed codes as
int8 ``weight`` ``[N, K]`` and the zero points as int8 ``[N, G]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..formats import affine as affine_fmt
from ..formats import intx as intx_fmt
from ..schemes import Affine, Int8WeightOnly, IntX, QuantizedWeight

#: widths whose int32 layout every compressed-tensors version shares (32 codes fill ``b`` words
#: either way); others were packed with unused bits before its dense packing
PACKED_BITS = (2, 4, 8)
EXPORTABLE = ("int8wo; int<b>wo-<g>-sym and int<b>wo-ch-sym; affine<b>-g<g>[-sym] and affine<b>-ch[-sym] "
              "(b in 2, 4, 8, bf16 / fp16 / fp32 scales, groups dividing in_features); for asymmetric "
              "weights use affine<b>-g<g> (integer zero points)")
_ARG_FIELDS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
               "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
PACKED_NAMES = {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
INT8_NAMES = {"weight", "weight_scale", "weight_zero_point"}


@dataclass(frozen=True)
class LayerArgs:
    """The ``weights`` ``QuantizationArgs`` of a layer: ``group_size`` ``None`` is per channel."""

    bits: int
    symmetric: bool
    group_size: int | None

    def to_json(self) -> dict[str, Any]:
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "group_size": self.group_size,
                "strategy": "channel" if self.group_size is None else "group", "block_structure": None,
                "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "LayerArgs":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected an object of quantization args, got {d!r}")
        unknown = sorted(set(d) - _ARG_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; valid: {', '.join(sorted(_ARG_FIELDS))}")
        kind, bits, sym = d.get("type", "int"), d.get("num_bits", 8), d.get("symmetric", True)
        if kind != "int":
            raise ValueError(f"{where}: type {kind!r} weights (float8 / fp4 schemes) are not supported; valid: 'int'")
        if type(bits) is not int or not 2 <= bits <= 8:
            raise ValueError(f"{where}: num_bits={bits!r} is not supported; valid: 2..8")
        if not isinstance(sym, bool):
            raise ValueError(f"{where}: symmetric={sym!r} is not valid; valid: true, false")
        group, strategy = d.get("group_size"), d.get("strategy")
        if strategy is None:
            strategy = "channel" if group == -1 else ("group" if isinstance(group, int) and group > 0 else "tensor")
        if strategy == "group" and not (type(group) is int and group > 0):
            raise ValueError(f"{where}: strategy 'group' needs a group_size > 0, got {group!r}")
        if strategy not in ("group", "channel"):
            raise ValueError(f"{where}: strategy {strategy!r} is not supported; valid: 'group', 'channel'")
        if d.get("dynamic", False) is not False:
            raise ValueError(f"{where}: dynamic={d['dynamic']!r} weights are not supported; valid: false")
        if d.get("actorder") not in (None, False, "weight", "static"):
            raise ValueError(f"{where}: actorder={d['actorder']!r} (a g_idx group permutation) is not supported; "
                             "valid: null, 'weight', 'static'")
        if d.get("block_structure") is not None:
            raise ValueError(f"{where}: block_structure={d['block_structure']!r} is not supported; valid: null")
        return cls(bits, sym, group if strategy == "group" else None)


# ---- export ---------------------------------------------------------------------------------------------
def export_layer(name: str, scheme: str, qw: QuantizedWeight) -> tuple[LayerArgs, dict[str, torch.Tensor]]:
    """A packed layer -> its args and ``pack-quantized`` tensors (local names); ``ValueError`` naming the
    layer and the scheme when compressed-tensors cannot hold it exactly."""
    t, a, n, k = qw.tensors, qw.attrs, qw.out_features, qw.in_features

    def refuse(why: str):
        raise ValueError(f"layer {name!r} (scheme {scheme or qw.op}): {why}; compressed-tensors holds exactly: "
                         f"{EXPORTABLE}")

    if qw.op == "linear_int8wo":
        codes, scale, zero, bits, sym = (t["qweight"].to(torch.int16) + 128).to(torch.uint8), t["scale"][:, None], \
            None, 8, True
    elif qw.op == "linear_affine":
        codes, scale, bits, sym = None, t["scale"], a["bits"], a["symmetric"]
        zero = None if sym else t["zero_point"]
    elif qw.op == "linear_intx":
        bits, sym = a["bits"], a["symmetric"]
        if a["axis"] != 1:
            refuse("groups along axis 0 (one input column across rows) have no compressed-tensors form")
        if not sym:
            refuse("asymmetric intx stores a bf16 offset per group, not an integer zero point")
        kp = intx_fmt.stored_in_features(k, a["group_size"], 1)
        codes = intx_fmt.codes_from_storage(t["codes_lo"], t["codes_hi"], bits, a["block_n"], n, kp)[:, :k]
        scale, zero = t["scale"].t().contiguous(), None
    else:
        refuse(f"op {qw.op} has no compressed-tensors form")
    if bits not in PACKED_BITS:
        refuse(f"{bits}-bit codes: compressed-tensors versions disagree on their int32 layout "
               f"(valid: {', '.join(map(str, PACKED_BITS))})")
    groups = scale.shape[1]
    g = a.get("group_size", k)
    if groups > 1 and k % g:
        refuse(f"in_features={k} is not a multiple of the group size {g} (compressed-tensors has no partial groups)")
    out = {"weight_packed": affine_fmt.pack_rows(codes, bits) if codes is not None else t["qweight"],
           "weight_scale": scale, "weight_shape": torch.tensor([n, k])}
    if zero is not None:
        out["weight_zero_point"] = affine_fmt.pack_rows(zero.t(), bits).t().contiguous()
    return LayerArgs(bits, sym, None if groups == 1 else g), out


# ---- import ---------------------------------------------------------------------------------------------
def import_layer(where: str, args: LayerArgs, fmt: str, t: Mapping[str, torch.Tensor], n: int, k: int,
                 prefer_affine: bool = False) -> tuple[QuantizedWeight, str]:
    """compressed-tensors tensors of one layer (local names) -> ``(packed weight, scheme string)``, never
    through a float weight: IntX / int8wo where they hold the values bit for bit (symmetric, bf16
    scales), else :class:`~fxquant.schemes.Affine` (``prefer_affine``: always)."""
    bits, mid = args.bits, 1 << (args.bits - 1)
    g = k if args.group_size is None else args.group_size
    groups = -(-k // g) if k else 0
    if fmt == "pack-quantized":
        if bits not in PACKED_BITS:
            raise ValueError(f"{where}: {bits}-bit pack-quantized codes are not supported (their int32 layout "
                             f"depends on the compressed-tensors version); valid: {', '.join(map(str, PACKED_BITS))}")
        if "weight_shape" in t and [int(v) for v in t["weight_shape"].reshape(-1).tolist()] != [n, k]:
            raise ValueError(f"{where}.weight_shape: {t['weight_shape'].tolist()} in the checkpoint, [{n}, {k}] "
                             "in the model")
    scale = _tensor(where, t, "weight_scale", affine_fmt.SCALE_DTYPES, (n, groups), "[N, groups]")
    if fmt == "pack-quantized":
        packed = _tensor(where, t, "weight_packed", (torch.int32,), (n, affine_fmt.packed_words(k, bits)),
                         "[N, ceil(K*bits/32)]")
        codes = None
        zero = _packed_zero(where, t, bits, n, groups, args.symmetric)
    else:
        signed = _tensor(where, t, "weight", (torch.int8,), (n, k), "[N, K]")
        _in_range(where + ".weight", signed, bits)
        codes, packed = (signed.to(torch.int16) + mid).to(torch.uint8), None
        zero = None
        if not args.symmetric:
            z = _tensor(where, t, "weight_zero_point", (torch.int8,), (n, groups), "[N, groups]")
            _in_range(where + ".weight_zero_point", z, bits)
            zero = (z.to(torch.int16) + mid).to(torch.uint8)
    if args.symmetric and scale.dtype == torch.bfloat16 and not prefer_affine:
        codes = affine_fmt.unpack_rows(packed, bits, k) if codes is None else codes
        qf, s = codes.float(), scale.float()
        if bits == 8 and groups == 1 and (k == 0 or int(codes.min()) >= 1):  # int8wo's codes are -127..127
            scheme = Int8WeightOnly()
            return scheme.pack_grid(qf, s.reshape(-1), torch.zeros(n), n, k), str(scheme)
        scheme = IntX(bits=bits, group_size=-1 if groups == 1 else g, symmetric=True)
        return scheme.pack_grid(qf.reshape(n * groups, -1), s.reshape(-1), torch.zeros(n * groups), n, k), str(scheme)
    scheme = Affine(bits=bits, group_size=args.group_size, symmetric=args.symmetric, scale_dtype=scale.dtype)
    packed = affine_fmt.pack_rows(codes, bits) if packed is None else packed.contiguous()
    try:
        return scheme.packed(packed, scale.contiguous(), zero, n, k), str(scheme)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _tensor(where: str, t: Mapping[str, torch.Tensor], name: str, dtypes: tuple, shape: tuple,
            layout: str) -> torch.Tensor:
    if name not in t:
        raise ValueError(f"{where}.{name}: missing from the checkpoint")
    x = t[name]
    if x.dtype not in dtypes or tuple(x.shape) != tuple(shape):
        raise ValueError(f"{where}.{name}: expected {' or '.join(str(d) for d in dtypes)} of shape {tuple(shape)} "
                         f"{layout}, got {x.dtype} of shape {tuple(x.shape)}")
    return x


def _packed_zero(where: str, t: Mapping[str, torch.Tensor], bits: int, n: int, groups: int,
                 symmetric: bool) -> torch.Tensor | None:
    """``weight_zero_point`` int32 ``[ceil(N*b/32), groups]`` -> uint8 ``[N, groups]`` (``None`` when
    symmetric; a symmetric checkpoint that still carries zero points must hold zeros)."""
    name = "weight_zero_point"
    if symmetric and name not in t:
        return None
    z = t.get(name)
    if symmetric and z is not None and z.dtype == torch.int8 and tuple(z.shape) == (n, groups):
        zero = z.to(torch.int16) + (1 << (bits - 1))
    else:
        z = _tensor(where, t, name, (torch.int32,), (affine_fmt.packed_words(n, bits), groups),
                    "[ceil(N*bits/32), groups]")
        zero = affine_fmt.unpack_rows(z.t().contiguous(), bits, n).t().contiguous()
    if symmetric:
        if (zero != 1 << (bits - 1)).any():
            raise ValueError(f"{where}.{name}: the config says symmetric but the zero points are not all 0")
        return None
    return zero.to(torch.uint8)


def _in_range(where: str, t: torch.Tensor, bits: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{where}: values {int(t.min())}..{int(t.max())} are outside the {bits}-bit range {lo}..{hi}")
