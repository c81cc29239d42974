"""One linear layer between a bitsandbytes state dict and fxquant's packed weights.

bitsandbytes 0.4x-0.50 (``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``,
``Linear8bitLt._save_to_state_dict``; transformers writes the same keys) stores, per linear ``<p>``:

- 4-bit: ``<p>.weight`` the packed codes (uint8 ``[ceil(N*K/2), 1]``, or those bytes viewed as the
  ``quant_storage`` dtype), ``<p>.weight.absmax`` (fp32 per block; uint8 with double quant),
  ``<p>.weight.quant_map`` (the 16-value table), with double quant ``<p>.weight.nested_absmax`` (fp32
  per 256 blocks) and ``<p>.weight.nested_quant_map`` (the 256-value dynamic map), and
  ``<p>.weight.quant_state.bitsandbytes__<nf4|fp4>``: uint8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, nested, ``nested_blocksize``,
  ``nested_dtype``, ``nested_offset`` (a number: the mean the nested absmax was taken around).
- 8-bit: ``<p>.weight`` int8 ``[N, K]``, ``<p>.SCB`` fp32 ``[N]`` (row absmax) and
  ``<p>.weight_format`` (uint8 scalar, 0 = "row", the only layout it still reads).

These are :mod:`fxquant.formats.bnb4`'s ``codes`` / ``absmax`` / ``code_table`` / ``absmax_q`` /
``absmax_scale`` / ``absmax_code`` / ``absmax_offset`` and :mod:`fxquant.formats.bnb8`'s ``qweight``
/ ``scb``, byte for byte: nothing is decoded or recomputed in either direction.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch

from ..formats import bnb4 as fmt4
from ..schemes import FP4, NF4, Bnb8, QuantizedWeight

QS_KEY = "weight.quant_state.bitsandbytes__"
NAMES_4BIT = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
NAMES_8BIT = ("weight", "SCB", "weight_format")
#: the dtypes bitsandbytes (transformers' ``bnb_4bit_quant_storage``) stores packed codes as
QUANT_STORAGE = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
STATE_FIELDS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
DTYPES = ("float32", "bfloat16", "float16")
EXPORTABLE = ("nf4-<bs>[+dq] and fp4-<bs>[+dq] (bitsandbytes' tables, nested blocks of 256), bnb8[-<threshold>] "
              "(int8 codes + fp32 row absmax; fxquant's llm.int8 / int8dq keep bf16 steps that have no SCB)")


def layer_kind(local: Mapping[str, torch.Tensor]) -> str | None:
    """``"4bit"`` (a packed quant_state), ``"8bit"`` (an ``SCB``) or ``None`` (a float layer)."""
    if any(name.startswith("weight.quant_state.") for name in local):
        return "4bit"
    return "8bit" if "SCB" in local else None


def _bad(name: str, msg: str) -> ValueError:
    return ValueError(f"tensor {name!r}: {msg}")


def _tensor(path: str, local: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple,
            layout: str) -> torch.Tensor:
    full = f"{path}.{name}"
    t = local.get(name)
    if t is None:
        raise ValueError(f"tensor {full!r}: missing from the checkpoint (a bitsandbytes layer stores it)")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise _bad(full, f"{t.dtype} of shape {tuple(t.shape)} in the checkpoint; expected {dtype} of shape "
                         f"{shape} {layout}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise _bad(full, "holds NaN or inf values")
    return t.contiguous()


# ---- 4-bit ------------------------------------------------------------------------------------------------
def read_quant_state(name: str, t: torch.Tensor) -> dict[str, Any]:
    """The JSON object packed in a ``quant_state.bitsandbytes__*`` tensor (uint8 bytes), fields checked."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise _bad(name, f"{t.dtype} of shape {tuple(t.shape)}; a packed quant_state is 1-D uint8 (JSON bytes)")
    try:
        state = json.loads(bytes(t.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(name, f"not a packed bitsandbytes quant_state (JSON bytes): {e}") from None
    if not isinstance(state, dict):
        raise _bad(name, f"the quant_state is {type(state).__name__}, not a JSON object")
    unknown = sorted(set(state) - set(STATE_FIELDS))
    if unknown:
        raise _bad(name, f"quant_state field {unknown[0]!r} is unknown; valid: {', '.join(STATE_FIELDS)}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in state:
            raise _bad(name, f"quant_state has no {field!r} field")
    return state


def _check_state(name: str, state: dict, quant_type: str, n: int, k: int, nested: bool) -> int:
    """Validate the quant_state against the layer; returns the blocksize."""
    if state["quant_type"] != quant_type:
        raise _bad(name, f"quant_state quant_type={state['quant_type']!r} disagrees with its key ({quant_type!r})")
    bs = state["blocksize"]
    if type(bs) is not int or bs not in fmt4.BLOCKSIZES:
        raise _bad(name, f"quant_state blocksize={bs!r} is not supported; valid: "
                         f"{', '.join(map(str, fmt4.BLOCKSIZES))}")
    if state["shape"] != [n, k]:
        raise _bad(name, f"quant_state shape={state['shape']!r} disagrees with the model's layer [{n}, {k}]")
    if state["dtype"] not in DTYPES:
        raise _bad(name, f"quant_state dtype={state['dtype']!r} is not supported; valid: {', '.join(DTYPES)}")
    present = [f for f in NESTED_FIELDS if f in state]
    if nested and len(present) != len(NESTED_FIELDS):
        raise _bad(name, f"the layer has nested_absmax but the quant_state lacks "
                         f"{sorted(set(NESTED_FIELDS) - set(present))[0]!r}")
    if not nested and present:
        raise _bad(name, f"quant_state field {present[0]!r} without nested_absmax / nested_quant_map tensors")
    if nested:
        if state["nested_blocksize"] != fmt4.NESTED_BLOCKSIZE or type(state["nested_blocksize"]) is not int:
            raise _bad(name, f"quant_state nested_blocksize={state['nested_blocksize']!r} is not supported; valid: "
                             f"{fmt4.NESTED_BLOCKSIZE} (what bitsandbytes writes)")
        if state["nested_dtype"] != "float32":
            raise _bad(name, f"quant_state nested_dtype={state['nested_dtype']!r} is not supported; valid: 'float32'")
        off = state["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise _bad(name, f"quant_state nested_offset={off!r} is not a finite number")
    return bs


def _codes(path: str, t: torch.Tensor | None, numel: int) -> torch.Tensor:
    """The packed codes as flat uint8 ``[ceil(numel/2)]`` from bitsandbytes' ``weight`` (any quant_storage)."""
    name = f"{path}.weight"
    if t is None:
        raise ValueError(f"tensor {name!r}: missing from the checkpoint (a bitsandbytes layer stores it)")
    nbytes = (numel + 1) // 2
    if t.dtype not in QUANT_STORAGE:
        raise _bad(name, f"packed 4-bit codes stored as {t.dtype}; valid quant_storage: "
                         f"{', '.join(str(d).removeprefix('torch.') for d in QUANT_STORAGE)}")
    if t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[1] != 1) or t.numel() * t.element_size() != nbytes:
        raise _bad(name, f"{t.dtype} of shape {tuple(t.shape)} ({t.numel() * t.element_size()} bytes); the packed "
                         f"codes of an [N*K = {numel}] weight are {nbytes} bytes as [bytes / itemsize, 1]")
    return t.contiguous().view(torch.uint8).reshape(-1)


def import_4bit(path: str, local: Mapping[str, torch.Tensor], n: int, k: int, *,
                compute_dtype: torch.dtype | None = None) -> tuple[QuantizedWeight, str, set[str], dict]:
    """A 4-bit layer's tensors -> ``(packed weight, scheme string, names used, quant_state)``."""
    qs_names = [x for x in local if x.startswith("weight.quant_state.")]
    if len(qs_names) != 1 or not qs_names[0].startswith(QS_KEY):
        raise _bad(f"{path}.{qs_names[-1]}", f"a layer holds one quant_state named {QS_KEY}nf4 or {QS_KEY}fp4; "
                                            f"found {sorted(qs_names)}")
    quant_type = qs_names[0][len(QS_KEY):]
    qs_name = f"{path}.{qs_names[0]}"
    if quant_type not in fmt4.QUANT_TYPES:
        raise _bad(qs_name, f"quant type {quant_type!r} is not supported; valid: {', '.join(fmt4.QUANT_TYPES)}")
    extra = sorted(set(local) - set(NAMES_4BIT) - {qs_names[0], "bias"})
    if extra:
        raise _bad(f"{path}.{extra[0]}", "not a tensor of a bitsandbytes 4-bit layer")
    nested = "weight.nested_absmax" in local or "weight.nested_quant_map" in local
    state = read_quant_state(qs_name, local[qs_names[0]])
    bs = _check_state(qs_name, state, quant_type, n, k, nested)
    numel, blocks = n * k, -(-n * k // bs)
    codes = _codes(path, local.get("weight"), numel)
    table = _tensor(path, local, "weight.quant_map", torch.float32, (16,), "(the 4-bit table)")
    if not torch.equal(table, fmt4.code_table(quant_type)):
        raise _bad(f"{path}.weight.quant_map", f"differs from bitsandbytes' {quant_type} table; fxquant loads "
                                               "the standard NF4 / FP4 tables only")
    if nested:
        tensors = {"codes": codes,
                   "absmax_q": _tensor(path, local, "weight.absmax", torch.uint8, (blocks,), "[ceil(N*K/blocksize)]"),
                   "absmax_code": _tensor(path, local, "weight.nested_quant_map", torch.float32, (256,), "(the map)"),
                   "absmax_scale": _tensor(path, local, "weight.nested_absmax", torch.float32,
                                           (-(-blocks // fmt4.NESTED_BLOCKSIZE),), "[ceil(blocks/256)]"),
                   "absmax_offset": torch.tensor(float(state["nested_offset"]), dtype=torch.float32),
                   "code_table": table}
        if not torch.equal(tensors["absmax_code"], fmt4.dynamic_map()):
            raise _bad(f"{path}.weight.nested_quant_map", "differs from bitsandbytes' signed dynamic map; fxquant "
                                                          "loads that map only")
    else:
        tensors = {"codes": codes, "absmax": _tensor(path, local, "weight.absmax", torch.float32, (blocks,),
                                                     "[ceil(N*K/blocksize)]"), "code_table": table}
    scheme = (NF4 if quant_type == "nf4" else FP4)(blocksize=bs, double_quant=nested, compute_dtype=compute_dtype)
    scalars = {"blocksize": bs, **({"absmax_blocksize": fmt4.NESTED_BLOCKSIZE} if nested else {})}
    qw = QuantizedWeight(scheme.op, tensors, scheme.op_attrs(**scalars, out_features=n, in_features=k), n, k)
    return qw, str(scheme), set(NAMES_4BIT) & set(local) | {qs_names[0]}, state


# ---- 8-bit ------------------------------------------------------------------------------------------------
def import_8bit(path: str, local: Mapping[str, torch.Tensor], n: int, k: int, *,
                threshold: float) -> tuple[QuantizedWeight, str, set[str]]:
    """An 8-bit layer's tensors -> ``(packed weight, scheme string, names used)``."""
    extra = sorted(set(local) - set(NAMES_8BIT) - {"bias"})
    if extra:
        raise _bad(f"{path}.{extra[0]}", "not a tensor of a bitsandbytes 8-bit layer")
    fmt_t = local.get("weight_format")
    if fmt_t is not None and (fmt_t.numel() != 1 or fmt_t.is_floating_point() or int(fmt_t.reshape(-1)[0]) != 0):
        raise _bad(f"{path}.weight_format", f"{fmt_t.dtype} {fmt_t.tolist()!r}; valid: an integer scalar 0 "
                                            "('row', the only layout bitsandbytes still reads)")
    qweight = _tensor(path, local, "weight", torch.int8, (n, k), "[N, K] (the layer's shape)")
    scb = _tensor(path, local, "SCB", torch.float32, (n,), "[N] (row absmax)")
    if (scb < 0).any():
        raise _bad(f"{path}.SCB", "holds negative row absmax values")
    scheme = Bnb8(threshold=threshold)
    qw = QuantizedWeight(scheme.op, {"qweight": qweight, "scb": scb}, scheme.op_attrs(threshold=threshold), n, k)
    return qw, str(scheme), set(NAMES_8BIT) & set(local)


# ---- export -----------------------------------------------------------------------------------------------
def quant_type_of(table: torch.Tensor) -> str | None:
    """``"nf4"`` / ``"fp4"`` when ``table`` is that table bit for bit, else None."""
    return next((q for q in fmt4.QUANT_TYPES if torch.equal(table.float(), fmt4.code_table(q))), None)


def export_layer(path: str, scheme: str, qw: QuantizedWeight, dtype: str) -> tuple[str, dict[str, torch.Tensor], dict]:
    """A packed layer -> ``(kind, {local name: tensor}, layer info)`` in bitsandbytes' layout; ``dtype`` is the
    quant_state's ``dtype`` (the float dtype bitsandbytes dequantizes to).  ``ValueError`` naming the layer
    when it has no exact bitsandbytes form."""
    t, a = qw.tensors, qw.attrs
    what = f"layer {path!r} ({scheme or qw.op})"
    if qw.op == "linear_bnb8":
        info = {"threshold": a["threshold"], "compute_dtype": a.get("compute_dtype")}
        row = torch.tensor(0, dtype=torch.uint8)  # weight_format "row"
        return "8bit", {"weight": t["qweight"], "SCB": t["scb"], "weight_format": row}, info
    if qw.op not in ("linear_bnb4", "linear_bnb4_dq"):
        raise ValueError(f"{what}: no bitsandbytes form; exportable: {EXPORTABLE}")
    quant_type = quant_type_of(t["code_table"])
    if quant_type is None:
        raise ValueError(f"{what}: its code table is neither bitsandbytes' NF4 nor FP4; exportable: {EXPORTABLE}")
    state: dict[str, Any] = {"quant_type": quant_type, "blocksize": a["blocksize"], "dtype": dtype,
                             "shape": [qw.out_features, qw.in_features]}
    out = {"weight": t["codes"].reshape(-1, 1), "weight.quant_map": t["code_table"]}
    nested = qw.op == "linear_bnb4_dq"
    if nested:
        if a["absmax_blocksize"] != fmt4.NESTED_BLOCKSIZE or not torch.equal(t["absmax_code"], fmt4.dynamic_map()):
            raise ValueError(f"{what}: its absmax is double-quantized with blocks of {a['absmax_blocksize']} or "
                             f"another map; bitsandbytes reads blocks of {fmt4.NESTED_BLOCKSIZE} with its dynamic map")
        out.update({"weight.absmax": t["absmax_q"], "weight.nested_absmax": t["absmax_scale"],
                    "weight.nested_quant_map": t["absmax_code"]})
        state.update({"nested_blocksize": fmt4.NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": t["absmax_offset"].reshape(()).item()})
    else:
        out["weight.absmax"] = t["absmax"]
    packed = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    out[QS_KEY + quant_type] = packed
    info = {"quant_type": quant_type, "double_quant": nested, "compute_dtype": a.get("compute_dtype")}
    return "4bit", out, info
