"""transformers' ``from_pretrained`` with ``FxQuantConfig`` on SmolLM2-135M (real weights, offline):
quantize on load, generate, save_pretrained, reload bit-identical, and a BitsAndBytesConfig read by
``Spec.from_config``.  Oracle: the model before saving, and the text it generates."""
import pytest
import torch

import fxquant

pytestmark = pytest.mark.models

PROMPT = "The capital of France is"


def test_from_pretrained_generate_save_reload(smollm2, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fxquant.hf import FxQuantConfig
    from fxquant.modules import QuantizedLinear

    _, tok = smollm2
    spec = fxquant.Spec(default="int4wo-64", skip=["lm_head"])
    q = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                             quantization_config=FxQuantConfig(spec=spec)).eval()
    rows = fxquant.report(q).rows
    assert sum(r.status == "quantized" for r in rows) == 210  # 30 layers x 7 projections, 576 = 9 x 64
    ids = tok(PROMPT, return_tensors="pt").input_ids
    logits = q(ids).logits  # (equal to quantize_ on the same model: tests/test_hf.py)
    out = q.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    q.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(r.model.layers[29].mlp.down_proj, QuantizedLinear)
    assert torch.equal(r(ids).logits, logits)
    assert torch.equal(r.generate(ids, max_new_tokens=12, do_sample=False), out)
    assert torch.equal(r.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static"), out)


@pytest.mark.slow  # CI time; the same path on a tiny model in tests/test_hf.py
def test_bitsandbytes_config_through_fxquant(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fxquant.hf import FxQuantConfig

    _, tok = smollm2
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    q = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                             quantization_config=FxQuantConfig(spec=bnb)).eval()
    schemes = {r.scheme for r in fxquant.report(q).rows if r.status == "quantized"}
    assert schemes == {"nf4-64"}
    assert q.model.layers[0].self_attn.q_proj.op_attrs["compute_dtype"] == torch.bfloat16
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = q.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow  # CI time; the same path with a small tokenizer in tests/test_hf.py
def test_from_pretrained_calibrates_on_texts(smollm2, smollm2_dir):
    """``FxQuantConfig(calibration=[texts])`` for a method that needs data: the texts tokenized with the
    model's own tokenizer, as ``quantize_`` calibrated on those tokens by hand (same codes)."""
    from transformers import AutoModelForCausalLM

    from fxquant.hf import FxQuantConfig

    _, tok = smollm2
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "Paris is the capital and largest city of France."]
    spec = fxquant.Spec(default=None, rules={"model.layers.3.mlp.down_proj": "int4wo-64@awq"})
    q = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32,
                                             quantization_config=FxQuantConfig(spec=spec, calibration=texts)).eval()
    batches = [dict(tok(t, return_tensors="pt")) for t in texts]
    direct = fxquant.quantize_(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), spec,
                               calibration=batches)
    got, want = q.model.layers[3].mlp, direct.model.layers[3].mlp
    assert torch.equal(got.down_proj.qweight, want.down_proj.qweight)
    assert torch.equal(got.up_proj.weight, want.up_proj.weight)  # AWQ's scale, folded into up_proj's rows
    n_tokens = sum(b["input_ids"].numel() for b in batches)
    assert fxquant.report(q).results["model.layers.3.mlp.down_proj"]["calibration_tokens"] == n_tokens
