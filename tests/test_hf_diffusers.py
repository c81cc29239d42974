"""diffusers integration: ``quant_method="fxquant"`` through ``from_pretrained`` / ``save_pretrained``, and
``PipelineQuantizationConfig(quant_backend="fxquant")`` / ``quant_mapping``; small models with random
weights built in code, offline.  Oracle: ``fxquant.quantize_`` on the same float model, and the model
before saving (reload bit-identical)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, PipelineQuantizationConfig  # noqa: E402
from diffusers import SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel  # noqa: E402

import fxquant  # noqa: E402
from fxquant.hf_diffusers import FxQuantDiffusersConfig  # noqa: E402
from fxquant.modules import QuantizedLinear  # noqa: E402


def _unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def _sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32).eval()


def _unet_call(m):
    g = torch.Generator().manual_seed(1)
    return m(torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)).sample


def _sd3_call(m):
    g = torch.Generator().manual_seed(1)
    return m(hidden_states=torch.randn(2, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
             pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([3, 700])).sample


CASES = {"unet": (_unet, _unet_call, UNet2DConditionModel), "sd3": (_sd3, _sd3_call, SD3Transformer2DModel)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scheme", ["int8wo", "nf4-64"])
def test_from_pretrained_save_reload(case, scheme, tmp_path):
    build, call, cls = CASES[case]
    build().save_pretrained(tmp_path / "float")
    y_float = call(cls.from_pretrained(tmp_path / "float").eval())
    q = cls.from_pretrained(tmp_path / "float", quantization_config=FxQuantDiffusersConfig(spec=scheme)).eval()
    direct = fxquant.quantize_(cls.from_pretrained(tmp_path / "float").eval(), scheme, frontend="modules")
    sd_q, sd_d = q.state_dict(), direct.state_dict()
    assert sd_q.keys() == sd_d.keys() and all(torch.equal(sd_q[k], sd_d[k]) for k in sd_q)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in build().modules())
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == n_linear > 0
    y = call(q)
    rel = ((y - y_float).norm() / y_float.norm()).item()
    assert rel < (0.02 if scheme == "int8wo" else 0.2), rel
    q.save_pretrained(tmp_path / "q")
    r = cls.from_pretrained(tmp_path / "q").eval()
    sd_r = r.state_dict()
    assert sd_r.keys() == sd_q.keys() and all(torch.equal(sd_r[k], sd_q[k]) for k in sd_q)
    assert torch.equal(call(r), y)
    assert len(fxquant.report(r).rows) == n_linear


def _ddpm_dir(path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(path)
    return path


@pytest.mark.parametrize("form", ["backend", "mapping"])
def test_pipeline_quantization_config(form, tmp_path):
    path = _ddpm_dir(tmp_path / "pipe")
    if form == "backend":
        pqc = PipelineQuantizationConfig(quant_backend="fxquant", quant_kwargs={"spec": "int8wo"},
                                         components_to_quantize=["unet"])
    else:
        pqc = PipelineQuantizationConfig(quant_mapping={"unet": FxQuantDiffusersConfig(spec="int8wo")})
    pipe = DiffusionPipeline.from_pretrained(path, quantization_config=pqc)
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.scheme == "int8wo" for m in layers)
    ref = fxquant.quantize_(UNet2DModel.from_pretrained(path / "unet").eval(), "int8wo", frontend="modules")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([4])
    assert torch.equal(pipe.unet(x, t).sample, ref(x, t).sample)
    image = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 3)


def test_transformers_side_of_the_pipeline_config_accepts_the_same_kwargs():
    pytest.importorskip("transformers")
    import fxquant.hf  # noqa: F401

    pqc = PipelineQuantizationConfig(quant_backend="fxquant", quant_kwargs={"spec": "int4wo-32"})
    tf_cfg = pqc._resolve_quant_config(is_diffusers=False, module_name="text_encoder")
    df_cfg = pqc._resolve_quant_config(is_diffusers=True, module_name="transformer")
    assert type(tf_cfg).__name__ == "FxQuantConfig" and type(df_cfg).__name__ == "FxQuantDiffusersConfig"
    assert tf_cfg.spec == df_cfg.spec == fxquant.Spec(default="int4wo-32")


def test_quantize_in_place_then_save_pretrained_loads_back_packed(tmp_path):
    """fxquant.quantize_ on a diffusers model it did not load: save_pretrained writes the layout, and
    from_pretrained loads the packed tensors back, bit for bit (without it they reloaded as random weights)."""
    build, call, cls = CASES["unet"]
    model = fxquant.quantize_(build(), "int8wo", frontend="modules")
    assert isinstance(model.config.quantization_config, FxQuantDiffusersConfig)
    y = call(model)
    model.save_pretrained(tmp_path / "q")
    back = cls.from_pretrained(tmp_path / "q").eval()
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
    assert torch.equal(call(back), y)
