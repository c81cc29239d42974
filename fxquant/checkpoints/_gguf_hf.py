"""GGUF files through transformers' own loader, packed by fxquant:

```python
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, quantization_config=FxQuantConfig(spec="gguf"))
```

transformers (5.25) reads a ``gguf_file=`` with whatever quantizer the config names, but refuses any
quantizer whose config is not a GGUF one (``get_hf_quantizer``), and asks it for the file's header
(``read_header``) and its state dict (``get_state_dict``).  :class:`FxQuantGgufHfQuantizer` is what
``FxQuantConfig(spec="gguf")`` selects: its config says ``quant_method`` ``"gguf"`` only between the
quantizer's creation and transformers' check of it (``"fxquant"`` again from the next hook on; it
always serialises as ``"fxquant"``), it plans the
model with :func:`~fxquant.checkpoints._gguf_plan.plan_model` before any weight is read, installs the
packed modules with empty tensors on the meta device, and hands transformers a state dict of the
file's row bytes (``<layer>.blocks``) and float tensors, which its loader assigns.  The result equals
:func:`fxquant.from_gguf` on the same file, dtype and ``compute_dtype``.

Such a model is not saved with ``save_pretrained`` (a packed embedding is not part of fxquant's saved
layout); ``fxquant.from_gguf`` is the way to reload it.
"""
from __future__ import annotations

import torch

from ..hf import FxQuantHfQuantizer
from ..modules import QuantizedLinear
from ..report import INPLACE_REPORT_ATTR, Report, tensor_bytes
from ._gguf_embedding import PackedEmbedding, scaled_embedding_scale
from ._gguf_file import GgufFile
from ._gguf_plan import PackedItem, Plan, check_types, plan_model
from .gguf import _fill_meta_buffers, _get, _replace, _report_rows

__all__ = ["GGUF_FILE_SPEC", "GgufFileSpec", "FxQuantGgufHfQuantizer"]


class GgufFileSpec:
    """``FxQuantConfig(spec="gguf")``: keep a GGUF file's quantized tensors as they are (no spec to
    apply: each tensor's type decides its scheme).  ``compute_dtype``: the packed layers' matmul dtype
    (``"gguf-fp32"`` for ``torch.float32``)."""

    def __init__(self, compute_dtype: torch.dtype | None = None):
        self.compute_dtype = compute_dtype

    @classmethod
    def parse(cls, text) -> "GgufFileSpec | None":
        names = {"gguf": None, "gguf-fp32": torch.float32, "gguf-bf16": torch.bfloat16, "gguf-fp16": torch.float16}
        key = text.strip().lower() if isinstance(text, str) else None
        return cls(names[key]) if key in names else None

    def to_dict(self) -> str:
        suffix = {None: "", torch.float32: "-fp32", torch.bfloat16: "-bf16", torch.float16: "-fp16"}
        return "gguf" + suffix[self.compute_dtype]

    def __repr__(self) -> str:
        return f"GgufFileSpec({self.to_dict()!r})"


GGUF_FILE_SPEC = GgufFileSpec()


class FxQuantGgufHfQuantizer(FxQuantHfQuantizer):
    """transformers' quantizer for ``from_pretrained(..., gguf_file=..., quantization_config=
    FxQuantConfig(spec="gguf"))`` (module docstring)."""

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.pre_quantized = True
        self.file: GgufFile | None = None
        self.plan: Plan | None = None
        self.dtype = torch.float32
        from transformers.utils.quantization_config import QuantizationMethod

        # transformers' gguf_file= path accepts only a quantizer whose config says "gguf": it checks right
        # after making the quantizer, and the next hook (read_header, or the model hook without a file) restores it
        quantization_config.quant_method = QuantizationMethod.GGUF

    def _restore_quant_method(self) -> None:
        from ..hf import FxQuantMethod

        self.quantization_config.quant_method = FxQuantMethod.FXQUANT

    def read_header(self, gguf_file: str) -> None:
        """The file's tensor table, checked (unsupported types, truncation) before the model is built."""
        self._restore_quant_method()
        self.file = GgufFile(gguf_file)
        check_types(self.file)

    def update_dtype(self, dtype):
        self.dtype = torch.float32 if dtype is None else dtype
        return self.dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        self._restore_quant_method()
        if self.file is None:
            raise ValueError('FxQuantConfig(spec="gguf") loads GGUF files: pass gguf_file= to from_pretrained')
        self.plan = plan_model(self.file, model, self.dtype, self.quantization_config.spec.compute_dtype)
        for item in self.plan.linears:
            old = model.get_submodule(item.path)
            _replace(model, old, QuantizedLinear(_meta_qweight(item), old.bias, item.scheme, weight_dtype=old.weight.dtype))
        self.replaced_embeddings = {}
        for item in self.plan.embeddings:
            old = self.replaced_embeddings[item.path] = model.get_submodule(item.path)
            _replace(model, old, PackedEmbedding(_meta_qweight(item), self.dtype, old.padding_idx,
                                                 scaled_embedding_scale(old), item.scheme))
        if self.plan.linears or self.plan.embeddings:
            # the tied input / output weights are now the packed modules' shared blocks (tied here, not by name)
            model.all_tied_weights_keys = {}
        return model

    def get_state_dict(self, checkpoint_file: str, model) -> dict[str, torch.Tensor]:
        """The tensors to load: each packed module's file bytes and every float tensor, by model name."""
        state = {f"{i.path}.blocks": i.data.tensor() for i in self.plan.linears + self.plan.embeddings}
        state.update(self.plan.floats)
        for tied, source in self.plan.tied_floats:
            state[tied] = self.plan.floats[source]
        return state

    def _process_model_after_weight_loading(self, model, **kwargs):
        plan = self.plan
        for item in plan.linears + plan.embeddings:  # one tensor per file tensor, whatever the loader copied
            model.get_submodule(item.path).blocks = item.data.tensor()
        for tied, source in plan.tied_floats:
            owner, _, attr = tied.rpartition(".")
            setattr(model.get_submodule(owner), attr, _get(model, source))
        _fill_meta_buffers(model, plan.meta_buffers)
        for path, old in self.replaced_embeddings.items():  # Gemma's embed_scale, computed by the old module's init
            _fill_meta_buffers(model, [old])
            if (scale := scaled_embedding_scale(old)) is not None:
                model.get_submodule(path).embed_scale = scale
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"fxquant GGUF load: {len(left)} tensors were not loaded, e.g. {left[:3]}")
        setattr(model, INPLACE_REPORT_ATTR, Report(
            rows=_report_rows(model, plan, self.dtype), frontend="GGUF file (transformers from_pretrained)",
            model_bytes_before=plan.float_bytes, model_bytes_after=tensor_bytes(model),
            notes=plan.notes))
        self.file.close()
        self.plan = None
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False


def _meta_qweight(item: PackedItem):
    """The packed weight of ``item`` with an empty ``blocks`` on the meta device (shape and dtype only)."""
    from ..formats import gguf as fmt
    from ..schemes import GGUF

    q = GGUF(qtype=item.type_name.lower(), compute_dtype=item.compute_dtype)
    blocks = torch.empty(item.n, fmt.row_bytes(q.qtype, item.k), dtype=torch.uint8, device="meta")
    return q.packed(blocks, item.n, item.k)

