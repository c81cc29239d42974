"""``Spec.from_config`` / ``to_config`` for AQLM.  Oracles: transformers' ``AqlmConfig`` (seed 001: its four
sizes with defaults 8 / 1 / 1 / 16, ``linear_weights_not_to_quantize`` as full names of ``nn.Linear`` weight
parameters) and the aqlm library's ``QuantizedLinear`` (the layer those sizes build)."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.schemes import AQLM

transformers = pytest.importorskip("transformers")


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("proj", nn.Linear(32, 24))
    m.add_module("mlp", nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 32, bias=False)))
    m.add_module("lm_head", nn.Linear(32, 40, bias=False))
    return m


def test_default_config_is_1x16_g8_everywhere():
    for cfg in (transformers.AqlmConfig(), transformers.AqlmConfig().to_dict(), {"quant_method": "aqlm"}):
        spec = Spec.from_config(cfg)
        assert spec.default == AQLM(num_codebooks=1, nbits_per_codebook=16, in_group_size=8, out_group_size=1)
        assert str(spec.default) == "aqlm-1x16-g8" and spec.notes == () and spec.default.method is None
        assert spec.choose("lm_head").scheme == spec.default  # AqlmConfig skips nothing unless it is named


@pytest.mark.parametrize("kw", [dict(num_codebooks=2, nbits_per_codebook=8),
                                dict(in_group_size=4, nbits_per_codebook=8),
                                dict(num_codebooks=1, nbits_per_codebook=16, in_group_size=8, out_group_size=2)])
def test_sizes_are_the_aqlm_layers_sizes(kw):
    """The scheme's stored tensors have the shapes and dtypes of the aqlm library's QuantizedLinear built from
    the same config (what the checkpoint holds)."""
    cfg = transformers.AqlmConfig(**kw)
    s = Spec.from_config(cfg).default
    n, k = 16 * cfg.out_group_size, 4 * cfg.in_group_size
    qw = s.quantize(torch.randn(n, k))
    aqlm = pytest.importorskip("aqlm", reason="the aqlm package is not installed: pip install aqlm")
    layer = aqlm.QuantizedLinear(k, n, in_group_size=cfg.in_group_size, out_group_size=cfg.out_group_size,
                                 num_codebooks=cfg.num_codebooks, nbits_per_codebook=cfg.nbits_per_codebook,
                                 bias=False, dtype=torch.float16)
    for name, t in qw.tensors.items():
        ref = getattr(layer, name)
        assert t.shape == ref.shape and t.dtype == ref.dtype, name


def test_weights_not_to_quantize_are_full_weight_names():
    """A linear stays float iff ``<its name>.weight`` is listed (the seed's meaning; transformers 4.x compared
    exactly that), an entry without ``.weight`` names the module; other tensors in the list (norms and
    embeddings, as the published checkpoints list them) skip nothing."""
    listed = ["lm_head.weight", "mlp.0", "model.embed_tokens.weight", "model.norm.weight", "proj.bias"]
    spec = Spec.from_config(transformers.AqlmConfig(nbits_per_codebook=6, in_group_size=4,
                                                    linear_weights_not_to_quantize=listed))
    m = _model()
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            skipped = f"{name}.weight" in listed or name in listed
            assert (spec.choose(name).scheme is None) == skipped, name
    fxquant.quantize_(m, spec, (torch.randn(2, 32),))
    rows = {r.fqn: r for r in fxquant.report(m).rows}
    assert rows["proj"].scheme == "aqlm-1x6-g4" and rows["mlp.2"].scheme == "aqlm-1x6-g4"
    assert rows["lm_head"].status == "skipped" and rows["mlp.0"].status == "skipped"
    assert type(m.lm_head) is nn.Linear and m.proj.op_name == "linear_aqlm"


@pytest.mark.parametrize("cfg,field,valid", [
    ({"in_group_size": "8"}, "in_group_size", "an integer >= 1"),
    ({"num_codebooks": 0}, "num_codebooks", "an integer >= 1"),
    ({"nbits_per_codebook": 17}, "nbits_per_codebook", "an integer in 1..16"),
    ({"out_group_size": True}, "out_group_size", "an integer >= 1"),
    ({"linear_weights_not_to_quantize": "lm_head.weight"}, "linear_weights_not_to_quantize", "a list of weight names"),
    ({"linear_weights_not_to_quantize": [3]}, "linear_weights_not_to_quantize", "a list of weight names"),
    ({"modules_to_not_convert": ["lm_head"]}, "modules_to_not_convert", "no version of AqlmConfig")])
def test_invalid_configs_name_config_and_field(cfg, field, valid):
    with pytest.raises(ValueError) as e:
        Spec.from_config({"quant_method": "aqlm", **cfg})
    assert str(e.value).startswith(f"AqlmConfig.{field}") and valid in str(e.value)


def test_round_trip_through_the_real_config():
    cfg = transformers.AqlmConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=8,
                                  linear_weights_not_to_quantize=["lm_head.weight",
                                                                  "model.layers.0.mlp.down_proj.weight"])
    spec = Spec.from_config(cfg)
    d = spec.to_config("aqlm")
    assert d["linear_weights_not_to_quantize"] == ["lm_head.weight", "model.layers.0.mlp.down_proj.weight", "lm_head",
                                                   "model.layers.0.mlp.down_proj"]
    assert Spec.from_config(d) == spec == Spec.from_config(transformers.AqlmConfig.from_dict(d))
    assert Spec.from_config(Spec(default="aqlm-2x8-g8@aqlm").to_config("aqlm")).default == AQLM(num_codebooks=2,
                                                                                                nbits_per_codebook=8)
    for bad, match in ((Spec(default="int8wo"), "int8wo has no AqlmConfig"),
                       (Spec(default="aqlm-1x16-g8-bf16"), "fp16 codebooks"),
                       (Spec(default="aqlm-1x16-g8", skip=["layers.*"]), "skip pattern 'layers.\\*'"),
                       (Spec(default="aqlm-1x16-g8", rules={"lm_head": "int8wo"}), "per-layer rules")):
        with pytest.raises(ValueError, match=match):
            bad.to_config("aqlm")
