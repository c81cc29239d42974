"""AQLM checkpoints: load_aqlm / save_aqlm.

Oracles: the published AQLM dequantization re-implemented plainly here (codes read as ``stored mod 2**B``,
each block ``scales[o] * sum_c codebooks[c, code]``, float64) on checkpoints written by hand from known codes,
codebooks and scales; the aqlm library's own ``QuantizedLinear`` (its state dict is the layout, its forward
the output) and transformers' AQLM loader with it, when installed.  Outputs are compared with fp32
activations not rounded (``fp32_dense``): ``F.linear`` on the oracle's weight up to fp32 summation order.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import fxquant
from fxquant.formats import aqlm as fmt
from fxquant.modules import QuantizedLinear
from helpers import assert_linear_close, rel


def published_weight(codes, codebooks, scales) -> torch.Tensor:
    """The AQLM reconstruction, plainly, in float64 ``[O*og, G*ig]``."""
    nc, e, og, ig = codebooks.shape
    o, g, _ = codes.shape
    u = codes.to(torch.int64) % e
    w = torch.zeros(o * og, g * ig, dtype=torch.float64)
    for oo in range(o):
        for j in range(g):
            block = sum(codebooks[c, u[oo, j, c]].double() for c in range(nc))
            w[oo * og:(oo + 1) * og, j * ig:(j + 1) * ig] = block * scales[oo, 0, 0, 0].double()
    return w


class Net(nn.Module):
    def __init__(self, k=64, n=48, m=32):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(k, n), nn.Linear(n, m, bias=False), nn.Linear(m, 16)
        self.norm = nn.LayerNorm(k)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.norm(x))))))


def known_layer(n, k, nc, nbits, ig, og, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 1 << nbits, (n // og, k // ig, nc), generator=g)
    return {"codes": fmt.to_stored(u, nbits),
            "codebooks": (torch.randn(nc, 1 << nbits, og, ig, generator=g) / nc).to(dtype),
            "scales": (torch.rand(n // og, 1, 1, 1, generator=g) * 0.1 + 0.01).to(dtype)}


def aqlm_config(nc=2, nbits=8, ig=8, og=1, keep=("head.weight",)):
    return {"quant_method": "aqlm", "num_codebooks": nc, "nbits_per_codebook": nbits, "in_group_size": ig,
            "out_group_size": og, "linear_weights_not_to_quantize": list(keep)}


def write_checkpoint(directory, qc, seed=0, dtype=torch.float16, float_model=None):
    """A checkpoint of :class:`Net` written by hand: fc1 / fc2 quantized with known tensors, the rest float."""
    directory.mkdir(parents=True, exist_ok=True)
    net = float_model or Net()
    tensors = {k: v for k, v in net.state_dict().items() if not k.startswith(("fc1.weight", "fc2.weight"))}
    for i, name in enumerate(("fc1", "fc2")):
        n, k = getattr(net, name).weight.shape
        for key, t in known_layer(n, k, qc["num_codebooks"], qc["nbits_per_codebook"], qc["in_group_size"],
                                  qc["out_group_size"], seed + i, dtype).items():
            tensors[f"{name}.{key}"] = t
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"quantization_config": qc}))
    return tensors


@pytest.mark.parametrize("layout", [(2, 8, 8, 1), (1, 16, 8, 1), (1, 8, 4, 1), (1, 6, 8, 2), (3, 4, 16, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_loads_the_stored_tensors_and_the_published_weights(tmp_path, fp32_dense, layout, dtype):
    nc, nbits, ig, og = layout
    tensors = write_checkpoint(tmp_path / "ck", aqlm_config(nc, nbits, ig, og), seed=nbits, dtype=dtype)
    model = fxquant.load_aqlm(tmp_path / "ck", Net())
    x = torch.randn(5, 64)
    h = model.norm(x)
    for name in ("fc1", "fc2"):
        mod = getattr(model, name)
        assert isinstance(mod, QuantizedLinear) and mod.op_name == "linear_aqlm"
        assert str(mod.scheme) == f"aqlm-{nc}x{nbits}-g{ig}" + (f"-o{og}" if og > 1 else "") + \
            {torch.float16: "", torch.bfloat16: "-bf16", torch.float32: "-fp32"}[dtype]
        for key in ("codes", "codebooks", "scales"):  # held as stored: the same dtype, shape and bits
            assert torch.equal(getattr(mod, key), tensors[f"{name}.{key}"]) and getattr(mod, key).dtype == \
                tensors[f"{name}.{key}"].dtype
        w = published_weight(*(tensors[f"{name}.{k}"] for k in ("codes", "codebooks", "scales"))).float()
        y = mod(h)
        ref = F.linear(h, w, mod.bias)
        assert_linear_close(y, ref, h, w, 1e-5, mod.bias)
        h = torch.relu(y)
    assert type(model.head) is nn.Linear and model.head.weight.dtype == torch.float32
    rows = {r.fqn: r for r in fxquant.report(model).rows}
    assert rows["head"].status == "skipped" and rows["fc1"].status == "quantized" and rows["fc1"].bytes_after == \
        sum(tensors[f"fc1.{k}"].numel() * tensors[f"fc1.{k}"].element_size() for k in ("codes", "codebooks", "scales"))


def test_the_aqlm_librarys_layers_are_the_layout_and_the_output(fp32_dense):
    """State dicts of aqlm's own QuantizedLinear (what its and transformers' save_pretrained write) load as
    they are, and the loaded layer computes aqlm's own forward."""
    aqlm = pytest.importorskip("aqlm", reason="the aqlm package is not installed: pip install aqlm")
    for nc, nbits, ig, og in [(1, 16, 8, 1), (2, 6, 4, 1), (1, 5, 8, 2)]:
        theirs = aqlm.QuantizedLinear(64, 48, in_group_size=ig, out_group_size=og, num_codebooks=nc,
                                      nbits_per_codebook=nbits, bias=True, dtype=torch.float32)
        with torch.no_grad():
            known = known_layer(48, 64, nc, nbits, ig, og, nbits, torch.float32)
            for key, t in known.items():
                getattr(theirs, key).copy_(t)
            theirs.bias.normal_()
        sd = {f"layer.{k}": v for k, v in theirs.state_dict().items()}
        model = fxquant.load_aqlm(sd, nn.ModuleDict({"layer": nn.Linear(64, 48)}),
                                  config=aqlm_config(nc, nbits, ig, og, keep=()))
        x = torch.randn(7, 64)
        with torch.no_grad():
            assert rel(model["layer"](x), theirs(x)) < 1e-6


def test_transformers_reads_what_save_aqlm_writes(tmp_path, fp32_dense):
    """A tiny Llama (tied embeddings) AQLM checkpoint written by hand, loaded by load_aqlm into a meta skeleton and
    written back by save_aqlm: transformers' AQLM loader (with the aqlm library) builds the same model from it,
    and load_aqlm reads the saved files back to the same logits bit for bit."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("aqlm", reason="the aqlm package is not installed: pip install aqlm")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    tensors = {}
    for i, (key, t) in enumerate(m.state_dict().items()):
        mod = key.rpartition(".")[0]
        if key.endswith(".weight") and mod != "lm_head" and isinstance(m.get_submodule(mod), nn.Linear):
            tensors.update({f"{mod}.{k}": v for k, v in known_layer(*t.shape, 2, 6, 8, 1, i, torch.float32).items()})
        elif key != "lm_head.weight":
            tensors[key] = t
    with torch.device("meta"):
        sk = transformers.LlamaForCausalLM(cfg)
    fxquant.load_aqlm(tensors, sk, config=aqlm_config(2, 6, 8, 1, keep=("lm_head.weight", "model.norm.weight")))
    assert sk.lm_head.weight is sk.model.embed_tokens.weight and str(sk.model.layers[1].mlp.down_proj.scheme) == \
        "aqlm-2x6-g8-fp32"
    fxquant.save_aqlm(sk, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc == {**aqlm_config(2, 6, 8, 1), "linear_weights_not_to_quantize": ["lm_head.weight", "lm_head"]}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    with torch.device("meta"):
        back = transformers.LlamaForCausalLM(cfg)
    fxquant.load_aqlm(tmp_path / "ck", back)
    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128]])
    with torch.no_grad():
        ours, loaded, ref = back.eval()(ids).logits, sk.eval()(ids).logits, theirs(ids).logits
    assert torch.equal(ours, loaded)
    assert rel(ours, ref) < 1e-5
    assert back.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 10)


def test_round_trip_is_bit_identical_and_meta_skeletons_load(tmp_path):
    tensors = write_checkpoint(tmp_path / "a", aqlm_config(2, 8, 8, 1))
    model = fxquant.load_aqlm(tmp_path / "a", Net())
    fxquant.save_aqlm(model, tmp_path / "b")
    back = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype
                                             for k in tensors)
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert qc == aqlm_config(2, 8, 8, 1, keep=("head.weight", "head"))
    with torch.device("meta"):
        sk = Net()
    fxquant.load_aqlm(tmp_path / "b", sk)
    assert not any(t.is_meta for t in list(sk.parameters()) + list(sk.buffers()))
    x = torch.randn(3, 64)
    assert torch.equal(sk(x), model(x))


def test_quantized_by_fxquant_saves_and_reloads(tmp_path):
    torch.manual_seed(1)
    net = Net()
    fxquant.quantize_(net, fxquant.Spec(default="aqlm-1x8-g4", skip=["head"]), (torch.randn(2, 64),))
    fxquant.save_aqlm(net, tmp_path / "ck")
    back = fxquant.load_aqlm(tmp_path / "ck", Net())
    x = torch.randn(4, 64)
    assert torch.equal(back(x), net(x)) and str(back.fc1.scheme) == "aqlm-1x8-g4"


# ---- refusals: named, and the model / files as they were -------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("change,match", [
    (lambda t: t.pop("fc1.codes"), r"tensor 'fc1.codes': missing"),
    (lambda t: t.update({"fc1.codes": t["fc1.codes"].to(torch.int32)}),
     r"tensor 'fc1.codes': expected torch.int8 of shape \(48, 8, 2\) .* got torch.int32"),
    (lambda t: t.update({"fc1.codes": t["fc1.codes"].transpose(0, 1).contiguous()}),
     r"tensor 'fc1.codes': shape \(8, 48, 2\) is the aqlm CPU kernel's transposed runtime order"),
    (lambda t: t.update({"fc2.codebooks": t["fc2.codebooks"][:, :128]}), r"tensor 'fc2.codebooks': expected"),
    (lambda t: t.update({"fc2.codebooks": t["fc2.codebooks"].to(torch.float64)}),
     r"tensor 'fc2.codebooks': expected .* got torch.float64"),
    (lambda t: t.update({"fc1.scales": t["fc1.scales"].float()}),
     r"tensor 'fc1.scales': expected torch.float16 of shape \(48, 1, 1, 1\) \(the codebooks' dtype"),
    (lambda t: t.update({"fc1.weight": torch.zeros(48, 64)}), r"tensor 'fc1.weight': a float weight: the config "
                                                                r"quantizes this layer"),
    (lambda t: t.update({"fc1.zeros": torch.zeros(3)}), r"tensor 'fc1.zeros': not a tensor of an AQLM layer"),
    (lambda t: t.update({"norm.codes": torch.zeros(3, dtype=torch.int8)}),
     r"tensor 'norm.codes': the model has a LayerNorm, not an nn.Linear"),
    (lambda t: t.update({"head.codes": t["fc2.codes"]}),
     r"tensor 'head.codes': the config keeps 'head.weight' in float"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}),
     r"tensor 'extra.weight' .*in the checkpoint but not in the model"),
])
def test_corrupt_tensors_are_refused_by_name(tmp_path, change, match):
    tensors = write_checkpoint(tmp_path / "ck", aqlm_config())
    change(tensors)
    model = Net()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        fxquant.load_aqlm(dict(tensors), model, config=aqlm_config())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and isinstance(model.fc1, nn.Linear)


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "gptq"}, r"quantization_config.quant_method='gptq'; valid: 'aqlm'"),
    ({"nbits_per_codebook": 17}, r"quantization_config.nbits_per_codebook=17 is not supported; valid: an integer >= 1 "
                                 r"and <= 16"),
    ({"num_codebooks": "2"}, r"num_codebooks='2'"),
    ({"modules_to_not_convert": ["head"]}, r"quantization_config.modules_to_not_convert: no version of AqlmConfig"),
    ({"linear_weights_not_to_quantize": "head.weight"}, r"linear_weights_not_to_quantize: expected a list"),
    ({"linear_weights_not_to_quantize": ["fc1.weight", "fc2.weight", "head.weight"]}, r"keeps every nn.Linear"),
])
def test_unsupported_configs_are_refused_by_field(tmp_path, cfg, match):
    tensors = write_checkpoint(tmp_path / "ck", aqlm_config())
    with pytest.raises(ValueError, match=match):
        fxquant.load_aqlm(tensors if "keeps every" not in match else {k: v for k, v in tensors.items()
                                                                      if ".codes" not in k},
                          Net(), config={**aqlm_config(), **cfg})


def test_unreadable_files_and_missing_config_are_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(ValueError, match="config.json: no such file"):
        fxquant.load_aqlm(tmp_path / "ck", Net())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"quantization_config": aqlm_config()}))
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fxquant.load_aqlm(tmp_path / "ck", Net())
    with pytest.raises(ValueError, match="a state dict needs its quantization config"):
        fxquant.load_aqlm({}, Net())


def test_writer_refuses_by_layer_before_writing(tmp_path):
    net = Net()
    fxquant.quantize_(net, fxquant.Spec(default="aqlm-1x8-g4", rules={"fc2": "int8wo"}, skip=["head"]),
                      (torch.randn(2, 64),))
    target = tmp_path / "ck"
    with pytest.raises(ValueError, match=r"layer 'fc2': op linear_int8wo is not an AQLM layer"):
        fxquant.save_aqlm(net, target)
    net2 = Net()
    fxquant.quantize_(net2, fxquant.Spec(default="aqlm-1x8-g4", rules={"fc2": "aqlm-1x8-g8"}, skip=["head"]),
                      (torch.randn(2, 64),))
    with pytest.raises(ValueError, match=r"layer 'fc2': AQLM sizes .* differ from layer 'fc1'"):
        fxquant.save_aqlm(net2, target)
    net3 = nn.Sequential(nn.Linear(30, 8))
    fxquant.quantize_(net3, fxquant.Spec(default="aqlm-1x4-g8"), (torch.randn(2, 30),))
    with pytest.raises(ValueError, match=r"layer '0': weight \[8, 30\] is not a whole number of 1 x 8 groups"):
        fxquant.save_aqlm(net3, target)
    with pytest.raises(ValueError, match="the model has no packed layer"):
        fxquant.save_aqlm(Net(), target)
    assert not target.exists()
