"""``Spec.from_config`` / ``to_config`` for HQQ.

Oracles: the fields and defaults of ``HqqConfig`` documented in seed 001 (``nbits`` 4, ``group_size``
64, ``axis`` 1, ``skip_modules`` ``["lm_head"]``), the dict ``hqq.core.quantize.BaseQuantizeConfig``
returns (hqq 0.2.8, written out below as ``base_quant_config``; the real function is used too when
``hqq`` is importable), transformers' own ``name_to_linear_tag`` for which modules a tag names, and
hqq's own ``Quantizer.quantize`` when importable."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.configs.hqq import pattern_tag, tag_pattern
from fxquant.methods import HQQ
from fxquant.modules import QuantizedLinear
from fxquant.schemes import IntX
from fxquant.spec import Pattern

transformers = pytest.importorskip("transformers")
from transformers.integrations.hqq import name_to_linear_tag  # noqa: E402  (pure: no hqq needed)


def base_quant_config(nbits=4, group_size=64, offload_meta=False, view_as_float=False, axis=1):
    """What hqq 0.2.8's ``BaseQuantizeConfig`` returns (no quantized meta-data)."""
    wp = {"nbits": nbits, "channel_wise": True, "group_size": group_size, "optimize": True,
          "round_zero": nbits == 4, "axis": axis, "view_as_float": view_as_float}
    return {"weight_quant_params": wp, "scale_quant_params": None, "zero_quant_params": None,
            "offload_meta": offload_meta}


def to_dict(quant_config, skip_modules=("lm_head",)):
    """``HqqConfig.to_dict()``'s form."""
    return {"quant_method": "hqq", "quant_config": quant_config, "skip_modules": list(skip_modules)}


def hqq_scheme(bits, group, axis=1, optimize=True):
    return IntX(bits=bits, group_size=group, axis=axis, method=HQQ() if optimize else None)


@pytest.mark.parametrize("fields,scheme", [
    ({}, hqq_scheme(4, 64)),  # HqqConfig()'s defaults
    ({"nbits": 4, "group_size": 64}, hqq_scheme(4, 64)),
    ({"nbits": 8, "group_size": 128}, hqq_scheme(8, 128)),
    ({"nbits": 3, "group_size": 32, "axis": 0}, hqq_scheme(3, 32, axis=0)),
    ({"nbits": 2, "group_size": 16, "axis": None}, hqq_scheme(2, 16)),  # axis None: 1
    ({"nbits": 1, "group_size": 8, "view_as_float": True}, hqq_scheme(1, 8)),
    ({"nbits": 5}, hqq_scheme(5, 64)),
    ({"nbits": 6, "group_size": None}, hqq_scheme(6, -1)),  # one group per row
])
def test_constructor_fields(fields, scheme):
    spec = Spec.from_config({"quant_method": "hqq", **fields})
    assert spec.default == scheme
    assert spec.rules == ()
    assert spec.choose("lm_head").scheme is None  # skip_modules default ["lm_head"]
    assert any("view_as_float" in n for n in spec.notes) == bool(fields.get("view_as_float"))


@pytest.mark.parametrize("kwargs", [dict(), dict(nbits=2, group_size=16, axis=0), dict(nbits=3, view_as_float=True,
                                                                                        offload_meta=True)])
def test_to_dict_form_matches_constructor_form(kwargs):
    """The serialised layer config (BaseQuantizeConfig's dict) reads as its arguments do."""
    ser = Spec.from_config(to_dict(base_quant_config(**kwargs)))
    ctor = Spec.from_config({"quant_method": "hqq", "dynamic_config": {"self_attn.q_proj": kwargs}})
    assert ser.default == ctor.rules[0].scheme
    assert ("offload_meta" in " ".join(ser.notes)) == kwargs.get("offload_meta", False)


def test_real_base_quant_config_when_hqq_is_importable():
    hqq = pytest.importorskip("hqq.core.quantize")
    for kw in (dict(), dict(nbits=2, group_size=16, axis=0), dict(nbits=8, group_size=None)):
        assert hqq.BaseQuantizeConfig(**kw) == base_quant_config(**kw)
        Spec.from_config(to_dict(hqq.BaseQuantizeConfig(**kw)))


NAMES = ["model.layers.31.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj",
         "lm_head", "model.decoder.layers.3.fc1", "model.layers.1.block_sparse_moe.experts.7.w1"]


@pytest.mark.parametrize("tag", sorted({name_to_linear_tag(n) for n in NAMES}))
def test_tag_patterns_match_what_transformers_tags(tag):
    pattern = Pattern(tag_pattern(tag, "test"))
    for name in NAMES:
        assert pattern.matches(name) == (name_to_linear_tag(name) == tag), name
    assert pattern_tag(pattern.text) == tag


def test_dynamic_config_is_per_tag_rules():
    """Layers whose tag is a key get its config (None: float); the others stay in float, as
    transformers' prepare_for_hqq_linear does; skip_modules first."""
    cfg = {"quant_method": "hqq", "skip_modules": ["lm_head", "mlp.gate_proj"],
           "dynamic_config": {"self_attn.q_proj": {"nbits": 4, "group_size": 64},
                              "mlp.down_proj": {"nbits": 2, "group_size": 16, "axis": 0},
                              "mlp.gate_proj": {"nbits": 8}}}
    spec = Spec.from_config(cfg)
    assert spec.default is None
    assert spec.choose("model.layers.5.self_attn.q_proj").scheme == hqq_scheme(4, 64)
    assert spec.choose("model.layers.5.mlp.down_proj").scheme == hqq_scheme(2, 16, axis=0)
    assert spec.choose("model.layers.5.mlp.gate_proj").scheme is None
    assert spec.choose("model.layers.5.self_attn.k_proj").scheme is None
    serial = to_dict({"self_attn.q_proj": base_quant_config(4, 64), "mlp.down_proj": base_quant_config(2, 16, axis=0),
                      "mlp.gate_proj": base_quant_config(8)}, ["lm_head", "mlp.gate_proj"])
    assert Spec.from_config(serial) == spec


def test_dynamic_config_with_top_level_fields_notes_them():
    spec = Spec.from_config({"quant_method": "hqq", "nbits": 2, "dynamic_config": {"self_attn.o_proj": {"nbits": 3}}})
    assert spec.rules[0].scheme == hqq_scheme(3, 64)
    assert any("nbits=2" in n for n in spec.notes)


@pytest.mark.parametrize("cfg,field,valid", [
    ({"nbits": 7}, "nbits", "1, 2, 3, 4, 5, 6, 8"),
    ({"nbits": 1.58}, "nbits", "1, 2, 3, 4, 5, 6, 8"),
    ({"nbits": 9}, "nbits", "1, 2, 3, 4, 5, 6, 8"),
    ({"group_size": 48 + 2}, "group_size", "multiple of 8"),
    ({"axis": 2}, "axis", "0, 1"),
    ({"quant_zero": True}, "quant_zero", "no version"),
    ({"dynamic_config": {"self_attn.q_proj": {"nbits": 4, "quant_scale": True}}}, "quant_scale", "False"),
    ({"dynamic_config": {"layers.0.self_attn.q_proj": {"nbits": 4}}}, "dynamic_config", "linear tag"),
    ({"skip_modules": ["model.lm_head"]}, "skip_modules", "linear tag"),
    ({"quant_config": base_quant_config(), "nbits": 4}, "nbits", "one of the two forms"),
    ({"quant_config": {**base_quant_config(), "zero_quant_params": {"nbits": 8}}}, "zero_quant_params", "None"),
    ({"quant_config": {**base_quant_config(), "weight_quant_params": {
        **base_quant_config()["weight_quant_params"], "optimize": False}}}, "round_zero", "optimize=True"),
    ({"quant_config": {**base_quant_config(), "weight_quant_params": {
        **base_quant_config()["weight_quant_params"], "channel_wise": False}}}, "channel_wise", "True"),
    ({"quant_config": {**base_quant_config(), "weight_quant_params": {
        **base_quant_config()["weight_quant_params"], "bitpack": True}}}, "bitpack", "no version"),
])
def test_invalid_configs_name_config_and_field(cfg, field, valid):
    with pytest.raises(ValueError) as e:
        Spec.from_config({"quant_method": "hqq", **cfg})
    msg = str(e.value)
    assert msg.startswith("HqqConfig") and field in msg and valid in msg, msg


def test_round_zero_note_and_rtn():
    assert any("round_zero" in n for n in Spec.from_config({"quant_method": "hqq", "nbits": 4}).notes)
    assert not Spec.from_config({"quant_method": "hqq", "nbits": 3}).notes
    rtn = base_quant_config(3, 32)
    rtn["weight_quant_params"]["optimize"] = False
    assert Spec.from_config(to_dict(rtn)).default == hqq_scheme(3, 32, optimize=False)


@pytest.mark.parametrize("spec", [
    Spec(default=hqq_scheme(4, 64), skip=[tag_pattern("lm_head", "")]),
    Spec(default=hqq_scheme(3, 32, axis=0, optimize=False), skip=[]),
    Spec(default=hqq_scheme(8, -1), skip=[tag_pattern("lm_head", ""), tag_pattern("mlp.gate", "")]),
    Spec(rules=[(tag_pattern("self_attn.q_proj", ""), hqq_scheme(2, 16)), (tag_pattern("mlp.up_proj", ""), None)]),
], ids=["default", "rtn-axis0", "per-channel", "dynamic"])
def test_round_trip(spec):
    d = spec.to_config("hqq")
    assert set(d) == {"quant_method", "quant_config", "skip_modules"}
    assert Spec.from_config(d) == spec


@pytest.mark.parametrize("spec", [Spec(default="int4wo-64"), Spec(default="uint4wo-60"), Spec(default="uint7wo-64"),
                                  Spec(default="int3wo-64"), Spec(default="uint4wo-64@hqq", skip=["re:.*q_proj"]),
                                  Spec(default=IntX(bits=4, group_size=64, method=HQQ(iters=5))),
                                  Spec(default="uint4wo-64", rules={tag_pattern("mlp.up_proj", ""): None})], ids=str)
def test_inexpressible_specs_raise(spec):
    with pytest.raises(ValueError, match="to_config\\('hqq'\\)"):
        spec.to_config("hqq")


class Tiny(nn.Module):
    """Named like a decoder, so HQQ's tags apply: layers.N.self_attn.q_proj, layers.N.mlp.down_proj."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Module() for _ in range(2)])
        for layer in self.layers:
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(128, 128, bias=False)
            layer.mlp = nn.Module()
            layer.mlp.down_proj = nn.Linear(128, 128, bias=False)
        self.lm_head = nn.Linear(128, 64, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer.mlp.down_proj(torch.relu(layer.self_attn.q_proj(x)))
        return self.lm_head(x)


def test_end_to_end_rules_and_notes():
    cfg = to_dict({"self_attn.q_proj": base_quant_config(4, 64, view_as_float=True), "mlp.down_proj": None})
    spec = Spec.from_config(cfg)
    model = Tiny()
    fxquant.quantize_(model, spec, (torch.randn(2, 128),))
    kinds = {n: type(m) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj", "lm_head"))}
    assert [n for n, t in kinds.items() if t is QuantizedLinear] == ["layers.0.self_attn.q_proj",
                                                                      "layers.1.self_attn.q_proj"]
    text = str(fxquant.report(model))
    assert spec.notes and all(n in text for n in spec.notes)


def test_matches_hqq_quantizer_when_importable():
    """hqq's own ``Quantizer.quantize`` (optimize=False) is the min/max grid of ``uint<b>wo``: codes
    ``round(W * s_inv + z)`` with fp32 parameters, fxquant's scale rounded up to bf16 and offset to
    bf16, so values agree within one step.  With ``optimize=True`` both run the same half-quadratic
    iteration; the library keeps fp32 scale / zero, fxquant stores them in bf16, which costs it up to
    2 % of weight error on this 3-bit weight (measured 0.9 %)."""
    hqq = pytest.importorskip("hqq.core.quantize")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    for optimize, axis in ((False, 1), (False, 0), (True, 1)):
        layer = base_quant_config(3, 32, axis=axis)
        layer["weight_quant_params"].update(optimize=optimize, round_zero=False)
        model = nn.Sequential(nn.Linear(256, 64, bias=False))
        model[0].weight.data.copy_(w)
        fxquant.quantize_(model, Spec.from_config(to_dict(layer, [])), (torch.randn(1, 256),), frontend="modules")
        fx = model[0].dequantize()
        wq, meta = hqq.Quantizer.quantize(w, **{**layer["weight_quant_params"], "bitpack": False}, device="cpu")
        meta["compute_dtype"] = torch.float32
        ref = hqq.Quantizer.dequantize(wq, meta).float()
        if optimize:
            assert (fx - w).norm() <= 1.02 * (ref - w).norm()
        else:
            step = meta["scale"].float().abs().max()
            assert (fx - ref).abs().max() <= 1.01 * step
