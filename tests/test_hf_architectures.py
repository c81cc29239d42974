"""Hugging Face architectures whose code does something other than ``nn.Linear.forward`` with its
weights: tiny random models built from their config classes (no download), quantized both ways.

Oracles: the float model (outputs close, generate runs), ``fxquant.compile`` on a copy (the same
decisions and outputs as ``quantize_``)."""
from __future__ import annotations

import copy

import pytest
import torch

import fxquant
from fxquant.modules import PackedWeight
from helpers import rel

transformers = pytest.importorskip("transformers")

SPEC = fxquant.Spec(default="int8wo", skip=["lm_head"])


def _both(model, kwargs, spec=SPEC, **kw):
    qm = fxquant.compile(copy.deepcopy(model), spec, example_kwargs={**kwargs, "use_cache": False}, **kw)
    fxquant.quantize_(model, spec, example_kwargs=kwargs, **kw)
    return qm, model


def test_falcon_weight_dot_T_layers_are_quantized():
    """FalconLinear computes ``input @ self.weight.T`` (exported as ``aten.numpy_T``): every one of
    them is a site, in both forms, and generate runs on the packed weights."""
    cfg = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(cfg).eval()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    qm, m = _both(model, dict(input_ids=ids))
    rep = fxquant.report(m)
    assert rep == fxquant.report(qm)
    assert len(rep.quantized) == 8 == len(rep.rows) - 1, rep  # every layer but the skipped lm_head
    assert isinstance(m.transformer.h[0].self_attention.query_key_value.weight, PackedWeight)
    with torch.no_grad():
        out = m(ids).logits
        assert torch.equal(out, qm(input_ids=ids, use_cache=False).logits)
        assert rel(out, ref) < 0.05
    assert m.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)


def test_t5_reads_wo_weight_dtype():
    """T5's feed-forward casts its hidden states to ``self.wo.weight.dtype``: the swapped layer's
    ``weight`` reads as the float weight (dtype, shape), so forward and generate run."""
    cfg = transformers.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256,
                                decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    dec = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    qm, m = _both(model, dict(input_ids=ids, decoder_input_ids=dec))
    assert fxquant.report(m) == fxquant.report(qm)
    wo = m.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32 and wo.weight.shape == (64, 128)
    with torch.no_grad():
        out = m(input_ids=ids, decoder_input_ids=dec).logits
        assert torch.equal(out, qm(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits)
        assert rel(out, ref) < 0.05
    assert m.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[0] == 1


def test_gpt2_conv1d_awq_input_scale_in_place(tmp_path):
    """GPT-2's Conv1D (``addmm(b, x, W_kn)``) lowers to a PackedWeight; where AWQ's scale cannot be
    folded (c_proj after attention, mlp.c_proj after gelu) the PackedWeight divides its input, so
    quantize_ makes compile's decisions and outputs; saved and loaded, nothing changes."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (1, 16), generator=g)
    calib = [dict(input_ids=torch.randint(0, 256, (2, 32), generator=g)) for _ in range(2)]
    spec = fxquant.Spec(default="int4wo-32@awq", skip=["lm_head"])
    qm, m = _both(model, dict(input_ids=ids), spec, calibration=calib)
    assert fxquant.report(m) == fxquant.report(qm)
    scaled = {n: p for n, p in m.named_parameters() if isinstance(p, PackedWeight) and p.input_scale is not None}
    assert any("mlp.c_proj" in n for n in scaled) and any("attn.c_proj" in n for n in scaled), list(scaled)
    with torch.no_grad():
        out = m(ids).logits
        assert torch.equal(out, qm(input_ids=ids, use_cache=False).logits)
        w = scaled["transformer.h.0.mlp.c_proj.weight"]
        x = torch.randn(3, w.shape[0])
        assert rel(torch.addmm(torch.zeros(w.shape[1]), x, w), x @ w.dense()) < 1e-2  # the op rounds x to bf16 once
    fxquant.save(m, tmp_path / "gpt2.safetensors")
    with torch.device("meta"):
        sk = transformers.GPT2LMHeadModel(cfg).eval()
    fxquant.load(tmp_path / "gpt2.safetensors", model=sk)
    loaded = sk.get_parameter("transformer.h.0.mlp.c_proj.weight")
    assert torch.equal(loaded.input_scale, scaled["transformer.h.0.mlp.c_proj.weight"].input_scale)
    with torch.no_grad():
        assert torch.equal(sk(ids).logits, out)


def test_calibration_batches_wider_than_a_batch_one_trace():
    """Hugging Face's mask code branches on ``batch_size == 1``, so a batch-1 example gives a graph that
    guards on it; calibration batches of several rows then run row by row, and every statistic (a
    sum over tokens) is what the same rows given one by one give."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (1, 12), generator=g)
    batch = torch.randint(0, 256, (3, 20), generator=g)
    spec = fxquant.Spec(default="int4wo-32@gptq", skip=["lm_head"])
    wide = fxquant.quantize_(copy.deepcopy(model), spec, example_kwargs=dict(input_ids=ids),
                             calibration=[dict(input_ids=batch)])
    rows = fxquant.quantize_(copy.deepcopy(model), spec, example_kwargs=dict(input_ids=ids),
                             calibration=[dict(input_ids=batch[i:i + 1]) for i in range(3)])
    a, b = fxquant.report(wide).results, fxquant.report(rows).results
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        assert a[k]["output_squared_error"] == pytest.approx(b[k]["output_squared_error"], rel=1e-4), k
    with torch.no_grad():
        assert rel(wide(batch).logits, rows(batch).logits) < 1e-4


def test_mixtral_expert_weights_quantized_or_reported_float():
    """transformers 5 stores a MoE layer's experts as 3-D parameters: read by a grouped matmul (the
    default experts implementation) they are quantized sites (tests/test_moe_experts.py); read another
    way (``batched_mm``: gathered per token, then ``bmm``) they stay float and the report's notes say
    which tensors, while quantize_'s packed experts still run under either implementation."""
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    batched = copy.deepcopy(model)
    qm, m = _both(model, dict(input_ids=ids))
    rep = fxquant.report(m)
    assert rep == fxquant.report(qm)
    assert all(r.status == "quantized" for r in rep.rows if r.fqn != "lm_head") and len(rep.rows) == 15
    assert not any(n.startswith("left float") for n in rep.notes)
    assert m.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)
    batched.set_experts_implementation("batched_mm")
    fxquant.quantize_(batched, SPEC, example_kwargs=dict(input_ids=ids))
    rep = fxquant.report(batched)
    note = next(n for n in rep.notes if n.startswith("left float"))
    assert "4 weight tensors" in note and "model.layers.0.mlp.experts.gate_up_proj [4, 256, 64]" in note
    assert len(rep.rows) == 11 and all(r.status == "quantized" for r in rep.rows if r.fqn != "lm_head")


def test_compile_without_use_cache_says_how():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(RuntimeError, match=r"use_cache=False: pass it in example_kwargs"):
        fxquant.compile(model, SPEC, example_kwargs=dict(input_ids=ids))
    qm = fxquant.compile(model, SPEC, example_kwargs=dict(input_ids=ids, use_cache=False))
    assert len(fxquant.report(qm).quantized) == 7


def test_gpt2_save_pretrained_round_trip(tmp_path):
    """``from_pretrained(quantization_config=FxQuantConfig(...))`` on GPT-2, whose Conv1D weights become
    PackedWeight parameters (AWQ input scales included), then ``save_pretrained`` / ``from_pretrained``:
    the packed tensors are written as plain ones and rebuilt, outputs equal bit for bit."""
    from fxquant.hf import FxQuantConfig

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "float")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (1, 16), generator=g)
    calib = [dict(input_ids=torch.randint(0, 256, (2, 32), generator=g)) for _ in range(2)]
    qc = FxQuantConfig(spec=fxquant.Spec(default="int4wo-32@awq", skip=["lm_head"]), calibration=calib,
                       example_inputs=dict(input_ids=ids))
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=qc)
    packed = {n: p for n, p in q.named_parameters() if isinstance(p, PackedWeight)}
    assert len(packed) == 8 and any(p.input_scale is not None for p in packed.values())
    q.save_pretrained(tmp_path / "q")
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    for n, p in packed.items():
        p2 = r.get_parameter(n)
        assert isinstance(p2, PackedWeight) and (p2.transposed, p2.shape, p2.dtype) == (p.transposed, p.shape, p.dtype)
        assert all(torch.equal(a, b) for a, b in zip(p.packed.tensors.values(), p2.packed.tensors.values())), n
        assert (p.input_scale is None) == (p2.input_scale is None)
        assert p.input_scale is None or torch.equal(p.input_scale, p2.input_scale)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, r(ids).logits)
    assert r.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 19)


def test_gpt2_conv1d_without_example_inputs():
    """No example: the modules front end lists GPT-2's Conv1D layers too (addmm on a [K, N] weight), with
    the same sites, bytes and outputs as the traced model's."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    models = []
    for kwargs in (dict(frontend="modules"), dict(example_kwargs=dict(input_ids=ids))):
        torch.manual_seed(0)
        m = transformers.GPT2LMHeadModel(cfg).eval()
        fxquant.quantize_(m, fxquant.Spec(default="int8wo", skip=["lm_head"]), **kwargs)
        models.append(m)
    plain, traced = (fxquant.report(m) for m in models)
    assert [r.fqn for r in plain.quantized] == [r.fqn for r in traced.quantized] and len(plain.quantized) == 8
    with torch.no_grad():
        assert torch.equal(models[0](ids).logits, models[1](ids).logits)
