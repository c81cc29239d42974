"""``Spec.from_config`` / ``to_config`` for GPTQ and AWQ, and IntX's per-channel ``group_size=-1``.

Oracles: the seed 001 signatures of ``GPTQConfig`` / ``AwqConfig`` (every documented field at its
documented default must read), real ``transformers.GPTQConfig(...).to_dict()`` / ``AwqConfig`` (5.x
carries the GPTQ fields in AWQ's dict too; the config objects' attributes are what the spec must
say), transformers' own ``should_convert_module`` for ``modules_to_not_convert``, and a plain-torch
per-row symmetric quantizer for ``-ch``."""
import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.methods import AWQ, GPTQ
from fxquant.schemes import IntX, parse_scheme

transformers = pytest.importorskip("transformers")
from transformers import AwqConfig, GPTQConfig  # noqa: E402
from transformers.quantizers.quantizers_utils import should_convert_module  # noqa: E402

SEED = Path("/work/shared/seeds/001_96e8819537c9ab3c.txt")


def seed_signature(cls: str) -> dict:
    """``{field: documented default}`` from seed 001's ``class transformers.<cls>`` signature."""
    text = SEED.read_text()
    sig = re.search(rf"class transformers\.{cls}\s.*?\n\(\s*(.*?)\*\*kwargs \)", text, re.S).group(1)
    out = {}
    for part in re.split(r"\s(?=\w+: )", sig.strip()):
        name, _, rest = part.partition(": ")
        default = rest.partition(" = ")[2].strip()
        try:
            out[name] = ast.literal_eval(default) if default else None
        except (ValueError, SyntaxError):  # an enum repr: <AWQLinearVersion.GEMM: 'gemm'>
            out[name] = re.search(r"'(.*)'", default).group(1)
    return out


def to_dict(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items()}


# -- the seed's documented fields ---------------------------------------------------------------------
def test_seed_gptq_signature_reads_with_its_defaults():
    fields = seed_signature("GPTQConfig")
    assert {"bits", "dataset", "damp_percent", "desc_act", "sym", "true_sequential", "use_exllama",
            "modules_in_block_to_quantize", "checkpoint_format"} <= set(fields)
    spec = Spec.from_config({"quant_method": "gptq", **fields, "bits": 4})
    scheme = spec.default
    assert isinstance(scheme, IntX) and scheme.bits == 4 and scheme.group_size == fields["group_size"]
    assert scheme.symmetric == fields["sym"]
    assert scheme.method == GPTQ(damp_percent=fields["damp_percent"], act_order=fields["desc_act"],
                                 true_sequential=fields["true_sequential"])
    assert spec.calibration_texts == ()


def test_seed_awq_signature_reads_with_its_defaults():
    fields = seed_signature("AwqConfig")
    assert {"bits", "group_size", "zero_point", "version", "backend", "modules_to_not_convert"} <= set(fields)
    spec = Spec.from_config({"quant_method": "awq", **fields})
    assert spec.default == IntX(bits=fields["bits"], group_size=fields["group_size"],
                                symmetric=not fields["zero_point"], method=AWQ())
    assert any("backend='autoawq'" in n for n in spec.notes)  # the seed's default backend is a note


# -- real transformers configs ------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(bits=4),
    dict(bits=3, group_size=64, sym=False, damp_percent=0.05, true_sequential=False, act_group_aware=False),
    dict(bits=8, group_size=-1, desc_act=True, dataset=["a text", "another text"]),
    dict(bits=2, group_size=32, tokenizer="some/model", batch_size=4, model_seqlen=512, backend="marlin",
         max_input_length=4096, cache_block_outputs=False, format="gptq_v2"),
])
def test_gptq_config_to_dict(kw):
    cfg = GPTQConfig(**kw)
    spec = Spec.from_config(cfg)  # the object: its to_dict()
    assert Spec.from_config(to_dict(cfg)) == spec
    s = spec.default
    assert (s.bits, s.group_size, s.symmetric, s.axis) == (cfg.bits, cfg.group_size, cfg.sym, 1)
    assert s.method == GPTQ(damp_percent=cfg.damp_percent, act_order=cfg.desc_act or cfg.act_group_aware,
                            true_sequential=cfg.true_sequential)
    assert spec.calibration_texts == tuple(cfg.dataset or ())
    assert not Spec.from_config(cfg).choose("lm_head").scheme  # optimum quantizes the blocks only
    inert = [k for k in ("tokenizer", "batch_size", "model_seqlen", "backend", "max_input_length",
                         "cache_block_outputs", "format") if k in kw]
    for k in inert:
        assert any(f"GPTQConfig: {k}=" in n for n in spec.notes), (k, spec.notes)


def test_gptq_damp_percent_default_is_the_configs():
    d = to_dict(GPTQConfig(bits=4))
    del d["damp_percent"]
    assert Spec.from_config(d).default.method.damp_percent == GPTQConfig(bits=4).damp_percent == 0.1


def test_gptq_act_order_notes():
    gar = Spec.from_config(GPTQConfig(bits=4))  # 5.x default: act_group_aware=True
    assert gar.default.method.act_order and any("act_group_aware=True" in n for n in gar.notes)
    desc = Spec.from_config({**to_dict(GPTQConfig(bits=4, desc_act=True)), "static_groups": False})
    assert desc.default.method.act_order and any("static_groups=False" in n for n in desc.notes)
    old = Spec.from_config({"quant_method": "gptq", "bits": 4, "desc_act": False})  # 4.x: no GAR
    assert not old.default.method.act_order


def test_gptq_dataset_name_is_a_note():
    spec = Spec.from_config(GPTQConfig(bits=4, dataset="c4"))
    assert spec.calibration_texts == () and any("dataset='c4'" in n and "calibration=" in n for n in spec.notes)


@pytest.mark.parametrize("field,value,match", [
    ("bits", 9, r"GPTQConfig\.bits: 9 is not supported; valid: an integer in 1\.\.8"),
    ("bits", True, r"GPTQConfig\.bits"),
    ("group_size", 0, r"GPTQConfig\.group_size: 0 .*-1"),
    ("sym", "yes", r"GPTQConfig\.sym: 'yes' is not supported; valid: True, False"),
    ("damp_percent", 1.5, r"GPTQConfig\.damp_percent: 1\.5 .*\(0, 1\)"),
    ("dataset", "pile", r"GPTQConfig\.dataset: 'pile' .*'wikitext2', 'c4', 'c4-new'"),
    ("dataset", [], r"GPTQConfig\.dataset"),
    ("modules_in_block_to_quantize", ["q_proj"], r"GPTQConfig\.modules_in_block_to_quantize: .*list of lists"),
    ("desc_act_typo", True, r"GPTQConfig\.desc_act_typo: no version of GPTQConfig has this field"),
])
def test_gptq_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        Spec.from_config({**to_dict(GPTQConfig(bits=4)), field: value})


def test_gptq_one_bit_symmetric_names_the_field():
    with pytest.raises(ValueError, match=r"GPTQConfig\.sym: 1 bits with sym=True"):
        Spec.from_config({"quant_method": "gptq", "bits": 1, "sym": True})


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_proj", "k_proj")})
        self.mlp = nn.ModuleDict({"down_proj": nn.Linear(d, d)})

    def forward(self, x):
        a = self.self_attn
        return x + self.mlp["down_proj"](torch.relu(a["q_proj"](x) + a["k_proj"](x)))


class Tiny(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, 32)

    def forward(self, x):
        for b in self.model.layers:
            x = b(x)
        return self.lm_head(x)


def test_modules_in_block_to_quantize_quantizes_only_those():
    torch.manual_seed(0)
    d = {**to_dict(GPTQConfig(bits=4, group_size=32, block_name_to_quantize="model.layers")),
         "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.down_proj"]]}
    spec = Spec.from_config(d)
    model = Tiny()
    x = torch.randn(2, 8, 64)
    fxquant.quantize_(model, spec, x, calibration=[torch.randn(2, 8, 64) for _ in range(2)])
    rows = fxquant.report(model).rows
    linears = {n for n, m in Tiny().named_modules() if isinstance(m, nn.Linear)}
    assert {r.fqn for r in rows} == linears
    want = {f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")}
    assert {r.fqn for r in rows if r.status == "quantized"} == want
    assert all(r.method == "gptq" for r in rows if r.status == "quantized")


# -- per-channel (group_size=-1) --------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_is_one_symmetric_group_per_row(bits):
    torch.manual_seed(1)
    w = torch.randn(24, 200) * torch.linspace(0.1, 3, 24)[:, None]
    scheme = parse_scheme(f"int{bits}wo-ch{'-sym' if bits == 4 else ''}")
    assert scheme == IntX(bits=bits, group_size=-1, symmetric=True)
    deq = scheme.dequantize(scheme.quantize(w))
    # plain torch: GPTQ's symmetric grid, scale = absmax / ((2**b - 1) / 2) per row, codes -2**(b-1)..2**(b-1)-1,
    # the scale stored in bf16 rounded up (so the range fits the codes)
    scale = w.abs().amax(1, keepdim=True) / ((2 ** bits - 1) / 2)
    up = scale.to(torch.bfloat16)
    up = torch.where(up.float() < scale, (up.view(torch.int16) + 1).view(torch.bfloat16), up).float()
    codes = torch.round(w / up).clamp(-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    torch.testing.assert_close(deq, codes * up, rtol=0, atol=1e-6)
    assert ((deq - w).abs() <= up * 0.5 + 1e-6).all()
    fixed = IntX(bits=bits, group_size=200, symmetric=True)  # the same groups, written out
    assert torch.equal(deq, fixed.dequantize(fixed.quantize(w)))


def test_per_channel_gptq_runs_on_its_grid():
    torch.manual_seed(2)
    spec = Spec.from_config(GPTQConfig(bits=4, group_size=-1, sym=False))
    assert str(spec.default) == "uint4wo-ch@gptq"
    model = Tiny()
    ref = model(torch.ones(1, 64))
    fxquant.quantize_(model, spec, torch.randn(2, 4, 64), calibration=[torch.randn(2, 16, 64) for _ in range(2)])
    out = model(torch.ones(1, 64))
    assert float((out - ref).norm() / ref.norm()) < 0.2


# -- AWQ ---------------------------------------------------------------------------------------------
def test_awq_default_config():
    cfg = AwqConfig()
    spec = Spec.from_config(cfg)
    assert spec.default == IntX(bits=cfg.bits, group_size=cfg.group_size, symmetric=not cfg.zero_point,
                                method=AWQ())
    assert spec.notes == ()  # every inherited GPTQ field at its default, format gemm


@pytest.mark.parametrize("kw", [dict(zero_point=False, group_size=64), dict(bits=4, group_size=-1),
                                dict(modules_to_not_convert=["visual", "mlp.gate"])])
def test_awq_config_to_dict(kw):
    cfg = AwqConfig(**kw)
    spec = Spec.from_config(to_dict(cfg))
    s = spec.default
    assert (s.bits, s.group_size, s.symmetric) == (cfg.bits, cfg.group_size, not cfg.zero_point)
    skip = ["lm_head", *(cfg.modules_to_not_convert or [])]  # transformers adds the default skips
    for name in ("lm_head", "model.lm_head", "visual.proj", "visual.blocks.0.attn", "model.layers.0.mlp.gate",
                 "model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.q_proj", "visual_head"):
        assert (spec.choose(name).scheme is None) == (not should_convert_module(name, skip)), name
    if cfg.modules_to_not_convert:  # fxquant also tries each dotted suffix (a bare or a wrapped model)
        assert spec.choose("model.visual.blocks.0.attn").scheme is None


def test_awq_inherited_gptq_fields_are_notes():
    d = to_dict(AwqConfig())
    d.update(desc_act=True, damp_percent=0.2, sym=False, version="gemv", do_fuse=True)
    spec = Spec.from_config(d)
    assert spec.default == Spec.from_config(AwqConfig()).default
    for field in ("desc_act", "damp_percent", "sym", "version", "do_fuse"):
        assert any(f"AwqConfig: {field}=" in n for n in spec.notes), field


@pytest.mark.parametrize("field,value,match", [
    ("zero_point", 1, r"AwqConfig\.zero_point: 1 is not supported; valid: True, False"),
    ("version", "gguf", r"AwqConfig\.version: 'gguf' is not supported; valid: 'gemm', 'gemv'"),
    ("modules_to_not_convert", "lm_head", r"AwqConfig\.modules_to_not_convert: expected a list"),
    ("static_groups", True, r"AwqConfig\.static_groups: no version of AwqConfig has this field"),
])
def test_awq_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        Spec.from_config({**to_dict(AwqConfig()), field: value})


# -- writers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    Spec.from_config(GPTQConfig(bits=4)),
    Spec.from_config(GPTQConfig(bits=3, group_size=-1, sym=False, damp_percent=0.02, desc_act=True,
                                true_sequential=False, dataset=["x y z"])),
])
def test_gptq_round_trip_through_transformers(spec):
    d = spec.to_config("gptq")
    cfg = GPTQConfig(**{k: v for k, v in d.items() if k != "quant_method"})  # transformers validates it
    assert Spec.from_config(cfg) == spec


def test_gptq_round_trip_block_rules():
    d = {**to_dict(GPTQConfig(bits=4, block_name_to_quantize="model.layers")),
         "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj"]]}
    spec = Spec.from_config(d)
    out = spec.to_config("gptq")
    assert out["block_name_to_quantize"] == "model.layers"
    assert out["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.k_proj"]]
    assert Spec.from_config(out) == spec


@pytest.mark.parametrize("spec", [Spec.from_config(AwqConfig()),
                                  Spec.from_config(AwqConfig(zero_point=False, group_size=64,
                                                             modules_to_not_convert=["visual"]))])
def test_awq_round_trip_through_transformers(spec):
    d = spec.to_config("awq")
    assert Spec.from_config(AwqConfig(**{k: v for k, v in d.items() if k != "quant_method"})) == spec


@pytest.mark.parametrize("kind,spec,match", [
    ("gptq", Spec(default="int4wo-128-sym", skip=["lm_head"]), r"is not quantized with GPTQ"),
    ("gptq", Spec(default="nf4@rtn"), r"is not quantized with GPTQ"),
    ("gptq", Spec(default=IntX(bits=4, group_size=64, method=GPTQ(block_size=64))), r"block_size=64"),
    ("gptq", Spec(default="int4wo-64@gptq"), r"int4wo-64 has no gptq form"),
    ("gptq", Spec(default="uint4wo-64@gptq"), r"every linear but lm_head"),
    ("awq", Spec(default="uint4wo-64@awq", rules={"re:.*q_proj": "uint4wo-64@awq"}), r"rules have no AwqConfig"),
    ("awq", Spec(default=IntX(bits=4, group_size=64, method=AWQ(n_grid=10))), r"valid: AWQ\(\)"),
    ("awq", Spec(default="uint4wo-64@awq"), r"always keeps lm_head"),
])
def test_writers_refuse_what_the_config_cannot_say(kind, spec, match):
    with pytest.raises(ValueError, match=match):
        spec.to_config(kind)


@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_writers_take_a_plain_lm_head_skip(kind):
    """``skip=["lm_head"]`` as a user writes it says what the config's implicit lm_head exclusion says."""
    spec = Spec(default=f"uint4wo-128@{kind}", skip=["lm_head"])
    d = spec.to_config(kind)
    back = Spec.from_config(d)
    assert back.default == spec.default and back.choose("lm_head").scheme is None
    assert back.choose("model.layers.0.mlp.down_proj").scheme == spec.default
