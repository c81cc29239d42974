"""``Spec.from_config`` / ``to_config`` for bitsandbytes.

Oracles: transformers' and diffusers' own ``BitsAndBytesConfig(...).to_dict()`` (the real dict form,
both constructible without bitsandbytes), the fields and defaults documented in seeds 001 / 003
(threshold 6.0, ``fp4`` default, ``lm_head`` kept), and bitsandbytes' own 4-bit quantization."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.modules import QuantizedLinear
from fxquant.schemes import FP4, NF4, Bnb8

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
CONFIGS = [transformers.BitsAndBytesConfig, diffusers.BitsAndBytesConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__module__.split(".")[0])
@pytest.mark.parametrize("kwargs,scheme", [
    (dict(load_in_8bit=True), Bnb8(threshold=6.0)),
    (dict(load_in_8bit=True, llm_int8_threshold=4.5), Bnb8(threshold=4.5)),
    (dict(load_in_8bit=True, llm_int8_threshold=0.0), Bnb8(threshold=0.0)),  # no outlier columns
    (dict(load_in_4bit=True), FP4(blocksize=64, compute_dtype=torch.float32)),  # fp4 and fp32 by default
    (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), NF4(blocksize=64, compute_dtype=torch.float32)),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
          bnb_4bit_compute_dtype=torch.bfloat16), NF4(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
          bnb_4bit_compute_dtype="float16"), FP4(blocksize=64, double_quant=True, compute_dtype=torch.float16)),
])
def test_real_configs_map_to_documented_schemes(cls, kwargs, scheme):
    for cfg in (cls(**kwargs), cls(**kwargs).to_dict()):
        spec = Spec.from_config(cfg)
        assert spec.default == scheme
        assert spec.notes == ()  # every other field is at its default
        assert spec.choose("lm_head").scheme is None and spec.choose("model.layers.0.mlp.up_proj").scheme == scheme


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__module__.split(".")[0])
def test_skip_modules_keep_transformers_meaning(cls):
    spec = Spec.from_config(cls(load_in_4bit=True, llm_int8_skip_modules=["proj_out", "layers.1"]))
    assert spec.choose("proj_out").scheme is None and spec.choose("lm_head").scheme is not None
    assert spec.choose("model.layers.1.mlp").scheme is None
    assert spec.choose("model.layers.11.mlp").scheme is not None  # a module boundary, not a prefix
    assert Spec.from_config(cls(load_in_8bit=True, llm_int8_skip_modules=[])).skip == ()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__module__.split(".")[0])
def test_inert_fields_are_notes(cls):
    spec = Spec.from_config(cls(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16,
                                llm_int8_enable_fp32_cpu_offload=True, llm_int8_threshold=5.0))
    assert isinstance(spec.default, FP4)
    text = " ".join(spec.notes)
    assert "bnb_4bit_quant_storage" in text and "llm_int8_enable_fp32_cpu_offload" in text
    assert "llm_int8_threshold has no effect with load_in_4bit" in text
    spec8 = Spec.from_config(cls(load_in_8bit=True, bnb_4bit_quant_type="nf4"))
    assert any("bnb_4bit_quant_type" in n for n in spec8.notes)


def _bnb_dict(**kw):
    return {**transformers.BitsAndBytesConfig(load_in_4bit=True).to_dict(), **kw}


@pytest.mark.parametrize("cfg,field,valid", [
    (_bnb_dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type", "'fp4', 'nf4'"),
    (_bnb_dict(load_in_8bit=True, _load_in_8bit=True), "load_in_4bit", "mutually exclusive"),
    (_bnb_dict(load_in_4bit=False, _load_in_4bit=False), "load_in_4bit", "load_in_8bit=True or load_in_4bit=True"),
    (_bnb_dict(load_in_4bit=False), "load_in_4bit", "disagrees"),
    (_bnb_dict(llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight", "False"),
    (_bnb_dict(bnb_4bit_compute_dtype="int8"), "bnb_4bit_compute_dtype", "float32, bfloat16, float16"),
    (_bnb_dict(llm_int8_threshold=-1.0), "llm_int8_threshold", ">= 0"),
    (_bnb_dict(bnb_4bit_blocksize=128), "bnb_4bit_blocksize", "no version"),
    (_bnb_dict(llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules", "list of module names"),
])
def test_invalid_configs_name_config_and_field(cfg, field, valid):
    with pytest.raises(ValueError) as e:
        Spec.from_config(cfg)
    msg = str(e.value)
    assert msg.startswith("BitsAndBytesConfig") and field in msg and valid in msg, msg


def test_bitsandbytes_own_dict_has_no_quant_method():
    d = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
    d.pop("quant_method")
    assert isinstance(Spec.from_config(d).default, NF4)


@pytest.mark.parametrize("scheme", ["bnb8", "bnb8-4.5", "bnb8-0.0", "nf4-64", "fp4-64+dq",
                                    NF4(blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)], ids=str)
@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__module__.split(".")[0])
def test_round_trip_through_the_real_config(scheme, cls):
    """The written dict is one the real config class takes, and reads back as the same spec."""
    spec = Spec.from_config(transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head",
                                                                                                     "proj"]))
    spec = Spec(default=scheme, skip=spec.skip)
    d = spec.to_config("bitsandbytes")
    assert Spec.from_config(d) == spec
    real = cls.from_dict(d)
    back = Spec.from_config(real)
    assert back.skip == spec.skip
    dtype = spec.default.compute_dtype
    assert back.default == (spec.default if dtype is not None or isinstance(spec.default, Bnb8)
                            else type(spec.default)(blocksize=64, double_quant=spec.default.double_quant,
                                                    compute_dtype=torch.float32))  # the class's fp32 default


@pytest.mark.parametrize("spec", [Spec(default="nf4-128"), Spec(default="int8wo"), Spec(default="int4wo-64"),
                                  Spec(default="nf4-64", rules={"re:.*q_proj": "fp4-64"}),
                                  Spec(default="nf4-64", skip=["re:.*q_proj"])], ids=str)
def test_inexpressible_specs_raise(spec):
    with pytest.raises(ValueError, match="to_config\\('bitsandbytes'\\)"):
        spec.to_config("bitsandbytes")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(256, 128, bias=False)
        self.lm_head = nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.lm_head(torch.relu(self.proj(x)))


def test_end_to_end_matches_bitsandbytes_and_reports_notes():
    """The spec of a real config quantizes a model; the report carries the config's notes; the
    layer's dequantized weight is bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` of the
    same weight bit for bit (the nf4 format is bitsandbytes' layout)."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_quant_storage=torch.bfloat16)
    spec = Spec.from_config(cfg)
    model = Tiny()
    w = model.proj.weight.detach().clone()
    fxquant.quantize_(model, spec, (torch.randn(2, 256),))
    assert isinstance(model.proj, QuantizedLinear) and not isinstance(model.lm_head, QuantizedLinear)
    assert all(n in str(fxquant.report(model)) for n in spec.notes) and spec.notes
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ref = bnb.functional.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")
    assert torch.equal(model.proj.dequantize(), ref.float())
