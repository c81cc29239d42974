"""The rows of tools/bench_e2e.py: how each variant is made from a copy of the bf16 model.

A row's ``make(model, ids) -> model`` receives a private deep copy of the bf16 model (it may change
it in place) and the decode prompt ``ids`` [1, prompt_len].  A row that cannot be made here (library
not installed, API missing) raises; the bench prints the error in that row and goes on.

Every library quantizes every ``nn.Linear``, lm_head included (untied in tinyllama-1.1b; tied to
the embedding in SmolLM2, where fxquant keeps its default spec behaviour): that is the default of
``fxquant.quantize_``, torchao ``quantize_`` and quanto ``quantize``.  bitsandbytes has no
model-level API that works from an in-memory model (``BitsAndBytesConfig`` goes through
``from_pretrained``, which also keeps lm_head in float); its rows swap every ``nn.Linear`` for
``Linear4bit`` / ``Linear8bitLt`` the way transformers' ``replace_with_bnb_linear`` does, lm_head
included so that all rows store the same layers in their format.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Callable

import torch

BF16 = torch.bfloat16


class Unavailable(Exception):
    """This row cannot run here; the table shows the message instead of numbers."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    name: str  # the --rows key, e.g. "int4wo-128", "torchao-int8wo"
    kind: str  # "baseline" | "fxquant" | "peer"
    bits: int  # weight bits: peers are compared with the fxquant rows of the same width
    make: Callable[[torch.nn.Module, torch.Tensor], torch.nn.Module]


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install failing at import
        raise Unavailable(f"{module} not importable: {type(e).__name__}: {e}") from e


# ---- baselines and fxquant --------------------------------------------------------------------
def _same(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    return model


def _fp32(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    return model.float()


def _fxquant(scheme: str) -> Callable:
    def make(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
        import fxquant

        if not hasattr(fxquant, "quantize_"):
            raise Unavailable("fxquant.quantize_ not available")
        out = fxquant.quantize_(model, fxquant.Spec(default=scheme), example_kwargs=dict(input_ids=ids))
        return model if out is None else out
    return make


def _gguf_file(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    """SmolLM2's own GGUF file (Q4_1, Q8_0 embedding) loaded packed by ``fxquant.from_gguf`` in bf16: the
    bf16 / fp32 rows are transformers' dequantize-at-load model of the same file (the copy is unused)."""
    import sys
    from pathlib import Path

    import fxquant

    if "smollm2" not in str(getattr(model, "name_or_path", "")).lower():
        raise Unavailable("no GGUF file for this model (the gguf row runs on smollm2)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "models"))
    try:
        from _load import smollm2_gguf
    finally:
        sys.path.pop(0)
    return fxquant.from_gguf(smollm2_gguf(), dtype=BF16)


# ---- peers, through their own public APIs -----------------------------------------------------
def _torchao(config: Callable[[], Any]) -> Callable:
    def make(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
        _need("torchao.quantization").quantize_(model, config())
        return model
    return make


def _torchao_int8wo() -> Any:
    return _need("torchao.quantization").Int8WeightOnlyConfig()


def _torchao_int8dq() -> Any:
    return _need("torchao.quantization").Int8DynamicActivationInt8WeightConfig()


def _torchao_int4wo() -> Any:
    """CPU int4 weight-only in torchao 0.18: the prototype config whose ``Int4OpaqueTensor`` runs
    ``_weight_int4pack_mm_for_cpu`` (what torchao's own AWQ example uses on the CPU); older torchao
    spelled it ``Int4WeightOnlyConfig(layout=Int4CPULayout(), version=1)``."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except ImportError:
        from torchao.dtypes import Int4CPULayout
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=128, layout=Int4CPULayout(), version=1)
    return PrototypeInt4WeightOnlyConfig(group_size=128)


def _quanto(qtype: str) -> Callable:
    def make(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
        oq = _need("optimum.quanto")
        oq.quantize(model, weights=getattr(oq, qtype))
        oq.freeze(model)
        return model
    return make


def _swap_linears(model: torch.nn.Module, make_one: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, make_one(child))


def _bnb_nf4(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    """``Linear4bit`` nf4, blocksize 64, no double quant, bf16 compute (fxquant ``nf4``'s layout);
    ``.to("cpu")`` on the ``Params4bit`` quantizes and selects bitsandbytes' CPU 4-bit kernel."""
    bnb = _need("bitsandbytes")

    def one(lin: torch.nn.Linear) -> torch.nn.Module:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=BF16,
                              compress_statistics=False, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.float(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        return q.to("cpu").eval()

    _swap_linears(model, one)
    return model


def _bnb_int8(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    """``Linear8bitLt`` as ``BitsAndBytesConfig(load_in_8bit=True)`` makes it: LLM.int8, threshold 6.0."""
    bnb = _need("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a warning per call: bf16 inputs cast to fp16

    def one(lin: torch.nn.Linear) -> torch.nn.Module:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        return q.to("cpu").eval()  # eval: the inference path (no training-state bookkeeping)

    _swap_linears(model, one)
    return model


VARIANTS: list[Variant] = [
    Variant(name="bf16", kind="baseline", bits=16, make=_same),
    Variant(name="fp32", kind="baseline", bits=32, make=_fp32),
    *(Variant(name=s, kind="fxquant", bits=b, make=_fxquant(s))
      for s, b in (("int8wo", 8), ("int4wo-128", 4), ("int4wo-64", 4), ("nf4", 4), ("int8dq", 8))),
    Variant(name="gguf", kind="fxquant", bits=4, make=_gguf_file),
    Variant(name="torchao-int8wo", kind="peer", bits=8, make=_torchao(_torchao_int8wo)),
    Variant(name="torchao-int4wo-128", kind="peer", bits=4, make=_torchao(_torchao_int4wo)),
    Variant(name="torchao-int8dq", kind="peer", bits=8, make=_torchao(_torchao_int8dq)),
    Variant(name="quanto-qint8", kind="peer", bits=8, make=_quanto("qint8")),
    Variant(name="quanto-qint4", kind="peer", bits=4, make=_quanto("qint4")),
    Variant(name="bnb-nf4", kind="peer", bits=4, make=_bnb_nf4),
    Variant(name="bnb-int8", kind="peer", bits=8, make=_bnb_int8),
]
BY_NAME = {v.name: v for v in VARIANTS}


# ---- weight memory ----------------------------------------------------------------------------
def _tensors(t: Any) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: wrapper subclasses (torchao, quanto) flattened, and the
    side tensors bitsandbytes keeps on its parameters (``quant_state``, ``SCB``)."""
    if not isinstance(t, torch.Tensor):
        return []
    out: list[torch.Tensor] = []
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            out += _tensors(getattr(t, n))
    else:
        out.append(t)
    for extra in ("SCB", "quant_state"):
        side = getattr(t, extra, None)
        if isinstance(side, torch.Tensor):
            out += _tensors(side)
        elif side is not None:  # bnb QuantState: absmax, code, offset, nested state2
            for v in vars(side).values():
                out += _tensors(v) if isinstance(v, torch.Tensor) else (
                    [x for w in vars(v).values() for x in _tensors(w)] if hasattr(v, "absmax") else [])
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (tensor subclasses' inner tensors, bnb's
    quantization state included), each storage counted once (tied weights, views)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        for inner in _tensors(t):
            st = inner.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
