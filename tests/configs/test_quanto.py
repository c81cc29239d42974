"""``Spec.from_config`` / ``to_config`` for quanto.

Oracles: transformers' ``QuantoConfig`` and diffusers' ``QuantoConfig`` (``weights_dtype``) objects,
the values documented in seeds 001 / 003, and optimum-quanto's own quantization of the same weight."""
import math

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.modules import QuantizedLinear

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

EXPECTED = {"int8": "int8wo", "int4": "uint4wo-128", "int2": "uint2wo-128", "float8": "float8wo"}


@pytest.mark.parametrize("weights", sorted(EXPECTED))
def test_transformers_and_diffusers_configs(weights):
    with pytest.warns(FutureWarning):  # diffusers deprecates QuantoConfig
        dcfg = diffusers.QuantoConfig(weights_dtype=weights, modules_to_not_convert=["proj_out"])
    for cfg in (transformers.QuantoConfig(weights=weights), transformers.QuantoConfig(weights=weights).to_dict(),
                dcfg):
        spec = Spec.from_config(cfg)
        assert str(spec.default) == EXPECTED[weights]
        assert spec.rules == ()
    assert Spec.from_config(dcfg).choose("proj_out").scheme is None
    assert Spec.from_config(transformers.QuantoConfig(weights=weights)).choose("lm_head").scheme is None
    group_note = any("group size per layer" in n for n in Spec.from_config(dcfg).notes)
    assert group_note == (weights in ("int4", "int2"))


@pytest.mark.parametrize("cfg,field,valid", [
    ({"weights": "int8", "activations": "int8"}, "activations", "None (weight-only)"),
    ({"weights": "int8", "activations": "float8"}, "activations", "None (weight-only)"),
    ({"weights": "int3"}, "weights", "'int8', 'int4', 'int2', 'float8'"),
    ({"weights_dtype": "int5"}, "weights_dtype", "'int8'"),
    ({"weights": "int8", "weights_dtype": "int4"}, "weights_dtype", "disagrees"),
    ({"weights": "int8", "optimizer": "hqq"}, "optimizer", "no version"),
])
def test_invalid_configs_name_config_and_field(cfg, field, valid):
    with pytest.raises(ValueError) as e:
        Spec.from_config({"quant_method": "quanto", **cfg})
    msg = str(e.value)
    assert msg.startswith("QuantoConfig") and field in msg and valid in msg, msg


@pytest.mark.parametrize("scheme", list(EXPECTED.values()))
def test_round_trip_through_the_real_config(scheme):
    skip = Spec.from_config(transformers.QuantoConfig(modules_to_not_convert=["lm_head", "gate"])).skip
    spec = Spec(default=scheme, skip=skip)
    d = spec.to_config("quanto")
    assert Spec.from_config(d) == spec
    assert Spec.from_config(transformers.QuantoConfig.from_dict(d)) == spec


@pytest.mark.parametrize("spec", [Spec(default="uint4wo-64"), Spec(default="int4wo-128"), Spec(default="int8dq"),
                                  Spec(default="int8wo", rules={"re:.*q_proj": "float8wo"})], ids=str)
def test_inexpressible_specs_raise(spec):
    with pytest.raises(ValueError, match="to_config\\('quanto'\\)"):
        spec.to_config("quanto")


def test_end_to_end_notes_in_report():
    spec = Spec.from_config(transformers.QuantoConfig(weights="int4", modules_to_not_convert=[]))
    model = nn.Sequential(nn.Linear(256, 64))
    fxquant.quantize_(model, spec, (torch.randn(2, 256),))
    assert isinstance(model[0], QuantizedLinear)
    assert spec.notes and all(n in str(fxquant.report(model)) for n in spec.notes)


@pytest.mark.parametrize("weights", sorted(EXPECTED))
def test_matches_optimum_quanto(weights):
    """quanto's own weights (``quantize`` + ``freeze`` on a Linear, K = 256: groups of 128 for
    qint4 / qint2) against fxquant's from the same config.  Same grids; quanto keeps fp32 scales
    (and fp32 shift -min), fxquant rounds its scale up to bf16 (and the offset to bf16), so a value can
    move by one step: each within half a step of W (plus the offset's bf16 rounding), the two within
    one step of each other, their weight errors within 5 %; float8 (the same fp32 amax / 448 scale)
    bit for bit."""
    quanto = pytest.importorskip("optimum.quanto")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    peer = nn.Sequential(nn.Linear(256, 64, bias=False))
    peer[0].weight.data.copy_(w)
    quanto.quantize(peer, weights=getattr(quanto, {"float8": "qfloat8"}.get(weights, "q" + weights)))
    quanto.freeze(peer)
    ref = peer[0].weight.dequantize().float()
    model = nn.Sequential(nn.Linear(256, 64, bias=False))
    model[0].weight.data.copy_(w)
    fxquant.quantize_(model, Spec.from_config(transformers.QuantoConfig(weights=weights, modules_to_not_convert=[])),
                      (torch.randn(1, 256),), frontend="modules")
    fx = model[0].dequantize()
    if weights == "float8":
        assert torch.equal(fx, ref)
        return
    if weights == "int8":
        step = w.abs().amax(1, keepdim=True) / 127 * (1 + 2 ** -7)
        offset = torch.zeros(())
    else:
        bits = int(weights[3:])
        g = w.reshape(64, 2, 128)
        lo, hi = g.amin(-1), g.amax(-1)
        step = ((hi - lo) / (2 ** bits - 1) * (1 + 2 ** -7)).repeat_interleave(128, 1)
        offset = (lo.abs() + hi.abs()).repeat_interleave(128, 1) * 2 ** -8  # |offset| <= |lo| + |hi|
    assert ((fx - w).abs() <= 0.5 * step + offset).all() and ((ref - w).abs() <= 0.5 * step + 1e-6).all()
    assert ((fx - ref).abs() <= step + offset).all()
    assert math.isclose((fx - w).norm().item(), (ref - w).norm().item(), rel_tol=0.05)
