"""SmolLM2-135M quantized in place (``fxquant.quantize_``) and used as a Hugging Face model:
``generate`` with the dynamic and the static KV cache, greedy, sampling, a padded batch, the
kernels each phase takes, and ``torch.compile`` (no graph break over the float model, no recompile
per decoded token).

Oracles: ``fxquant.compile`` of the same model with the same spec and example (the report), and the
float model itself (greedy tokens)."""
import copy

import pytest
import torch

import fxquant

from conftest import INT8WO_SPEC, smollm2_example
from fxquant.kernels import native_cpu
from fxquant.modules import QuantizedLinear

pytestmark = pytest.mark.models

#: prompts whose float greedy continuation has no near tie in its first 16 tokens (measured: int8wo
#: agrees with float for 19, 24, 24, 24 tokens of 24, float32; "The sun rises in the" too, 24)
CLEAR_PROMPTS = ["The capital of France is", "def fibonacci(n):", "The largest planet in the solar system is",
                 "The best way to learn a new language is"]
#: prompts whose float continuation has a near tie early (measured: int8wo diverges at token 3, 4, 1
#: and 16, where float's top-2 logits are 0.065, 0.036, 0.068, 0.012 apart)
TIED_PROMPTS = ["Once upon a time, there was a little girl who", "To make a cup of tea, first",
                "Python is a programming language that", "Here is a list of fruits:"]
NEAR_TIE = 0.15  # logits: a gap this small is flipped by any weight rounding (int8 moves logits by ~0.1-0.3)


@pytest.fixture(scope="module")
def int8wo_inplace(smollm2):
    """A float32 copy of SmolLM2 quantized in place with the compile fixture's spec and example."""
    model, tokenizer = smollm2
    copy_ = copy.deepcopy(model)
    return fxquant.quantize_(copy_, fxquant.Spec.from_dict(INT8WO_SPEC), (), smollm2_example(tokenizer))


def new_tokens(model, enc, n, **kw):
    out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[:, enc["input_ids"].shape[1]:]


def test_report_equals_compile(int8wo_inplace, smollm2_int8wo_compiled):
    assert fxquant.report(int8wo_inplace) == fxquant.report(smollm2_int8wo_compiled)
    layers = [m for m in int8wo_inplace.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 210 and type(int8wo_inplace.lm_head) is torch.nn.Linear  # skipped


def test_same_logits_as_compile(smollm2, int8wo_inplace, smollm2_int8wo_compiled):
    _, tokenizer = smollm2
    enc = tokenizer(["Quantization makes models smaller.", "Hi"], padding=True, return_tensors="pt")
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    with torch.no_grad():
        assert torch.equal(int8wo_inplace(**kw).logits, smollm2_int8wo_compiled(**kw).logits)


@pytest.mark.parametrize("cache", [None, "static"])
def test_greedy_equals_float_for_16_tokens(smollm2, int8wo_inplace, cache):
    model, tokenizer = smollm2
    for prompt in CLEAR_PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        expected = new_tokens(model, enc, 16, cache_implementation=cache)
        got = new_tokens(int8wo_inplace, enc, 16, cache_implementation=cache)
        assert torch.equal(got, expected), (prompt, tokenizer.decode(expected[0]), tokenizer.decode(got[0]))


def test_greedy_diverges_only_at_near_ties(smollm2, int8wo_inplace):
    """Where int8wo's greedy tokens leave float's within 16 tokens, float itself was undecided there."""
    model, tokenizer = smollm2
    for prompt in TIED_PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        expected, got = new_tokens(model, enc, 16)[0], new_tokens(int8wo_inplace, enc, 16)[0]
        differ = (expected != got).nonzero()
        if len(differ):
            i = int(differ[0])
            prefix = torch.cat([enc["input_ids"][0], expected[:i]])[None]
            with torch.no_grad():
                top2 = model(prefix).logits[0, -1].topk(2).values
            assert (top2[0] - top2[1]).item() < NEAR_TIE, (prompt, i, top2)


def test_padded_batch_and_both_caches(smollm2, int8wo_inplace):
    """Batch 2, left-padded: the same tokens as float, and the static cache gives the dynamic one's."""
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(["The capital of France is", "def fibonacci(n):"], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    dynamic = new_tokens(int8wo_inplace, enc, 12)
    assert torch.equal(dynamic, new_tokens(model, enc, 12))
    assert torch.equal(new_tokens(int8wo_inplace, enc, 12, cache_implementation="static"), dynamic)


def test_sampling_runs_and_is_seeded(smollm2, int8wo_inplace):
    _, tokenizer = smollm2
    enc = tokenizer("Once upon a time", return_tensors="pt")
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(int8wo_inplace.generate(**enc, max_new_tokens=10, do_sample=True, top_k=50, temperature=0.8))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, enc["input_ids"].shape[1] + 10)
    assert int(runs[0].max()) < int8wo_inplace.config.vocab_size


def test_prefill_takes_the_gemm_decode_the_gemv(smollm2, int8wo_inplace, monkeypatch, python_kernels):
    """A 64-token prompt (64 rows per projection) goes through the large-M kernel, each decoded token
    (1 row) through the GEMV: counted at the native kernels' Python wrappers (the C++ entry, which
    calls the same GEMV without them, off: tests/ops/test_native_entry.py)."""
    if not native_cpu.available():
        pytest.skip(f"native kernels unavailable: {native_cpu.status()}")
    _, tokenizer = smollm2
    calls = {"gemv": [], "gemm": []}
    for name, key in (("int8_gemv", "gemv"), ("int8_gemm", "gemm")):
        real = getattr(native_cpu, name)
        monkeypatch.setattr(native_cpu, name, lambda x2, *a, _r=real, _k=key, **k: calls[_k].append(x2.shape[0])
                            or _r(x2, *a, **k))
    ids = torch.randint(100, 10000, (1, 64), generator=torch.Generator().manual_seed(0))
    int8wo_inplace.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                            min_new_tokens=4, do_sample=False)
    assert calls["gemv"] and set(calls["gemv"]) == {1} and len(calls["gemv"]) == 3 * 210
    from fxquant.ops import _cpu

    if native_cpu.has_bf16_dot() and not _cpu.amx():  # the native large-M GEMM needs AVX512-BF16; else
        assert calls["gemm"] == [64] * 210              # (and with AMX) blocked dequantize + dense GEMM
    else:
        assert calls["gemm"] == []


@pytest.fixture(scope="module")
def bf16_pair(smollm2):
    """(float bf16 copy, the same quantized in place with int4wo-128, lm_head skipped)."""
    model, tokenizer = smollm2
    ref = copy.deepcopy(model).to(torch.bfloat16)
    q = fxquant.quantize_(copy.deepcopy(ref), fxquant.Spec(default="int4wo-128", skip=["lm_head"]),
                          example_kwargs=dict(input_ids=tokenizer("Hello there", return_tensors="pt")["input_ids"]))
    return ref, q


def test_torch_compile_adds_no_graph_break(smollm2, bf16_pair):
    _, tokenizer = smollm2
    enc = tokenizer("The capital of France is", return_tensors="pt")
    counts = []
    for m in bf16_pair:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(**enc)
        counts.append((explained.graph_count, explained.graph_break_count))
    torch._dynamo.reset()
    assert counts[1] == counts[0], counts


def test_static_cache_decode_under_compile_does_not_recompile_per_token(smollm2, bf16_pair):
    """``model.forward = torch.compile(model.forward, fullgraph=True)`` + static cache: as many graphs
    for 12 new tokens as the float model needs (prefill + decode), none more on a second call, and the
    tokens of eager decode."""
    from torch._dynamo.utils import counters

    _, tokenizer = smollm2
    enc = tokenizer("The capital of France is", return_tensors="pt")
    graphs, outputs = [], []
    for m in bf16_pair:
        torch._dynamo.reset()
        counters.clear()
        # Dynamo's graphs (Inductor is not under test here; tools/bench_e2e.py times it), fullgraph as for float
        m.forward = torch.compile(m.forward, backend="eager", fullgraph=True)
        try:
            outputs.append(new_tokens(m, enc, 12, cache_implementation="static"))
            first = counters["stats"]["unique_graphs"]
            new_tokens(m, enc, 12, cache_implementation="static")
            graphs.append((first, counters["stats"]["unique_graphs"]))
        finally:
            del m.forward
    torch._dynamo.reset()
    assert graphs[1] == graphs[0] and graphs[1][0] == graphs[1][1] <= 3, graphs
    eager = new_tokens(bf16_pair[1], enc, 12, cache_implementation="static")
    assert torch.equal(outputs[1], eager)
