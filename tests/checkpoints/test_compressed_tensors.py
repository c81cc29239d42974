"""compressed-tensors checkpoints: fxquant's export read back by compressed-tensors itself (its
ModelCompressor / compressors, and transformers' loader), checkpoints written by compressed-tensors
read by fxquant (outputs against the model compressed-tensors decompresses), and bad inputs."""
import json
import os

import pytest
import torch
from torch import nn

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import fxquant  # noqa: E402
from fxquant.modules import QuantizedLinear  # noqa: E402

DIMS = [(64, 48), (48, 40), (40, 24), (24, 16), (16, 8)]


def mlp(device=None, dtype=torch.float32, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        layers = [nn.Linear(i, o, bias=n != 1) for n, (i, o) in enumerate(DIMS)]
    return nn.Sequential(*layers).to(dtype)


def quantized(spec) -> nn.Sequential:
    m = mlp()
    return fxquant.quantize_(m, spec, (torch.randn(2, 64),))


def decompress_with_compressed_tensors(directory, model: nn.Module) -> nn.Module:
    """What compressed-tensors makes of a checkpoint: its config applied to ``model``, the compressed
    parameters created by its compressor, the file loaded strictly, then its decompression."""
    qc = json.load(open(os.path.join(directory, "config.json")))["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)
    apply_quantization_config(model, cfg)
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            m.weight_scale.data.fill_(1)  # placeholders until the file's tensors replace them
    comp = ModelCompressor(quantization_config=cfg)
    comp.compress_model(model)
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True, assign=True)
    comp.decompress_model(model)
    return model


SPEC = fxquant.Spec(default="affine4-g16", rules={"1": "affine8-ch-sym-fp16", "2": "int4wo-8-sym", "3": "int8wo",
                                                  "4": None})


@pytest.mark.parametrize("spec", [SPEC, "affine4-ch-fp32", "int8wo-ch", "affine2-g8-sym", "affine8-g8"])
def test_compressed_tensors_decompresses_our_export_bit_for_bit(tmp_path, spec):
    m = quantized(spec)
    fxquant.save_compressed_tensors(m, tmp_path / "ck")
    ref = decompress_with_compressed_tensors(tmp_path / "ck", mlp(seed=1))
    for i, layer in enumerate(m):
        if isinstance(layer, QuantizedLinear):
            theirs = ref[i].weight
            assert torch.equal(theirs, layer.dequantize().to(theirs.dtype)), (i, layer.scheme)
        else:
            assert torch.equal(ref[i].weight, layer.weight)
        if layer.bias is not None:
            assert torch.equal(ref[i].bias, layer.bias)


def test_export_layout_and_config(tmp_path):
    m = quantized(SPEC)
    fxquant.save_compressed_tensors(m, tmp_path / "ck")
    qc = json.load(open(tmp_path / "ck" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["4"] and qc["quantization_status"] == "compressed"
    by_target = {t: g for g in qc["config_groups"].values() for t in g["targets"]}
    w0 = by_target["0"]["weights"]
    assert (w0["num_bits"], w0["group_size"], w0["strategy"], w0["symmetric"]) == (4, 16, "group", False)
    assert by_target["3"]["weights"]["strategy"] == "channel" and by_target["3"]["weights"]["num_bits"] == 8
    t = load_file(tmp_path / "ck" / "model.safetensors")
    assert t["0.weight_packed"].dtype == torch.int32 and t["0.weight_packed"].shape == (48, 8)
    assert t["0.weight_zero_point"].shape == (6, 4) and t["1.weight_scale"].dtype == torch.float16
    assert "2.weight_zero_point" not in t and t["0.weight_shape"].tolist() == [48, 64]
    assert set(k for k in t if k.startswith("4.")) == {"4.weight", "4.bias"}


def test_round_trip_through_fxquant_is_identical(tmp_path):
    m = quantized(SPEC)
    fxquant.save_compressed_tensors(m, tmp_path / "ck")
    back = fxquant.load_compressed_tensors(tmp_path / "ck", mlp(device="meta"))
    x = torch.randn(5, 64)
    assert torch.equal(back(x), m(x))
    assert [getattr(layer, "scheme", None) for layer in back] == [getattr(layer, "scheme", None) for layer in m]
    rep = fxquant.report(back)
    assert [r.status for r in rep.rows] == ["quantized"] * 4 + ["skipped"]
    assert rep.row("0").bytes_after == m[0].packed().nbytes


# ---- transformers (Llama) --------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128]])


@pytest.mark.parametrize("scheme,dequantize", [("int4wo-32-sym", False), ("affine4-g32", True)])
def test_transformers_loads_the_export(tmp_path, monkeypatch, fp32_dense, scheme, dequantize):
    """transformers + compressed-tensors (``dequantize=False``: its scales cast to the model dtype, fp32;
    ``True``: decompressed in the scale dtype, bf16) hold our weights bit for bit.  (Its
    ``dequantize=False`` path cannot load asymmetric pack-quantized layers at all, nor does
    ``dequantize=True`` tell config groups apart: one symmetric and one asymmetric single-group case.)"""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = _tiny_llama()
    fxquant.quantize_(m, fxquant.Spec(default=scheme, skip=["lm_head"]), (), {"input_ids": IDS})
    fxquant.save_compressed_tensors(m, tmp_path / "ck")
    kw = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        theirs, ours = hf(IDS).logits, m(IDS).logits
    for name, layer in m.named_modules():
        if isinstance(layer, QuantizedLinear):
            w = layer.dequantize()
            assert torch.equal(hf.get_submodule(name).weight, w.to(torch.bfloat16).float() if dequantize else w)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight and torch.equal(hf.lm_head.weight, m.lm_head.weight)
    tol = 2e-3 if dequantize else 1e-5  # bf16-rounded weights there; the same fp32 weights here
    assert (theirs - ours).abs().max() <= tol * ours.abs().max()


def test_llama_round_trip_on_a_meta_skeleton(tmp_path):
    from transformers import LlamaForCausalLM

    m = _tiny_llama()
    fxquant.quantize_(m, fxquant.Spec(default="affine4-g32", rules={"lm_head": "int8wo"}), (), {"input_ids": IDS})
    fxquant.save_compressed_tensors(m, tmp_path / "ck")
    with torch.device("meta"):
        sk = LlamaForCausalLM(m.config)
    fxquant.load_compressed_tensors(tmp_path / "ck", sk)
    assert not any(t.is_meta for t in list(sk.parameters()) + list(sk.buffers()))
    with torch.no_grad():
        assert torch.equal(sk.eval()(IDS).logits, m(IDS).logits)


# ---- checkpoints written by compressed-tensors ----------------------------------------------------------
def _args(bits, symmetric, group):
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group,
            "strategy": "group" if group else "channel"}


GROUPS = {"group_0": {"targets": ["re:^0$"], "weights": _args(4, False, 16)},
          "group_1": {"targets": ["1", "3"], "weights": _args(8, True, None)},
          "group_2": {"targets": ["Linear"], "weights": _args(4, True, 8)}}


def write_with_compressed_tensors(directory, model: nn.Module, groups=GROUPS, ignore=("4",), fmt="pack-quantized"):
    """compressed-tensors compresses ``model`` (min-max scales and zero points from its own
    ``calculate_qparams``) and writes the checkpoint as llm-compressor does; returns the model it
    decompresses from that checkpoint's state (the reference)."""
    cfg = QuantizationConfig.model_validate({"config_groups": groups, "ignore": list(ignore), "format": fmt,
                                             "quantization_status": "frozen"})
    apply_quantization_config(model, cfg)
    for m in model.modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None:
            continue
        w, a = m.weight.detach(), scheme.weights
        wg = w.unflatten(-1, (-1, a.group_size)) if a.strategy == "group" else w[:, None]
        scale, zero = calculate_qparams(wg.amin(-1), wg.amax(-1), a)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zero.reshape(m.weight_zero_point.shape))
    comp = ModelCompressor(quantization_config=cfg, force_compression_format=None if fmt == "pack-quantized" else fmt)
    comp.compress_model(model)
    os.makedirs(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    json.dump({}, open(os.path.join(directory, "config.json"), "w"))
    comp.update_config(directory)
    comp.decompress_model(model)
    return model


@pytest.mark.parametrize("fmt", ["pack-quantized", "naive-quantized"])
def test_checkpoint_written_by_compressed_tensors(tmp_path, fp32_dense, fmt):
    ref = write_with_compressed_tensors(tmp_path / "ck", mlp(), fmt=fmt)
    m = fxquant.load_compressed_tensors(tmp_path / "ck", mlp(seed=3))
    assert [getattr(layer, "scheme", None) for layer in m] == ["affine4-g16-fp32", "affine8-ch-sym-fp32",
                                                               "affine4-g8-sym-fp32", "affine8-ch-sym-fp32", None]
    for i in range(4):  # fp32 scales: (q - z) * s rounds once in fp32, in both
        assert torch.equal(m[i].dequantize(), ref[i].weight), i
    assert torch.equal(m[4].weight, ref[4].weight)
    x = torch.randn(7, 64)
    y, r = m(x), torch.stack([ref_forward(ref, xi) for xi in x])
    assert torch.allclose(y, r, rtol=1e-5, atol=1e-6)


def ref_forward(ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in ref:
        x = torch.nn.functional.linear(x, layer.weight, layer.bias)
    return x


def test_bf16_checkpoint_maps_symmetric_layers_to_intx(tmp_path):
    """bf16 scales: the symmetric layers become int<b>wo / int8wo (the same values, faster kernels);
    ``prefer_affine`` keeps them affine; both are compressed-tensors' weights in bf16 bit for bit."""
    ref = write_with_compressed_tensors(tmp_path / "ck", mlp(dtype=torch.bfloat16))
    int8 = ("int8wo", "int8wo-ch")  # int8wo's codes are -127..127: a row whose code -128 occurs is int8wo-ch
    for prefer, schemes in ((False, [("affine4-g16",), int8, ("int4wo-8-sym",), int8]),
                            (True, [("affine4-g16",), ("affine8-ch-sym",), ("affine4-g8-sym",), ("affine8-ch-sym",)])):
        m = fxquant.load_compressed_tensors(tmp_path / "ck", mlp(device="meta"), prefer_affine=prefer)
        assert all(m[i].scheme in schemes[i] for i in range(4)), [m[i].scheme for i in range(4)]
        for i in range(4):
            assert torch.equal(m[i].dequantize().to(torch.bfloat16), ref[i].weight), (prefer, i)
        assert m[4].weight.dtype == torch.bfloat16


def test_state_dict_with_its_config(tmp_path):
    write_with_compressed_tensors(tmp_path / "ck", mlp())
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    cfg = json.load(open(tmp_path / "ck" / "config.json"))
    m = fxquant.load_compressed_tensors(sd, mlp(), config=cfg["quantization_config"])
    n = fxquant.load_compressed_tensors(tmp_path / "ck", mlp())
    x = torch.randn(3, 64)
    assert torch.equal(m(x), n(x))
    with pytest.raises(ValueError, match="a state dict needs its quantization config"):
        fxquant.load_compressed_tensors(sd, mlp())


# ---- bad inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,match", [
    ("uint4wo-16", r"layer '0' \(scheme uint4wo-16\): asymmetric intx .*use affine<b>-g<g>"),
    ("int4wo-32", r"layer '0' \(scheme int4wo-32\): op linear_int4wo has no compressed-tensors form"),
    ("nf4", r"layer '0' \(scheme nf4.*\): op linear_bnb4"),
    ("affine3-g16", r"layer '0' \(scheme affine3-g16\): 3-bit codes"),
    ("int4wo-8-sym-axis0", r"layer '0'.*axis 0"),
    ("affine4-g32", r"layer '1' \(scheme affine4-g32\): in_features=48 is not a multiple of the group size 32")])
def test_unexportable_schemes_raise_and_write_nothing(tmp_path, scheme, match):
    m = quantized(fxquant.Spec(default=scheme, skip=["2", "3", "4"]))
    with pytest.raises(ValueError, match=match):
        fxquant.save_compressed_tensors(m, tmp_path / "ck")
    assert os.listdir(tmp_path) == []


def test_a_failed_export_leaves_an_existing_directory_as_it_was(tmp_path):
    good = quantized("affine4-g8")
    fxquant.save_compressed_tensors(good, tmp_path / "ck")
    before = {f: open(tmp_path / "ck" / f, "rb").read() for f in os.listdir(tmp_path / "ck")}
    with pytest.raises(ValueError, match="uint4wo-16"):
        fxquant.save_compressed_tensors(quantized("uint4wo-16"), tmp_path / "ck")
    assert {f: open(tmp_path / "ck" / f, "rb").read() for f in os.listdir(tmp_path / "ck")} == before
    assert os.listdir(tmp_path) == ["ck"]
    with pytest.raises(ValueError, match="no packed layer"):
        fxquant.save_compressed_tensors(mlp(), tmp_path / "other")


def _snapshot(model: nn.Module):
    return [(name, type(m)) for name, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _edit(directory, tensors=None, drop=(), config=None):
    path = os.path.join(directory, "model.safetensors")
    t = load_file(path)
    for k in drop:
        del t[k]
    t.update(tensors or {})
    save_file(t, path, metadata={"format": "pt"})
    if config is not None:
        cpath = os.path.join(directory, "config.json")
        c = json.load(open(cpath))
        config(c["quantization_config"])
        json.dump(c, open(cpath, "w"))


@pytest.mark.parametrize("case,match", [
    ("shape", r"layer '0'.weight_shape: \[48, 64\] in the checkpoint, \[50, 64\] in the model"),
    ("missing_scale", r"layer '1'.weight_scale: missing from the checkpoint"),
    ("missing_float", r"tensor '4.bias': missing from the checkpoint"),
    ("extra", r"tensor '9.weight' .*in the checkpoint but not in the model"),
    ("g_idx", r"layer '2'.weight_g_idx: act-order g_idx is not supported"),
    ("scale_dtype", r"layer '0'.weight_scale: expected torch.bfloat16 or torch.float16 or torch.float32"),
    ("float8", r"config_groups\['group_1'\].weights: type 'float' weights .* not supported"),
    ("activations", r"config_groups\['group_2'\].input_activations: activation quantization is not supported"),
    ("actorder", r"actorder='group' .*g_idx.* is not supported"),
    ("kv_cache", r"kv_cache_scheme: kv-cache quantization is not supported"),
    ("bits", r"num_bits=3 .*not supported|3-bit pack-quantized codes are not supported"),
    ("sym_zero", r"layer '2'.weight_zero_point: the config says symmetric but the zero points are not all 0"),
    ("corrupt", r"model.safetensors: not a readable safetensors file"),
    ("no_config", r"config.json: no such file")])
def test_bad_checkpoints_raise_and_leave_the_model_as_it_was(tmp_path, case, match):
    d = tmp_path / "ck"
    write_with_compressed_tensors(d, mlp())
    model = mlp(seed=5)
    if case == "shape":
        model[0] = nn.Linear(64, 50)
        model[1] = nn.Linear(50, 40, bias=False)
    elif case == "missing_scale":
        _edit(d, drop=["1.weight_scale"])
    elif case == "missing_float":
        _edit(d, drop=["4.bias"])
    elif case == "extra":
        _edit(d, tensors={"9.weight": torch.zeros(2, 2)})
    elif case == "g_idx":
        _edit(d, tensors={"2.weight_g_idx": torch.zeros(48, dtype=torch.int32)})
    elif case == "scale_dtype":
        _edit(d, tensors={"0.weight_scale": load_file(d / "model.safetensors")["0.weight_scale"].double()})
    elif case == "float8":
        _edit(d, config=lambda qc: qc["config_groups"]["group_1"]["weights"].update(type="float"))
    elif case == "activations":
        _edit(d, config=lambda qc: qc["config_groups"]["group_2"].update(
            input_activations=_args(8, True, None) | {"strategy": "token", "dynamic": True}))
    elif case == "actorder":
        _edit(d, config=lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"))
    elif case == "kv_cache":
        _edit(d, config=lambda qc: qc.update(kv_cache_scheme=_args(8, True, None)))
    elif case == "bits":
        _edit(d, config=lambda qc: qc["config_groups"]["group_2"]["weights"].update(num_bits=3))
    elif case == "sym_zero":
        _edit(d, tensors={"2.weight_zero_point": torch.full((24 * 4 // 32, 40 // 8), 0x11111111, dtype=torch.int32)})
    elif case == "corrupt":
        data = open(d / "model.safetensors", "rb").read()
        open(d / "model.safetensors", "wb").write(data[:len(data) // 2])
    elif case == "no_config":
        os.remove(d / "config.json")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        fxquant.load_compressed_tensors(d, model)
    after = _snapshot(model)
    assert after[0] == before[0] and after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert not hasattr(model, "_fxquant_report")


def test_loading_into_a_quantized_model_is_refused(tmp_path):
    write_with_compressed_tensors(tmp_path / "ck", mlp())
    with pytest.raises(ValueError, match="already quantized"):
        fxquant.load_compressed_tensors(tmp_path / "ck", quantized("int8wo"))


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: quantize_ swaps its weight for a PackedWeight."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) * 0.5


def test_a_linear_subclass_keeps_its_forward(tmp_path):
    def build(device="cpu"):
        torch.manual_seed(0)
        with torch.device(device):
            return nn.Sequential(ScaledLinear(64, 32), nn.Linear(32, 16))

    m = fxquant.quantize_(build(), "affine4-g16", (torch.randn(2, 64),))
    assert isinstance(m[0].weight, fxquant.modules.PackedWeight)
    fxquant.save_compressed_tensors(m, tmp_path / "ck")
    ref = decompress_with_compressed_tensors(tmp_path / "ck", build())
    assert torch.equal(ref[0].weight, fxquant.modules._dequantize(m[0].weight.packed).to(torch.bfloat16))
    back = fxquant.load_compressed_tensors(tmp_path / "ck", build("meta"))
    assert type(back[0]) is ScaledLinear and isinstance(back[0].weight, fxquant.modules.PackedWeight)
    x = torch.randn(3, 64)
    assert torch.equal(back(x), m(x))


def test_a_meta_skeleton_with_buffers_no_checkpoint_holds_is_refused(tmp_path):
    fxquant.save_compressed_tensors(quantized("affine4-g8"), tmp_path / "ck")
    sk = mlp(device="meta")
    sk.register_buffer("positions", torch.arange(4, device="meta"), persistent=False)
    with pytest.raises(ValueError, match=r"buffer .*'positions' is on the meta device .*non-persistent"):
        fxquant.load_compressed_tensors(tmp_path / "ck", sk)
    assert all(t.is_meta for t in sk.state_dict().values())
