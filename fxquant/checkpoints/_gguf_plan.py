"""Where each tensor of a GGUF file goes in a Hugging Face model, decided (and checked) before the model
changes.

Names and corrections come from transformers' legacy GGUF loader (``modeling_gguf_pytorch_utils``):
``get_gguf_hf_weights_map`` maps ``blk.0.attn_q.weight`` to ``model.layers.0.self_attn.q_proj.weight``,
and the architecture's ``TensorProcessor`` undoes what llama.cpp's converter did to a tensor (Llama's
q/k rows permuted for its rotary layout, Gemma's norms stored as ``w + 1``, ...).  transformers
dequantizes every tensor and runs the processor on the values; here:

- a float tensor (F32 / F16 / BF16) is handled exactly so: values, processor, cast to ``dtype``;
- a quantized tensor of an ``nn.Linear`` (or of the token embedding) stays packed when the processor
  only reorders its rows: found by running the processor on a probe ``[N, 1]`` holding ``0..N-1``; the
  same permutation is then applied to the stored rows, whose bytes are independent of each other;
- any other quantized tensor (the processor changes values or columns, a module that is not a plain
  linear or embedding) is dequantized with ``gguf.quants.dequantize`` and handled as a float tensor,
  with a report note.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._gguf_embedding import scaled_embedding_scale
from ._gguf_file import FLOAT_TYPES, GgufFile, TensorEntry

__all__ = ["Plan", "PackedItem", "check_types", "plan_model"]


def _qtypes():
    from ..formats import gguf as fmt

    return fmt


def check_types(f: GgufFile) -> None:
    """``ValueError`` naming the first tensor whose type fxquant cannot load (IQ*, TQ*, MXFP4, I8, ...)."""
    fmt = _qtypes()
    for e in f.tensors.values():
        if e.type_id not in FLOAT_TYPES and e.type_id not in fmt.QTYPE_BY_GGML:
            valid = ", ".join(list(FLOAT_TYPES.values()) + [q.upper() for q in fmt.QTYPES])
            raise ValueError(f"{f.path}: {e.describe()} has type {e.type_name} (ggml type {e.type_id}), which fxquant "
                             f"does not load; supported types: {valid}")


class _Bytes:
    """A quantized tensor's rows copied out of the file once (rows reordered by ``perm``), shared by every
    module that uses them (a tied embedding and output head)."""

    def __init__(self, raw: np.ndarray, perm: np.ndarray | None):
        self.raw, self.perm, self._t = raw, perm, None

    def tensor(self) -> torch.Tensor:
        if self._t is None:
            out = torch.empty(self.raw.shape, dtype=torch.uint8)
            if self.perm is None:
                out.numpy()[...] = self.raw
            else:
                np.take(self.raw, self.perm, axis=0, out=out.numpy())
            self._t, self.raw = out, None
        return self._t


@dataclass
class PackedItem:
    """A module (``path``) that becomes packed on the bytes of GGUF tensor ``source``."""

    path: str
    source: str
    type_name: str
    n: int
    k: int
    data: _Bytes
    compute_dtype: torch.dtype | None

    @property
    def scheme(self) -> str:
        return f"gguf-{self.type_name.lower()}"

    def qweight(self):
        from ..schemes import GGUF

        return GGUF(qtype=self.type_name.lower(), compute_dtype=self.compute_dtype).packed(self.data.tensor(),
                                                                                        self.n, self.k)


@dataclass
class Plan:
    floats: dict[str, torch.Tensor] = field(default_factory=dict)  # model tensor name -> value in dtype
    tied_floats: list[tuple[str, str]] = field(default_factory=list)  # (tied name, source name)
    linears: list[PackedItem] = field(default_factory=list)
    embeddings: list[PackedItem] = field(default_factory=list)
    meta_buffers: list[nn.Module] = field(default_factory=list)
    float_reasons: dict[str, str] = field(default_factory=dict)  # linear path -> why it stays float
    notes: list[str] = field(default_factory=list)
    float_bytes: int = 0  # the model's tensors as floats in dtype (tied ones once): the report's "before"


def _row_permutation(processor, name: str, n: int, key_map: dict) -> np.ndarray | None | bool:
    """The row order the processor gives tensor ``name`` of ``n`` rows (``None``: unchanged), or
    ``False`` when it does anything else to it (changes values, shape or name)."""
    probe = np.arange(n, dtype=np.float64).reshape(n, 1)
    try:
        res = processor.process(weights=probe.copy(), name=name, tensor_key_mapping=key_map,
                                parsed_parameters={"tensors": {}})
    except Exception:  # noqa: BLE001  (a processor that needs real values: not a row permutation)
        return False
    w = np.asarray(res.weights)
    if res.name != name or w.shape != (n, 1) or not np.array_equal(np.sort(w.reshape(-1)), probe.reshape(-1)):
        return False
    perm = w.reshape(-1).astype(np.int64)
    return None if np.array_equal(perm, np.arange(n)) else perm


def _processor(f: GgufFile, model: nn.Module):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{f.path}: no general.architecture in the metadata (not a model file?)")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    try:
        key_map = get_gguf_hf_weights_map(model, processor)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise ValueError(f"{f.path}: transformers has no GGUF name mapping for {type(model).__name__} "
                         f"(model_type {model.config.model_type!r}, file architecture {arch!r}): {e}") from None
    return processor, key_map


def _dense(f: GgufFile, e: TensorEntry, processor, key_map: dict, parsed: dict) -> dict[str, torch.Tensor]:
    """transformers' legacy path for one tensor: float32 values, the processor, ``{model name: tensor}``."""
    if e.is_float:
        values = f.floats(e)
    else:
        from gguf.quants import dequantize

        values = dequantize(f.raw(e), e.type_id).reshape(e.shape)
    res = processor.process(weights=values, name=e.name, tensor_key_mapping=key_map, parsed_parameters=parsed)
    if res.name is None or res.name not in key_map:
        return {}
    return {key_map[res.name]: torch.from_numpy(np.array(res.weights, copy=True))}


def plan_model(f: GgufFile, model: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype | None) -> Plan:
    """Everything :func:`~fxquant.checkpoints.gguf.apply_plan` will do to ``model``, checked: every
    tensor of the file has a place of its shape, every tensor of the model comes from the file (or is
    tied to one that does).  ``ValueError`` naming the file and the tensor otherwise."""
    processor, key_map = _processor(f, model)
    modules = dict(model.named_modules())
    plan, parsed, dense, sources = Plan(), {"tensors": {}}, {}, {}
    unmapped = []
    for e in f.tensors.values():
        hf = key_map.get(e.name)
        path = hf[:-len(".weight")] if hf and hf.endswith(".weight") else None
        m = modules.get(path) if path is not None else None
        why = None
        if not e.is_float and m is not None:
            why = _packable(e, m)
            if why is None:
                perm = _row_permutation(processor, e.name, e.shape[0], key_map)
                why = None if perm is not False else "transformers' processor changes more than its row order"
            if why is None:
                _check_shape(f, e, hf, tuple(m.weight.shape))
                item = PackedItem(path, e.name, e.type_name, e.shape[0], e.shape[-1], _Bytes(f.raw(e), perm),
                                  compute_dtype)
                if isinstance(m, nn.Embedding):
                    plan.embeddings.append(item)
                else:
                    plan.linears.append(item)
                continue
        out = _dense(f, e, processor, key_map, parsed)
        if not out:
            unmapped.append(e.name)
        for name, t in out.items():
            dense[name], sources[name] = t, e
            owner = name[:-len(".weight")] if name.endswith(".weight") else None
            if why is not None:
                plan.float_reasons[owner] = f"{e.type_name} in the file, dequantized at load: {why}"
                plan.notes.append(f"{name}: {e.type_name} tensor {e.name!r} dequantized at load ({why})")
            elif owner is not None and e.is_float:
                plan.float_reasons[owner] = f"stored as {e.type_name} in the GGUF file"
    for name, t in parsed["tensors"].items():  # what processors wrote aside (MoE experts, ...)
        dense.setdefault(name, t)
    _plan_floats(f, model, plan, dense, sources, dtype)
    _plan_ties(f, model, plan, modules)
    _check_complete(f, model, plan)
    plan.float_bytes = _float_bytes(model, plan, dtype)
    plan.meta_buffers = _meta_buffer_modules(f, model)
    if unmapped:
        plan.notes.append(f"{len(unmapped)} tensors of the file have no place in {type(model).__name__} and were "
                          f"not loaded (as transformers does): {', '.join(unmapped[:5])}")
    _summarise(f, plan)
    return plan


def _packable(e: TensorEntry, m: nn.Module) -> str | None:
    """``None`` when module ``m`` can hold tensor ``e`` packed, else why not."""
    if not isinstance(m, (nn.Linear, nn.Embedding)):
        return f"{type(m).__name__} is not a linear layer or an embedding"
    if len(e.shape) != 2:
        return f"a {len(e.shape)}-D tensor"
    if isinstance(m, nn.Linear):
        return None if type(m).forward is nn.Linear.forward else f"{type(m).__name__} has its own forward"
    return None if scaled_embedding_scale(m) is not False else f"{type(m).__name__} has its own forward"


def _check_shape(f: GgufFile, e: TensorEntry, name: str, shape: tuple) -> None:
    if tuple(e.shape) != tuple(shape):
        raise ValueError(f"{f.path}: {e.describe()} is {name!r} of shape {list(shape)} in the model; the file "
                         "does not match the model's config")


def _plan_floats(f: GgufFile, model: nn.Module, plan: Plan, dense: dict, sources: dict, dtype: torch.dtype) -> None:
    targets = dict(model.named_parameters(remove_duplicate=False))
    for mpath, m in model.named_modules(remove_duplicate=False):
        for bname, b in m._buffers.items():
            if b is not None and bname not in m._non_persistent_buffers_set:
                targets[f"{mpath}.{bname}" if mpath else bname] = b
    for name, t in dense.items():
        e = sources.get(name)
        what = e.describe() if e is not None else f"tensor {name!r}"
        if name not in targets:
            raise ValueError(f"{f.path}: {what} maps to {name!r}, which {type(model).__name__} does not have")
        if tuple(t.shape) != tuple(targets[name].shape):
            raise ValueError(f"{f.path}: {what} becomes {name!r} of shape {list(t.shape)}; the model's is "
                             f"{list(targets[name].shape)} (the file does not match the model's config)")
        plan.floats[name] = t.to(dtype) if t.is_floating_point() else t


def _plan_ties(f: GgufFile, model: nn.Module, plan: Plan, modules: dict) -> None:
    """A tied output head the file does not store: the input embedding's packed bytes (a
    :class:`QuantizedLinear` on the same tensor) or its float parameter."""
    out_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_mod = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if out_mod is None or in_mod is None or not getattr(cfg, "tie_word_embeddings", False):
        return
    paths = {id(m): p for p, m in modules.items()}
    out_path, in_path = paths.get(id(out_mod)), paths.get(id(in_mod))
    if out_path is None or in_path is None or f"{out_path}.weight" in plan.floats or \
            any(i.path == out_path for i in plan.linears):
        return
    packed_in = next((i for i in plan.embeddings if i.path == in_path), None)
    if packed_in is not None and isinstance(out_mod, nn.Linear) and type(out_mod).forward is nn.Linear.forward:
        plan.linears.append(PackedItem(out_path, packed_in.source, packed_in.type_name, packed_in.n, packed_in.k,
                                       packed_in.data, packed_in.compute_dtype))
        plan.notes.append(f"{out_path}: tied to {in_path}; both use the one packed {packed_in.type_name} table "
                          f"{packed_in.source!r}")
    elif f"{in_path}.weight" in plan.floats:
        plan.tied_floats.append((f"{out_path}.weight", f"{in_path}.weight"))
    else:  # a packed table used by a head with its own forward: give that head the table's values
        raise ValueError(f"{f.path}: {out_path!r} ({type(out_mod).__name__}) is tied to the packed table "
                         f"{packed_in.source!r} but is not a plain nn.Linear")


def _check_complete(f: GgufFile, model: nn.Module, plan: Plan) -> None:
    covered = set(plan.floats) | {t for t, _ in plan.tied_floats}
    covered |= {f"{i.path}.weight" for i in plan.linears + plan.embeddings}
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False) if n not in covered]
    for mpath, m in model.named_modules(remove_duplicate=False):
        missing += [f"{mpath}.{b}" for b, t in m._buffers.items()
                    if t is not None and b not in m._non_persistent_buffers_set and f"{mpath}.{b}" not in covered]
    if missing:
        raise ValueError(f"{f.path}: {len(missing)} tensors of {type(model).__name__} are not in the file, e.g. "
                         f"{', '.join(repr(n) for n in missing[:3])} (a file of another architecture or size?)")


def _float_bytes(model: nn.Module, plan: Plan, dtype: torch.dtype) -> int:
    """Bytes of the model's tensors as transformers' dequantize-at-load model holds them: floats in
    ``dtype``, a tied output head once."""
    tied = {t for t, _ in plan.tied_floats} | {f"{i.path}.weight" for i in plan.linears
                                                if any(i.data is e.data for e in plan.embeddings)}
    size, seen, total = torch.finfo(dtype).bits // 8, set(), 0
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if name in tied or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (size if t.is_floating_point() else t.element_size())
    return total


def _meta_buffer_modules(f: GgufFile, model: nn.Module) -> list[nn.Module]:
    found = [(p, m) for p, m in model.named_modules()
             if any(b is not None and b.is_meta and n in m._non_persistent_buffers_set for n, b in m._buffers.items())]
    if found and not callable(getattr(model, "_init_weights", None)):
        raise ValueError(f"{f.path}: module {found[0][0]!r} has non-persistent buffers on the meta device (not stored "
                         "in files) and the model has no _init_weights to compute them; build the skeleton on the CPU")
    return [m for _, m in found]


def _summarise(f: GgufFile, plan: Plan) -> None:
    counts: dict[str, int] = {}
    for item in plan.linears:
        counts[item.type_name] = counts.get(item.type_name, 0) + 1
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    plan.notes.insert(0, f"loaded {len(plan.linears)} packed linear layers ({kinds or 'none'}) from {f.path} "
                         "(rel_error unknown: the file holds no float weights)")
    for item in plan.embeddings:
        plan.notes.insert(1, f"{item.path}: {item.type_name} table {item.source!r} kept packed (PackedEmbedding: the "
                             "rows of the ids looked up are dequantized per call)")
