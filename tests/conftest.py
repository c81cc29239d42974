import os

# Triton reads TRITON_INTERPRET at import time: set it before anything imports triton, so the
# kernel tests run under the interpreter on machines without a GPU.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never download: huggingface_hub reads these once, when first imported (by any test module
# that imports transformers / diffusers), so they are set here, before every test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))

@pytest.fixture
def tiny_llama_model():
    from fxquant.models import tiny_llama

    return tiny_llama(seed=0, vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2)


@pytest.fixture
def fp32_dense(monkeypatch):
    """The CPU policy of a CPU without native bf16 GEMM (``fxquant.ops._cpu.dense_dtype`` fp32): fp32
    activations are never rounded to bf16 on any path under ``compute_dtype=None``.  Tests that a
    decode is the reference up to fp32 summation order pin this; the bf16 paths are checked at bf16
    tolerances elsewhere."""
    from fxquant.ops import _cpu

    monkeypatch.setattr(_cpu, "dense_dtype", lambda: torch.float32)


@pytest.fixture
def python_kernels():
    """The ops' Python CPU kernels on every call (the C++ entry of
    :mod:`fxquant.kernels.native_entry` off): for tests that patch or spy on the Python routing."""
    from fxquant.kernels import native_entry

    with native_entry.disabled():
        yield


@pytest.fixture
def no_amx(monkeypatch):
    """Route as on an AVX512-BF16 CPU without AMX (``fxquant.ops._cpu.amx`` False): large M takes the
    native decode-in-GEMM kernels, so their tests run on AMX machines too (where the ops prefer
    dequantize + oneDNN's AMX GEMM)."""
    from fxquant.ops import _cpu

    monkeypatch.setattr(_cpu, "amx", lambda: False)
