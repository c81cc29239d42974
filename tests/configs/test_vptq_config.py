"""``Spec.from_config`` / ``to_config`` for VPTQ.

Oracles: seed 001's ``VptqConfig`` signature (every documented field at its default), transformers'
``VptqConfig`` / ``VptqLayerConfig`` (their ``to_dict()`` and their own validation: a layer dict they refuse
is refused here too), transformers' ``should_convert_module`` for ``modules_to_not_convert``, and the VPTQ
library's layer lookup (``config_for_layers[name]`` else ``shared_layer_config[last name component]``)
written out here."""
import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.methods import VPTQ as VPTQMethod
from fxquant.schemes import VPTQ

transformers = pytest.importorskip("transformers")
from transformers import VptqConfig  # noqa: E402
from transformers.quantizers.quantizers_utils import should_convert_module  # noqa: E402
from transformers.utils.quantization_config import VptqLayerConfig  # noqa: E402

SEED = Path("/work/shared/seeds/001_96e8819537c9ab3c.txt")
LAYER = {"vector_lens": [-1, 8], "num_centroids": [-1, 256], "num_res_centroids": [-1, 256], "group_num": 1,
         "group_size": -1, "outlier_size": 0, "indices_as_float": False, "enable_norm": True, "enable_perm": True,
         "is_indice_packed": True}


def seed_signature(cls: str) -> dict:
    text = SEED.read_text()
    sig = re.search(rf"class transformers\.{cls}\s.*?\n\(\s*(.*?)\*\*kwargs \)", text, re.S).group(1)
    out = {}
    for part in re.split(r"\s(?=\w+: )", sig.strip()):
        name, _, rest = part.partition(": ")
        default = rest.partition(" = ")[2].strip()
        out[name] = ast.literal_eval(default) if default else None
    return out


def as_dict(cfg) -> dict:
    d = cfg.to_dict()
    d["quant_method"] = getattr(d["quant_method"], "value", d["quant_method"])
    return d


def test_seed_signature_fields_read():
    fields = seed_signature("VptqConfig")
    assert set(fields) == {"enable_proxy_error", "config_for_layers", "shared_layer_config", "modules_to_not_convert"}
    spec = Spec.from_config({"quant_method": "vptq", **fields, "shared_layer_config": {"q_proj": LAYER}})
    assert [r.pattern.text for r in spec.rules] == ["q_proj"]


def test_layer_dict_maps_every_field():
    cfg = VptqConfig(config_for_layers={"model.layers.0.mlp.down_proj": {
        **LAYER, "vector_lens": [4, 6], "num_centroids": [512, 4096], "num_res_centroids": [-1, 128],
        "outlier_size": 32, "group_num": 2, "in_features": 1568, "out_features": 576, "enable_norm": False}})
    spec = Spec.from_config(as_dict(cfg))
    (rule,) = spec.rules
    assert rule.pattern.text == "model.layers.0.mlp.down_proj"
    s = rule.scheme
    assert s.format == VPTQ(vector_len=6, num_centroids=4096, num_res_centroids=128, outlier_size=32,
                            outlier_vector_len=4, num_outlier_centroids=512, group_num=2, group_size=768,
                            enable_norm=False, enable_perm=True)
    assert s.method == VPTQMethod()
    assert spec.default is None


def test_vptq_layer_lookup_and_skip():
    """config_for_layers by full name first, then shared_layer_config by the last name component; a linear named
    by neither stays float (the VPTQ integration converts only those); modules_to_not_convert as transformers."""
    shared = {"q_proj": {**LAYER, "vector_lens": [-1, 4]}, "down_proj": LAYER}
    layers = {"model.layers.1.self_attn.q_proj": {**LAYER, "num_centroids": [-1, 4096]}}
    skip = ["model.layers.2"]
    spec = Spec.from_config(as_dict(VptqConfig(config_for_layers=layers, shared_layer_config=shared,
                                               modules_to_not_convert=skip)))
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
    names.append("lm_head")
    for name in names:
        choice = spec.choose(name)
        if not should_convert_module(name, skip):
            assert choice.scheme is None and choice.source.startswith("skip"), name
            continue
        want = layers.get(name) or shared.get(name.rsplit(".", 1)[-1])
        if want is None:
            assert choice.scheme is None, name
        else:
            assert (choice.scheme.vector_len, choice.scheme.num_centroids) == (want["vector_lens"][1],
                                                                               want["num_centroids"][1]), name


def test_no_skip_list_keeps_lm_head():
    spec = Spec.from_config(as_dict(VptqConfig(shared_layer_config={"lm_head": LAYER, "q_proj": LAYER})))
    assert spec.choose("lm_head").scheme is None
    assert spec.choose("model.layers.0.self_attn.q_proj").scheme is not None


@pytest.mark.parametrize("layer,match", [
    ({"is_indice_packed": False}, r"is_indice_packed: False is not supported; valid: True"),
    ({"norm_dim": 1}, r"norm_dim: 1 is not supported; valid: 0"),
    ({"vector_quant_dim": "in"}, r"vector_quant_dim: 'in' is not supported"),
    ({"num_centroids": [-1, 300]}, r"VPTQ.num_centroids=300 is not supported"),
    ({"num_res_centroids": [64, 256]}, r"num_res_centroids: \[64, 256\]: VPTQ has no residual codebook for outliers"),
    ({"outlier_size": 8}, r"outlier_size: 8 outlier columns but no outlier codebook"),
    ({"vector_lens": [-1, 0]}, r"vector_lens: \[-1, 0\]: the main vector length must be >= 1"),
    ({"vector_lens": 8}, r"vector_lens: 8 is not supported; valid: a list of two integers"),
    ({"group_size": 100, "in_features": 128}, r"group_size: outlier_size 0 \+ group_num 1 x group_size 100 != in_features 128"),
    ({"colour": "red"}, r"colour: no version of VptqLayerConfig has this field"),
])
def test_layer_errors_name_the_field(layer, match):
    d = {"quant_method": "vptq", "config_for_layers": {"model.layers.0.q_proj": {**LAYER, **layer}}}
    with pytest.raises(ValueError, match=r"VptqConfig.config_for_layers\['model.layers.0.q_proj'\]"):
        Spec.from_config(d)
    with pytest.raises(ValueError, match=match):
        Spec.from_config(d)


def test_transformers_refuses_what_we_refuse():
    with pytest.raises(ValueError, match="is_indice_packed"):
        VptqLayerConfig(**{**LAYER, "is_indice_packed": False})
    with pytest.raises(ValueError, match="enable_proxy_error"):
        VptqConfig(enable_proxy_error=True)
    with pytest.raises(ValueError, match=r"VptqConfig.enable_proxy_error: True is not supported"):
        Spec.from_config({"quant_method": "vptq", "enable_proxy_error": True, "shared_layer_config": {"q_proj": LAYER}})


def test_top_level_errors():
    with pytest.raises(ValueError, match=r"VptqConfig.config_for_layers: no layer is configured"):
        Spec.from_config(as_dict(VptqConfig()))
    with pytest.raises(ValueError, match=r"VptqConfig.bits: no version of VptqConfig has this field"):
        Spec.from_config({"quant_method": "vptq", "bits": 2, "shared_layer_config": {"q_proj": LAYER}})
    with pytest.raises(ValueError, match=r"VptqConfig.shared_layer_config: .* valid: a dict"):
        Spec.from_config({"quant_method": "vptq", "shared_layer_config": ["q_proj"]})


def test_inert_fields_become_notes():
    layer = {**LAYER, "indices_as_float": True, "bias": True, "vector_lens": [8, 8], "num_centroids": [256, 256]}
    spec = Spec.from_config({"quant_method": "vptq", "shared_layer_config": {"o_proj": layer}})
    text = " ".join(spec.notes)
    assert "indices_as_float=True accepted" in text and "bias=True accepted" in text
    assert "outlier codebook with outlier_size=0 has no columns" in text


def test_round_trip_through_the_writer_and_transformers():
    cfg = VptqConfig(config_for_layers={"model.layers.3.mlp.up_proj": {**LAYER, "in_features": 576, "out_features": 1536}},
                     shared_layer_config={"q_proj": {**LAYER, "vector_lens": [8, 4], "num_centroids": [64, 256],
                                                     "num_res_centroids": [-1, -1], "outlier_size": 16}},
                     modules_to_not_convert=["lm_head", "model.layers.0"])
    spec = Spec.from_config(as_dict(cfg))
    out = spec.to_config("vptq")
    again = VptqConfig(**{k: v for k, v in out.items() if k != "quant_method"})  # transformers validates it
    assert Spec.from_config(as_dict(again)) == spec
    assert out["config_for_layers"]["model.layers.3.mlp.up_proj"]["group_size"] == 576
    with pytest.raises(ValueError, match="names its layers; the spec has a default scheme"):
        Spec(default="vptq-v8-c256").to_config("vptq")


def test_end_to_end_with_calibration():
    """The spec of a VptqConfig quantizes a model's named linears with VPTQ's method; the others stay float."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up_proj", nn.Linear(32, 64))
    model.add_module("act", nn.GELU())
    model.add_module("down_proj", nn.Linear(64, 32))
    cfg = VptqConfig(shared_layer_config={"up_proj": {**LAYER, "vector_lens": [-1, 4], "num_centroids": [-1, 16],
                                                      "num_res_centroids": [-1, 4]}})
    x = torch.randn(8, 32)
    calib = [(torch.randn(8, 32),) for _ in range(2)]
    q = fxquant.quantize_(model, Spec.from_config(as_dict(cfg)), (x,), calibration=calib)
    rep = fxquant.report(q)
    assert [(r.fqn, r.scheme, r.method) for r in rep.quantized] == [("up_proj", "vptq-v4-c16-r4-norm-perm@vptq",
                                                                    "vptq")]
    assert rep.row("down_proj").status == "skipped"
