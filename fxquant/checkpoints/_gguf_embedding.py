"""An embedding table kept packed: :class:`PackedEmbedding` dequantizes the rows it looks up.

A GGUF file usually quantizes ``token_embd`` (Q8_0, Q6_K, Q4_K, ...), and a model with tied embeddings
uses that one table twice: as the input embedding (a row gather) and as the output head (a linear).
The head becomes a :class:`~fxquant.modules.QuantizedLinear` on the table's stored tensors; the input
side becomes a :class:`PackedEmbedding` holding *the same* tensors, which decodes only the rows of the
ids it is given (``[tokens, embedding_dim]`` floats per call), so the table costs its file size once.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import op_def
from ..schemes import QuantizedWeight

__all__ = ["PackedEmbedding", "scaled_embedding_scale"]

_DEFS: dict = {}  # op name -> its LinearOpDef (``op_def`` searches every loaded module: ~1 ms a call)


def _dequantized(op: str, tensors: dict, attrs: dict) -> torch.Tensor:
    d = _DEFS.get(op)
    if d is None:
        d = _DEFS[op] = op_def(op)
    return d.dequantized(tensors, attrs)


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` whose table ``[num_embeddings, embedding_dim]`` is stored packed, one stored row
    per table row (the tensors of ``qweight``, as buffers named like the op's arguments).

    ``forward(ids)`` gathers the ids' stored rows, dequantizes them with the format's own
    ``dequantize`` (float32, the values the op multiplies by), casts to ``dtype`` and, for a scaled
    embedding (Gemma's ``embed_scale``), multiplies by ``embed_scale`` in ``dtype``, as the module it
    replaces does.  ``.to(dtype)`` / ``.half()`` change ``dtype``; the stored tensors keep theirs."""

    def __init__(self, qweight: QuantizedWeight, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None, scheme: str = ""):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.out_features, qweight.in_features
        self.padding_idx = padding_idx
        self.scheme = scheme
        self.op_name = qweight.op
        self.op_attrs = dict(qweight.attrs)
        self.tensor_names = tuple(qweight.tensors)
        for name, t in qweight.tensors.items():
            if t.dim() < 1 or t.shape[0] != self.num_embeddings:
                raise ValueError(f"PackedEmbedding: stored tensor {name!r} has shape {tuple(t.shape)}; one row per "
                                 f"table row ({self.num_embeddings}) is needed to gather rows")
            self.register_buffer(name, t)
        self.dtype = dtype
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = {n: getattr(self, n).index_select(0, flat) for n in self.tensor_names}
        attrs = {**self.op_attrs, "out_features": flat.shape[0]}
        out = _dequantized(self.op_name, rows, attrs).to(self.dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def packed(self) -> QuantizedWeight:
        """The stored table as a packed ``[num_embeddings, embedding_dim]`` weight (the module's buffers)."""
        return QuantizedWeight(self.op_name, {n: getattr(self, n) for n in self.tensor_names}, dict(self.op_attrs),
                               self.num_embeddings, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        """The whole table, float32 ``[num_embeddings, embedding_dim]`` (unscaled)."""
        return _dequantized(self.op_name, {n: getattr(self, n) for n in self.tensor_names}, self.op_attrs)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else ", scaled"
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme or self.op_name}, "
                f"dtype={self.dtype}{scale}")

    def _apply(self, fn, recurse=True):
        # a dtype cast (``model.to(torch.float32)``) changes the output dtype; a move moves the buffers
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)


def scaled_embedding_scale(module: nn.Embedding) -> torch.Tensor | None | bool:
    """How ``module`` turns its looked-up rows into its output: ``None`` for a plain ``nn.Embedding``,
    the ``embed_scale`` tensor for an embedding whose ``forward`` is ``rows * embed_scale`` (transformers'
    ``*ScaledWordEmbedding`` classes: Gemma 3, ...), ``False`` for any other ``forward`` (unknown to us:
    its table is loaded dequantized instead)."""
    if module.max_norm is not None:
        return False
    if type(module).forward is nn.Embedding.forward:
        return None
    scale = getattr(module, "embed_scale", None)
    if type(module).__name__.endswith("ScaledWordEmbedding") and isinstance(scale, torch.Tensor):
        return scale
    return False
