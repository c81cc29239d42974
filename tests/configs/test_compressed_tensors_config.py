"""``Spec.from_config`` / ``to_config("compressed-tensors")``.

Oracles: compressed-tensors itself -- its presets and ``QuantizationConfig`` / ``QuantizationScheme``
objects (``to_dict()``), ``apply_quantization_config`` for which scheme each module gets (targets,
regexes, ``ignore``, precedence), ``calculate_qparams`` + ``fake_quantize`` for the values, and
``QuantizationConfig.model_validate`` for what the writer emits; transformers'
``CompressedTensorsConfig(...).to_dict()``; seed 001's documented fields."""
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fxquant import Spec
from fxquant.schemes import Float8DynamicActivation, Float8WeightOnly, Int8DynamicActivation, IntX

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             apply_quantization_config, preset_name_to_scheme)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

SEED = Path("/work/shared/seeds/001_96e8819537c9ab3c.txt")


def cfg(groups, **kw) -> dict:
    return QuantizationConfig(config_groups=groups, **kw).to_dict()


def expected(args: QuantizationArgs | None, inputs: QuantizationArgs | None = None):
    """The fxquant scheme compressed-tensors' args describe (this file's reading of the table)."""
    if args is None:
        return None
    if args.type == "int" and inputs is None:
        return IntX(bits=args.num_bits, group_size=args.group_size if args.strategy == "group" else -1,
                    symmetric=args.symmetric)
    if args.type == "int":
        return Int8DynamicActivation()
    if inputs is None:
        return Float8WeightOnly()
    return Float8DynamicActivation(granularity="row" if args.strategy == "channel" else "tensor",
                                   activation_scale_ub=math.inf)


PRESETS = [f"W{b}A16" for b in range(2, 9)] + ["W4A16_ASYM", "W8A8", "INT8", "FP8_DYNAMIC"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_both_forms(name):
    scheme = preset_name_to_scheme(name, ["Linear"])
    want = expected(scheme.weights, scheme.input_activations)
    by_scheme = Spec.from_config(cfg({"group_0": scheme}, ignore=["lm_head"]))
    by_name = Spec.from_config(cfg({name: ["Linear"]}, ignore=["lm_head"]))  # a preset name -> targets
    assert by_scheme.default == by_name.default == want
    assert by_scheme.skip == ("lm_head",) and by_scheme.rules == ()


def test_seed_fields_and_transformers_config():
    text = SEED.read_text()
    sig = re.search(r"class transformers\.CompressedTensorsConfig\s.*?\n\(\s*(.*?)\*\*kwargs \)", text, re.S).group(1)
    fields = re.findall(r"(?:^|\s)(\w+): ", sig)
    assert {"config_groups", "format", "quantization_status", "kv_cache_scheme", "ignore", "sparsity_config",
            "run_compressed"} <= set(fields)
    transformers = pytest.importorskip("transformers")
    t = transformers.CompressedTensorsConfig(config_groups={"W4A16": ["Linear"]}, ignore=["lm_head"],
                                             format="pack-quantized", quantization_status="compressed")
    spec = Spec.from_config(t)
    assert spec.default == IntX(bits=4, group_size=128, symmetric=True) and spec.skip == ("lm_head",)
    assert any("format='pack-quantized'" in n for n in spec.notes)
    assert any("quantization_status='compressed'" in n for n in spec.notes)
    # the seed's other fields at their documented defaults, and transformers' nested form
    plain = {**t.to_dict(), "sparsity_config": {}, "run_compressed": True, "global_compression_ratio": None}
    assert Spec.from_config(plain) == spec
    assert Spec.from_config({"quant_method": "compressed-tensors", "quantization_config": t.to_dict()}) == spec


def _model(width=16):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.ModuleDict({n: nn.Linear(width, width) for n in ("q_proj", "k_proj", "o_proj")})
            self.mlp = nn.ModuleDict({n: nn.Linear(width, width) for n in ("gate", "gate_proj", "down_proj")})

    m = nn.Module()
    m.model = nn.Module()
    m.model.layers = nn.ModuleList([Block() for _ in range(3)])
    m.lm_head = nn.Linear(width, width)
    return m


def _args(bits, strategy, symmetric=True):
    return QuantizationArgs(num_bits=bits, strategy=strategy, symmetric=symmetric,
                            group_size=8 if strategy == "group" else None)


def test_targets_ignore_and_precedence_match_apply_quantization_config():
    groups = {
        "a": QuantizationScheme(targets=["Linear"], weights=_args(4, "group")),
        "b": QuantizationScheme(targets=[r"re:.*self_attn\.(q|k)_proj", "model.layers.1.mlp.down_proj"],
                                weights=_args(8, "channel")),
        "c": QuantizationScheme(targets=["re:.*mlp.*", r"re:model\.layers\.2\."], weights=_args(4, "group", False)),
        "d": QuantizationScheme(targets=["model.layers.0.self_attn.k_proj"], weights=_args(3, "channel", False)),
    }
    config = QuantizationConfig(config_groups=groups,
                                ignore=["lm_head", "re:.*mlp.gate$", "model.layers.0.self_attn.o_proj"])
    spec = Spec.from_config(config.to_dict())
    model = _model()
    apply_quantization_config(model, config, show_progress=False)
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            theirs = getattr(mod, "quantization_scheme", None)
            assert spec.choose(name).scheme == expected(theirs and theirs.weights), name
            checked += 1
    assert checked == 19


def _ct_fake_quant(w, args, scale_up_bf16=False):
    n, k = w.shape
    if args.strategy == "group":
        wg = w.reshape(n, -1, args.group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
    else:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, zp = calculate_qparams(lo, hi, args)
    if scale_up_bf16:  # fxquant stores bf16 scales rounded up
        b = scale.to(torch.bfloat16)
        scale = torch.where(b.float() < scale, (b.view(torch.int16) + 1).view(torch.bfloat16), b).float()
    return fake_quantize(w, scale, zp, args), scale


@pytest.mark.parametrize("name", ["W4A16", "W8A16", "W3A16"])
def test_symmetric_int_values_are_compressed_tensors(name):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.linspace(0.2, 2, 48)[:, None]
    args = preset_name_to_scheme(name, ["Linear"]).weights
    scheme = Spec.from_config(cfg({name: ["Linear"]})).default
    ours = scheme.dequantize(scheme.quantize(w))
    theirs, _ = _ct_fake_quant(w, args, scale_up_bf16=True)
    assert torch.equal(ours, theirs)
    channel = QuantizationArgs(num_bits=4, strategy="channel", symmetric=True)
    scheme = Spec.from_config(cfg({"g": QuantizationScheme(targets=["Linear"], weights=channel)})).default
    assert torch.equal(scheme.dequantize(scheme.quantize(w)), _ct_fake_quant(w, channel, True)[0])


def test_asymmetric_int_values_within_a_step():
    torch.manual_seed(1)
    w = torch.randn(48, 256) + 0.3
    args = preset_name_to_scheme("W4A16_ASYM", ["Linear"]).weights
    scheme = Spec.from_config(cfg({"W4A16_ASYM": ["Linear"]})).default
    ours = scheme.dequantize(scheme.quantize(w))
    theirs, scale = _ct_fake_quant(w, args)
    step = scale.repeat_interleave(args.group_size, dim=1)
    assert ((ours - theirs).abs() <= step * 1.01).all()  # an integer vs a bf16 zero point
    assert (ours - w).norm() <= 1.05 * (theirs - w).norm()


def test_notes_for_storage_and_calibration_fields():
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=64, actorder="weight", observer="minmax",
                            scale_dtype=torch.bfloat16)
    d = cfg({"g": QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")},
            format="pack-quantized", global_compression_ratio=1.5)
    spec = Spec.from_config({**d, "version": "0.20.1"})
    assert spec.default == IntX(bits=4, group_size=64, symmetric=True)
    for text in ("actorder='weight'", "scale_dtype=", "format='pack-quantized'", "global_compression_ratio=1.5",
                 "version='0.20.1'"):
        assert any(text in n for n in spec.notes), text


@pytest.mark.parametrize("groups,extra,match", [
    ({"FP8": ["Linear"]}, {}, r"input_activations\.dynamic=False .* valid: True"),
    ({"NVFP4": ["Linear"]}, {}, r"\['NVFP4'\]\.weights\.strategy: 'tensor_group' is not supported"),
    ({"W4A8": ["Linear"]}, {}, r"weights int4 group sym with input activations int8 token sym has no fxquant scheme"),
    ({"FP8_BLOCK": ["Linear"]}, {}, r"strategy: 'block' is not supported"),
    ({"W4A16": ["Linear"]}, {"kv_cache_scheme": {"num_bits": 8, "type": "float"}},
     r"\.kv_cache_scheme: .* valid: None"),
    ({"W4A16": ["Linear"]}, {"sparsity_config": {"format": "sparse-24-bitmask"}}, r"\.sparsity_config: "),
    ({"W4A16": ["Linear"]}, {"format": "marlin-24"}, r"\.format: 'marlin-24' is not supported"),
    ({"W4A16": ["LlamaAttention"]}, {}, r"class name 'LlamaAttention' is not supported; valid: 'Linear'"),
    ({"W4A16": ["Linear"]}, {"bogus": 1}, r"CompressedTensorsConfig\.bogus: no version of CompressedTensorsConfig"),
    ({"MY_SCHEME": ["Linear"]}, {}, r"preset 'MY_SCHEME' has no fxquant scheme; valid presets: W2A16"),
])
def test_what_fxquant_cannot_honour(groups, extra, match):
    known = all(ct.quantization.is_preset_scheme(g) for g in groups)
    d = {**(cfg(groups) if known else {"quant_method": "compressed-tensors", "config_groups": groups}), **extra}
    with pytest.raises(ValueError, match=match):
        Spec.from_config(d)


@pytest.mark.parametrize("weights,match", [
    ({"num_bits": 4, "strategy": "group", "group_size": 64, "observer": "mse"}, r"weights\.observer: 'mse'"),
    ({"num_bits": 4, "strategy": "group", "group_size": 64, "actorder": "group"}, r"weights\.actorder: 'group'"),
    ({"num_bits": 8, "strategy": "tensor"}, r"weights int8 tensor sym has no fxquant scheme"),
    ({"num_bits": 4, "strategy": "group", "group_size": 64, "dynamic": True}, r"weights\.dynamic=True"),
    ({"num_bits": 4, "type": "float", "strategy": "group", "group_size": 16}, r"weights float4 group"),
    ({"num_bits": 4, "strategy": "group", "group_size": 64, "colour": 1}, r"weights\.colour: no version of"),
])
def test_bad_weight_args(weights, match):
    d = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}
    with pytest.raises(ValueError, match=match):
        Spec.from_config(d)


def test_output_activations_and_static_int8_are_errors():
    w8 = QuantizationArgs(num_bits=8, strategy="channel")
    out = QuantizationScheme(targets=["Linear"], weights=w8,
                             output_activations=QuantizationArgs(num_bits=8, dynamic=True))
    with pytest.raises(ValueError, match=r"output_activations: .* valid: None"):
        Spec.from_config(cfg({"g": out}))
    static = QuantizationScheme(targets=["Linear"], weights=w8, input_activations=QuantizationArgs(num_bits=8))
    with pytest.raises(ValueError, match=r"input_activations\.dynamic=False"):
        Spec.from_config(cfg({"g": static}))


# -- writing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    Spec(default="int4wo-128-sym", skip=["lm_head", "re:.*mlp.gate"]),
    Spec(default="uint4wo-64", rules={"model.layers.0.mlp.down_proj": "int8dq", "re:.*q_proj": "int8wo-ch"}),
    Spec(default="float8dq-row-ubinf", rules={"re:.*down_proj": "float8wo", "re:.*up_proj": "int3wo-ch"}),
    Spec(default="float8dq-ubinf"),
    Spec.from_config(cfg({"W8A8": ["Linear"], "W4A16_ASYM": ["re:.*mlp.*"]}, ignore=["re:.*lm_head"])),
])
def test_round_trip_through_compressed_tensors(spec):
    d = spec.to_config("compressed-tensors")
    validated = QuantizationConfig.model_validate(d)  # compressed-tensors accepts what fxquant wrote
    back = Spec.from_config(validated.to_dict())
    assert back == spec


def test_written_targets_match_as_the_spec():
    spec = Spec(default="int4wo-32-sym", rules={"lm_head": "int8dq", "*.mlp.down_proj": "uint4wo-32"},
                skip=["re:.*gate", "model.layers.0.self_attn.o_proj"])
    config = QuantizationConfig.model_validate(spec.to_config("compressed-tensors"))
    model = _model(32)
    apply_quantization_config(model, config, show_progress=False)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            theirs = getattr(mod, "quantization_scheme", None)
            want = spec.choose(name).scheme
            assert expected(theirs and theirs.weights, theirs and theirs.input_activations) == want, name


@pytest.mark.parametrize("spec,match", [
    (Spec(default="float8dq-row"), r"activation_scale_ub=1200\.0 has no compressed-tensors field"),
    (Spec(default="nf4"), r"nf4-64 has no compressed-tensors scheme"),
    (Spec(default="uint4wo-64-axis0"), r"has no compressed-tensors scheme"),
    (Spec(default="int8wo", rules={"re:.*b_proj": "int8dq", "a_proj": "int4wo-64"}),
     r"'a_proj' would come before 're:.*b_proj\)\$'"),
    (Spec(rules={"lm_head": None}, default=None), r"keeps layers in float"),
])
def test_writer_refuses_what_compressed_tensors_cannot_say(spec, match):
    with pytest.raises(ValueError, match=match):
        spec.to_config("compressed-tensors")
