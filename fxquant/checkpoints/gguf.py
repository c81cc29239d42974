"""GGUF files (llama.cpp) loaded packed: :func:`from_gguf`.

Each Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K tensor of a linear layer keeps its
file bytes as the ``blocks`` of an fxquant ``gguf-<type>`` layer (:class:`~fxquant.modules.QuantizedLinear`,
op ``linear_gguf``); a quantized token embedding stays packed too (:class:`PackedEmbedding`, which a tied
output head shares); F32 / F16 / BF16 tensors load as floats in ``dtype``.  The model is the Hugging Face
architecture transformers builds for the file (its config from the file's metadata; its tensor names,
and the changes llama.cpp made to some tensors, undone with transformers' own GGUF utilities: see
:mod:`._gguf_plan`).  Layout and what is exact: docs/checkpoints.md.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..inplace import check_not_quantized
from ..modules import QuantizedLinear
from ..report import INPLACE_REPORT_ATTR, Report, Row, tensor_bytes
from ._gguf_embedding import PackedEmbedding, scaled_embedding_scale
from ._gguf_file import GgufFile
from ._gguf_plan import Plan, check_types, plan_model

__all__ = ["from_gguf", "PackedEmbedding"]


def from_gguf(path: str | os.PathLike, model: nn.Module | None = None, *, dtype: torch.dtype = torch.bfloat16,
              compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load the GGUF file ``path`` with its quantized tensors packed and return the model.

    ``model=None``: transformers' ``AutoModelForCausalLM`` for the file's architecture (config from
    its metadata; parameters allocated only as they are loaded), in eval mode, with ``generate``.
    ``model``: a Hugging Face model of that architecture to load into instead (a float skeleton, e.g.
    built on the meta device), changed in place and returned.

    Linear weights stored as ``Q4_0 ... Q6_K`` become ``gguf-<type>`` layers holding the file's row
    bytes (``blocks`` uint8 ``[N, K / QK * type_size]``; llama.cpp's q/k row permutation undone on the
    rows); the token embedding, when quantized, stays packed (rows dequantized per lookup) and a tied
    output head multiplies by the same bytes.  F32 / F16 / BF16 tensors are loaded in ``dtype``, after
    transformers' per-architecture corrections (Gemma's norms ``w - 1``, ...).  ``compute_dtype``: the
    packed layers' matmul dtype (``None``: fxquant's CPU policy, docs/design.md; ``torch.float32``:
    fp32 everywhere, the dequantize-at-load model's arithmetic).

    Raises ``ValueError`` naming the file and the tensor for an unsupported tensor type (IQ*, TQ*,
    MXFP4, ...), a truncated or corrupt file, or a tensor the model has no place for, before the
    model is changed.  ``fxquant.report(model)`` lists every linear layer."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"from_gguf: dtype={dtype!r}; valid: torch.float32, torch.bfloat16, torch.float16")
    if compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"from_gguf: compute_dtype={compute_dtype!r}; valid: None, torch.float32, torch.bfloat16, "
                         "torch.float16")
    f = GgufFile(path)
    check_types(f)
    if model is None:
        model = _skeleton(f, dtype)
    elif not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "model_type"):
        raise TypeError("from_gguf: model must be a Hugging Face model (a transformers PreTrainedModel with a "
                        f"config), got {type(model).__name__}")
    else:
        check_not_quantized(model)
    plan = plan_model(f, model, dtype, compute_dtype)
    # -- nothing has changed so far; from here on every step succeeds --
    apply_plan(model, plan, dtype)
    f.close()
    rows = _report_rows(model, plan, dtype)
    setattr(model, INPLACE_REPORT_ATTR, Report(
        rows=rows, frontend="GGUF file", model_bytes_before=plan.float_bytes, model_bytes_after=tensor_bytes(model),
        notes=plan.notes))
    return model.eval()


def _skeleton(f: GgufFile, dtype: torch.dtype) -> nn.Module:
    """transformers' model for the file: config from its metadata (transformers' GGUF reader), parameters
    on the meta device, buffers computed on the CPU (the rotary tables, Gemma's ``embed_scale``)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(f"from_gguf without model= needs transformers and accelerate ({e}): "
                          "pip install 'fxquant[models]'") from None
    folder, name = os.path.split(os.path.abspath(f.path))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        arch = f.metadata.get("general.architecture")
        raise ValueError(f"{f.path}: transformers cannot build a config for this file (architecture {arch!r}): "
                         f"{e}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def apply_plan(model: nn.Module, plan: Plan, dtype: torch.dtype) -> None:
    """Put the planned tensors into ``model``: meta buffers computed, float tensors assigned, packed
    linears and embeddings installed (every module at every path it is registered under)."""
    _fill_meta_buffers(model, plan.meta_buffers)
    for hf_name, t in plan.floats.items():
        _assign(model, hf_name, t)
    for tied_to, source in plan.tied_floats:
        _assign(model, tied_to, _get(model, source))
    for item in plan.linears:
        old = model.get_submodule(item.path)
        new = QuantizedLinear(item.qweight(), old.bias, item.scheme, weight_dtype=old.weight.dtype)
        _replace(model, old, new)
    for item in plan.embeddings:
        old = model.get_submodule(item.path)
        new = PackedEmbedding(item.qweight(), dtype, old.padding_idx, scaled_embedding_scale(old), item.scheme)
        _replace(model, old, new)


def _get(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """``t`` at ``name`` and at every other path holding the same parameter / buffer object."""
    owner, _, attr = name.rpartition(".")
    old = getattr(model.get_submodule(owner), attr)
    param = t if isinstance(t, nn.Parameter) else None
    for m in model.modules():
        for k, p in list(m._parameters.items()):
            if p is old:
                if param is None:
                    param = nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point())
                m._parameters[k] = param
        for k, b in list(m._buffers.items()):
            if b is old:
                m._buffers[k] = t


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    new.train(old.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(new, hooks).update(getattr(old, hooks))
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[name] = new


def _fill_meta_buffers(model: nn.Module, modules: list[nn.Module]) -> None:
    """Non-persistent buffers left on the meta device (a skeleton built there: rotary tables, Gemma's
    ``embed_scale``), recomputed by the model's ``_init_weights`` on the module, its parameters hidden
    behind meta copies meanwhile (so a parameter it would re-initialise is not touched)."""
    for m in modules:
        if not any(b is not None and b.is_meta for n, b in m._buffers.items() if n in m._non_persistent_buffers_set):
            continue
        for name in list(m._non_persistent_buffers_set):
            b = m._buffers.get(name)
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device="cpu")
        saved = dict(m._parameters)
        try:
            for k, p in saved.items():
                if p is not None:
                    m._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            with torch.no_grad():
                model._init_weights(m)
        finally:
            m._parameters.update(saved)


def _report_rows(model: nn.Module, plan: Plan, dtype: torch.dtype) -> list[Row]:
    """One row per linear layer of the loaded model: packed (its GGUF tensor and type) or float."""
    size = torch.finfo(dtype).bits // 8
    packed = {item.path: item for item in plan.linears}
    rows = []
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            item = packed.get(path)
            rows.append(Row(fqn=path, status="quantized", scheme=m.scheme, reason="",
                            shape=(m.out_features, m.in_features), bytes_before=m.out_features * m.in_features * size, bytes_after=m.packed().nbytes,
                            rel_error=None, rule=f"gguf tensor {item.source!r} ({item.type_name})" if item else "gguf",
                            kind="nn.Linear", method="checkpoint"))
        elif isinstance(m, nn.Linear):
            why = plan.float_reasons.get(path, "stored as a float tensor in the GGUF file")
            nbytes = m.weight.numel() * m.weight.element_size()
            rows.append(Row(fqn=path, status="skipped", scheme=None, reason=why, shape=tuple(m.weight.shape),
                            bytes_before=nbytes, bytes_after=nbytes, rel_error=None, kind="nn.Linear"))
    return rows

