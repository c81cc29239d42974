"""``fxquant.quantize_pipeline`` and diffusers' ``PipelineQuantizationConfig``.

Oracles: diffusers' own ``PipelineQuantizationConfig`` and config classes (``BitsAndBytesConfig``,
``TorchAoConfig``): the spec a component gets is the one ``Spec.from_config`` reads from the config
object diffusers would build from ``quant_kwargs``; tiny diffusers models built in code (random
weights, offline): quantized outputs against the float model's, and the report's rows against the
model's own ``nn.Linear`` modules."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Spec
from fxquant.modules import QuantizedLinear

diffusers = pytest.importorskip("diffusers")
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel, PipelineQuantizationConfig  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402


@pytest.fixture(scope="module")
def float_models():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16).eval()
    flux = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    inputs = {"unet": dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                           encoder_hidden_states=torch.randn(1, 5, 32)),
              "transformer": dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 5, 32),
                                  pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]),
                                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))}
    return {"unet": unet, "transformer": flux}, inputs


@pytest.fixture
def models(float_models):
    comps, inputs = float_models
    return {k: copy.deepcopy(v) for k, v in comps.items()}, inputs


def run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


def linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_backend_form_quantizes_only_the_named_components(models, float_models):
    comps, inputs = models
    names = {k: linears(v) for k, v in comps.items()}
    ref = {k: run(v, inputs[k]) for k, v in comps.items()}
    kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    cfg = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs=kwargs,
                                     components_to_quantize=["transformer"])
    specs = fxquant.quantize_pipeline({**comps, "scheduler": object()}, cfg, inputs)
    assert specs == {"transformer": Spec.from_config(BitsAndBytesConfig(**kwargs))}
    rows = fxquant.report(comps["transformer"]).rows
    assert {r.fqn for r in rows} == names["transformer"]
    assert {r.scheme for r in rows} == {"nf4-64"}
    assert rel(run(comps["transformer"], inputs["transformer"]), ref["transformer"]) < 0.2
    untouched = comps["unet"]  # not named: the same parameters, no quantized layer
    assert not any(isinstance(m, QuantizedLinear) for m in untouched.modules())
    for (n, p), (_, q) in zip(untouched.state_dict().items(), float_models[0]["unet"].state_dict().items()):
        assert torch.equal(p, q), n


def test_mapping_form_one_spec_per_component(models):
    comps, inputs = models
    names = {k: linears(v) for k, v in comps.items()}
    ref = {k: run(v, inputs[k]) for k, v in comps.items()}
    torchao_cfg = {"quant_method": "torchao", "quant_type": "int8wo", "quant_type_kwargs": {},
                   "modules_to_not_convert": None}
    cfg = PipelineQuantizationConfig(quant_mapping={"unet": BitsAndBytesConfig(load_in_8bit=True)})
    cfg.quant_mapping["transformer"] = torchao_cfg  # a plain dict next to a config object
    specs = fxquant.quantize_pipeline(comps, cfg, {"unet": inputs["unet"], "transformer": inputs["transformer"]})
    assert specs["unet"] == Spec.from_config(BitsAndBytesConfig(load_in_8bit=True))
    assert specs["transformer"] == Spec.from_config(torchao_cfg)
    for name, scheme in (("unet", "bnb8"), ("transformer", "int8wo")):
        report = fxquant.report(comps[name])
        assert {r.fqn for r in report.rows} == {r.fqn for r in report.quantized} == names[name]
        assert {r.scheme for r in report.rows} == {scheme}
        assert rel(run(comps[name], inputs[name]), ref[name]) < 0.02, name


def test_fxquant_backend_without_example_inputs_quantizes_every_module(models):
    comps, inputs = models
    ref, names = run(comps["unet"], inputs["unet"]), linears(comps["unet"])
    specs = fxquant.quantize_pipeline({"unet": comps["unet"], "tokenizer": "not a module"},
                                      {"quant_backend": "fxquant", "quant_kwargs": {"spec": "int8wo"}})
    assert specs == {"unet": Spec(default="int8wo")}
    report = fxquant.report(comps["unet"])
    assert report.frontend == "modules" and {r.fqn for r in report.quantized} == names
    assert rel(run(comps["unet"], inputs["unet"]), ref) < 0.02


# -- the config alone ------------------------------------------------------------------------------
def specs_of(cfg, names=("unet", "transformer", "text_encoder")):
    from fxquant.configs.diffusers import read_pipeline_config

    return read_pipeline_config(cfg).for_components({n: nn.Linear(1, 1) for n in names})


@pytest.mark.parametrize("backend,kwargs,config", [
    ("bitsandbytes_8bit", {"load_in_8bit": True, "llm_int8_threshold": 4.0}, None),
    ("bitsandbytes_4bit", {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}, None),
    ("quanto", {"weights_dtype": "int4"}, "QuantoConfig"),
    ("torchao", {"quant_type": "int4wo", "quant_type_kwargs": {"group_size": 64}}, None),
])
def test_backend_kwargs_build_diffusers_config(backend, kwargs, config):
    """The spec is the one of the config diffusers builds from quant_kwargs (``quant_backend`` names
    the class; bitsandbytes' load_in_* default to the backend's name)."""
    specs = specs_of({"quant_backend": backend, "quant_kwargs": kwargs, "components_to_quantize": "unet"})
    if backend.startswith("bitsandbytes"):
        flag = {"load_in_4bit": True} if backend.endswith("4bit") else {}
        want = Spec.from_config(BitsAndBytesConfig(**flag, **kwargs))
    elif backend == "quanto":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = Spec.from_config(diffusers.QuantoConfig(**kwargs))
    else:
        want = Spec.from_config({"quant_method": "torchao", **kwargs})
    assert specs == {"unet": want}


def test_torchao_config_object_in_quant_kwargs():
    torchao = pytest.importorskip("torchao")
    obj = torchao.quantization.Int8WeightOnlyConfig()
    specs = specs_of({"quant_backend": "torchao", "quant_kwargs": {"quant_type": obj}})
    assert specs == {n: Spec.from_config(diffusers.TorchAoConfig(obj)) for n in ("unet", "transformer", "text_encoder")}


def test_quant_mapping_takes_specs_and_transformers_configs():
    transformers = pytest.importorskip("transformers")
    cfg = {"quant_mapping": {"unet": Spec(default="int4wo-64"), "text_encoder": transformers.GPTQConfig(bits=4),
                             "transformer": {"quant_method": "fxquant", "spec": Spec(default="int8dq").to_dict()}}}
    specs = specs_of(cfg)
    assert specs == {"unet": Spec(default="int4wo-64"), "transformer": Spec(default="int8dq"),
                     "text_encoder": Spec.from_config(transformers.GPTQConfig(bits=4))}


@pytest.mark.parametrize("cfg,match", [
    ({"quant_backend": "quanto", "quant_kwargs": {"weights_dtype": "int8"}, "quant_mapping": {"unet": "int8wo"}},
     r"quant_backend and quant_mapping are mutually exclusive"),
    ({"components_to_quantize": ["unet"]}, r"neither quant_backend nor quant_mapping"),
    ({"quant_backend": "gguf", "quant_kwargs": {"compute_dtype": "bfloat16"}}, r"'gguf': it loads checkpoints"),
    ({"quant_backend": "sdnq", "quant_kwargs": {"x": 1}}, r"quant_backend='sdnq' is not supported; valid: "),
    ({"quant_backend": "torchao", "quant_kwargs": {}}, r"quant_kwargs: quant_backend='torchao' needs"),
    ({"quant_backend": "bitsandbytes_4bit", "quant_kwargs": {"load_in_8bit": True}}, r"contradict"),
    ({"quant_backend": "quanto", "quant_kwargs": {"weights_dtype": "int3"}},
     r"\(quant_backend='quanto'\): QuantoConfig\.weights_dtype: 'int3'"),
    ({"quant_mapping": {"unet": "int4wo-64"}, "components_to_quantize": ["unet"]}, r"not used with quant_mapping"),
    ({"quant_mapping": {"vae": "int4wo-64"}}, r"components \['vae'\] are not in the pipeline"),
    ({"quant_backend": "fxquant", "quant_kwargs": {"spec": "int8wo"}, "components_to_quantize": ["unet", "vae"]},
     r"components \['vae'\] are not in the pipeline; valid: \['text_encoder', 'transformer', 'unet'\]"),
    ({"quant_backend": "fxquant", "quant_kwargs": {"spec": "int8wo", "calibration": [1]}},
     r"fxquant config field 'calibration' is not supported"),
    ({"quant_mapping": {"unet": {"quant_method": "gptq", "bits": 4, "colour": 1}}},
     r"quant_mapping\['unet'\]: GPTQConfig\.colour: no version"),
    ({"quant_backend": "fxquant", "quant_kwargs": {"spec": "int8wo"}, "colour": 1},
     r"PipelineQuantizationConfig\.colour"),
])
def test_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        specs_of(cfg)


def test_argument_errors_leave_the_components_untouched():
    model = nn.Sequential(nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    cfg = {"quant_backend": "fxquant", "quant_kwargs": {"spec": "int4wo-32-sym@gptq"}}
    with pytest.raises(ValueError, match=r"component 'm': int4wo-32-sym@gptq need calibration data"):
        fxquant.quantize_pipeline({"m": model}, cfg, {"m": torch.randn(2, 8)})
    with pytest.raises(ValueError, match=r"example_inputs names components \['n'\] that are not in the pipeline"):
        fxquant.quantize_pipeline({"m": model}, cfg, {"n": torch.randn(2, 8)})
    with pytest.raises(TypeError, match=r"example_inputs\['m'\] must be a tensor, a tuple / list .* or a dict"):
        fxquant.quantize_pipeline({"m": model}, {"quant_mapping": {"m": "int8wo"}}, {"m": 3})
    with pytest.raises(TypeError, match=r"component 's' is a str, not a torch.nn.Module"):
        fxquant.quantize_pipeline({"m": model, "s": "x"}, {"quant_mapping": {"m": "int8wo", "s": "int8wo"}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_example_input_forms():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for form in (x, (x,), [x], {"input": x}):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        ref = model(x)
        fxquant.quantize_pipeline({"m": model}, {"quant_mapping": {"m": "int8wo"}}, {"m": form})
        assert fxquant.report(model).frontend != "modules"
        assert rel(model(x), ref) < 0.02
