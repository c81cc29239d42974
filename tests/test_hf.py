"""transformers integration: ``quant_method="fxquant"`` through ``from_pretrained`` / ``save_pretrained``.

Oracle: ``fxquant.quantize_`` applied directly to the same float model (the quantizer must make the
same decisions and bytes), and the model before saving (reloading must be bit-identical).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fxquant  # noqa: E402
from fxquant.hf import FxQuantConfig  # noqa: E402
from fxquant.modules import QuantizedLinear  # noqa: E402

VOCAB = 256


def _tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "float"
    _tiny_llama().save_pretrained(path)
    return path


IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128, 64, 1, 2, 250]])


def _load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=kw.pop("dtype", torch.float32), **kw).eval()


def test_registration_on_import_in_either_order_and_twice():
    code = """
import sys
first = sys.argv[1]
if first == "fxquant":
    import fxquant
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
else:
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
    import fxquant
import importlib, fxquant.hf
importlib.reload(fxquant.hf)  # a second registration is harmless
assert AUTO_QUANTIZATION_CONFIG_MAPPING["fxquant"].__name__.endswith("FxQuantConfig")
assert AUTO_QUANTIZER_MAPPING["fxquant"].__name__.endswith("FxQuantHfQuantizer")
print("ok")
"""
    for first in ("fxquant", "transformers"):
        out = subprocess.run([sys.executable, "-c", code, first], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_import_fxquant_does_not_import_transformers():
    out = subprocess.run([sys.executable, "-c", "import fxquant, sys; print('transformers' in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_from_pretrained_quantizes_like_quantize_(float_dir):
    spec = fxquant.Spec(default="int4wo-32", skip=["lm_head"])
    q = _load(float_dir, quantization_config=FxQuantConfig(spec=spec))
    direct = fxquant.quantize_(_load(float_dir), spec, example_kwargs=dict(input_ids=IDS))
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert not isinstance(q.lm_head, QuantizedLinear)
    sd_q, sd_d = q.state_dict(), direct.state_dict()
    assert sd_q.keys() == sd_d.keys()
    assert all(torch.equal(sd_q[k], sd_d[k]) for k in sd_q)
    assert torch.equal(q(IDS).logits, direct(IDS).logits)
    rows = {r.fqn: r.scheme for r in fxquant.report(q).rows}
    assert rows["model.layers.1.self_attn.o_proj"] == "int4wo-32" and rows["lm_head"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_reload_bit_identical_with_generate(float_dir, tmp_path, dtype):
    q = _load(float_dir, dtype=dtype, quantization_config=FxQuantConfig(spec="int4wo-32"))
    assert isinstance(q.lm_head, QuantizedLinear)  # the tied head quantized too: untied in the config
    logits = q(IDS).logits
    gen = q.generate(IDS, max_new_tokens=6, do_sample=False)
    gen_static = q.generate(IDS, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(gen, gen_static)
    q.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fxquant" and qc["spec"]["version"] == 2 and qc["layout"]["modules"]
    r = _load(tmp_path, dtype=dtype)
    assert isinstance(r.model.layers[1].mlp.up_proj, QuantizedLinear) and isinstance(r.lm_head, QuantizedLinear)
    sd_q, sd_r = q.state_dict(), r.state_dict()
    assert sd_q.keys() == sd_r.keys() and all(
        sd_q[k].dtype == sd_r[k].dtype and torch.equal(sd_q[k], sd_r[k]) for k in sd_q)
    assert torch.equal(r(IDS).logits, logits)
    assert torch.equal(r.generate(IDS, max_new_tokens=6, do_sample=False), gen)
    assert [row.scheme for row in fxquant.report(r).rows] == [row.scheme for row in fxquant.report(q).rows]


def test_reload_never_materialises_float_weights(float_dir, tmp_path, monkeypatch):
    _load(float_dir, quantization_config=FxQuantConfig(spec="int8wo")).save_pretrained(tmp_path)
    import fxquant.hf as hf

    seen = {}
    real = hf.build_packed

    def spy(model, layout, device=None, staged=False):
        q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
        seen["meta"] = q_proj.weight.is_meta
        out = real(model, layout, device, staged)
        seen["buffers"] = [t.is_meta for t in model.get_submodule("model.layers.0.self_attn.q_proj").buffers()]
        return out

    monkeypatch.setattr(hf, "build_packed", spy)
    r = _load(tmp_path)
    assert seen == {"meta": True, "buffers": [True] * len(seen["buffers"])} and seen["buffers"]
    assert not any(t.is_meta for t in r.state_dict().values())


def test_any_config_spec_through_fxquant_config(float_dir):
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    q = _load(float_dir, quantization_config=FxQuantConfig(spec=bnb))
    assert q.model.layers[0].self_attn.k_proj.scheme == "nf4-64+dq"
    assert not isinstance(q.lm_head, QuantizedLinear)  # BitsAndBytesConfig keeps lm_head float
    q2 = _load(float_dir, quantization_config=FxQuantConfig(spec=fxquant.Spec.from_config(bnb.to_dict())))
    assert torch.equal(q(IDS).logits, q2(IDS).logits)


def test_torch_compile_of_the_loaded_model(float_dir, tmp_path):
    _load(float_dir, quantization_config=FxQuantConfig(spec="int8wo")).save_pretrained(tmp_path)
    r = _load(tmp_path)
    eager = r(IDS).logits
    torch._dynamo.reset()
    compiled = torch.compile(r, fullgraph=False)
    torch.testing.assert_close(compiled(IDS).logits, eager, rtol=1e-4, atol=1e-4)


def test_bad_configs_and_checkpoints(float_dir, tmp_path):
    with pytest.raises(ValueError, match="FxQuantConfig.spec is required"):
        FxQuantConfig()
    with pytest.raises(ValueError, match="unknown fields \\['sceme'\\]"):
        FxQuantConfig(sceme="int8wo")
    with pytest.raises(ValueError, match="unknown scheme 'int9wo'"):
        FxQuantConfig(spec="int9wo")
    q = _load(float_dir, quantization_config=FxQuantConfig(spec="int8wo"))
    q.save_pretrained(tmp_path / "ok")
    # a checkpoint whose config lost its layout
    (tmp_path / "nolayout").mkdir()
    for name in os.listdir(tmp_path / "ok"):
        (tmp_path / "nolayout" / name).write_bytes((tmp_path / "ok" / name).read_bytes())
    cfg = json.loads((tmp_path / "nolayout" / "config.json").read_text())
    cfg["quantization_config"]["layout"] = None
    (tmp_path / "nolayout" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no 'layout'"):
        _load(tmp_path / "nolayout")
    # a layout naming a layer of another shape
    cfg["quantization_config"]["layout"] = json.loads((tmp_path / "ok" / "config.json").read_text())[
        "quantization_config"]["layout"]
    cfg["quantization_config"]["layout"]["modules"]["model.layers.0.mlp.up_proj"]["out_features"] = 7
    (tmp_path / "nolayout" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.*shape"):
        _load(tmp_path / "nolayout")


CONFIGS = {  # every ecosystem's dict form, as a config.json holds it, through FxQuantConfig(spec=...)
    "torchao": {"quant_method": "torchao", "quant_type": "int4_weight_only", "quant_type_kwargs": {"group_size": 32}},
    "hqq": {"quant_method": "hqq", "nbits": 4, "group_size": 32, "axis": 1},
    "quanto": {"quant_method": "quanto", "weights": "int8"},
    "eetq": {"quant_method": "eetq", "weights": "int8"},
    "fbgemm_fp8": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                               "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                               "group_size": 32}}}},
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_every_config_kind_through_fxquant_config(float_dir, tmp_path, kind):
    cfg = CONFIGS[kind]
    spec = fxquant.Spec.from_config(cfg)
    needs_data = spec.default.method is not None and spec.default.method.needs_data
    calibration = [{"input_ids": IDS}, {"input_ids": IDS.flip(1)}] if needs_data else None
    q = _load(float_dir, quantization_config=FxQuantConfig(spec=cfg, calibration=calibration))
    direct = fxquant.quantize_(_load(float_dir), spec, example_kwargs=dict(input_ids=IDS), calibration=calibration)
    assert torch.equal(q(IDS).logits, direct(IDS).logits)
    assert {r.scheme for r in fxquant.report(q).rows if r.status == "quantized"} == {str(spec.default)}
    q.save_pretrained(tmp_path)
    assert torch.equal(_load(tmp_path)(IDS).logits, q(IDS).logits)


def test_calibration_texts_tokenized_with_the_models_tokenizer(float_dir, tmp_path):
    """``FxQuantConfig(calibration=[texts])``: tokenized with the tokenizer saved beside the model, the
    same codes as ``quantize_`` calibrated on those tokens by hand."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of to and in is it that was he for on are with as his they at be this from".split()
    inner = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    path = tmp_path / "with_tokenizer"
    shutil.copytree(float_dir, path)
    tok.save_pretrained(path)
    texts = ["the cat sat on the mat and it was at the door " * 3, "he is with this from that to be a"]
    spec = fxquant.Spec(default="int4wo-32@gptq", skip=["lm_head"])
    q = _load(path, quantization_config=FxQuantConfig(spec=spec, calibration=texts))
    batches = [dict(tok(t, return_tensors="pt")) for t in texts]
    direct = fxquant.quantize_(_load(path), spec, calibration=batches)
    assert torch.equal(q(IDS).logits, direct(IDS).logits)
    rep = fxquant.report(q).results["model.layers.0.mlp.up_proj"]
    assert rep["calibration_tokens"] == sum(b["input_ids"].numel() for b in batches) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantize_in_place_then_save_pretrained_loads_back_packed(arch, tmp_path):
    """fxquant.quantize_ on a transformers model (not loaded with FxQuantConfig) leaves the config and
    quantizer from_pretrained would have: save_pretrained writes the layout, from_pretrained loads the
    packed tensors (nn.Linear and GPT-2's Conv1D sites), bit for bit; a quantized tied head is untied,
    so tie_weights() leaves it alone."""
    if arch == "llama":
        model = _tiny_llama(tie=True)
    else:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                                     n_positions=64)).eval()
    fxquant.quantize_(model, "int4wo-32", example_kwargs=dict(input_ids=IDS))
    assert isinstance(model.config.quantization_config, FxQuantConfig)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "fxquant"
    again = _load(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, want)
