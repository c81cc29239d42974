"""bitsandbytes-serialized checkpoints: state dicts bitsandbytes itself writes (Linear4bit / Linear8bitLt on
the CPU) loaded by fxquant (weights against bitsandbytes' own dequantization bit for bit, outputs against
its forward), fxquant's export read back by bitsandbytes (Params4bit.from_prequantized, Linear8bitLt's
load_state_dict) and by transformers, and corrupt or unsupported tensors refused by name."""
import json

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from safetensors.torch import load_file, save_file  # noqa: E402

import fxquant  # noqa: E402
from fxquant.formats import bnb4 as fmt4  # noqa: E402
from fxquant.modules import QuantizedLinear  # noqa: E402
from helpers import rel  # noqa: E402

F = bnb.functional
CFG4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}


def linear4(n, k, quant_type="nf4", double=True, blocksize=64, seed=0, storage=torch.uint8, bias=True):
    """A bitsandbytes Linear4bit quantized on the CPU (its own quantize_4bit)."""
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, quant_type=quant_type, compress_statistics=double,
                              quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k), quant_type=quant_type, blocksize=blocksize,
                                     compress_statistics=double, quant_storage=storage)
    return layer.to("cpu")  # training mode: bitsandbytes' forward dequantizes then runs F.linear in fp32


def linear8(n, k, threshold=6.0, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(torch.randn(n, k) * 0.1, has_fp16_weights=False, requires_grad=False)
    return layer.to("cpu").eval()


def bnb_weight(layer) -> torch.Tensor:
    """bitsandbytes' dequantized weight (fp32).  Its AVX-512 CPU dequantize is wrong where a block straddles
    rows (tests/formats/test_bnb4.py): there its generic path, the same codes x absmax."""
    qs = layer.weight.quant_state
    n, k = qs.shape
    with torch._dynamo.config.patch(disable=True):
        if k % qs.blocksize == 0:
            return F.dequantize_4bit(layer.weight.data, qs)
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
        return _dequantize_4bit_compute(layer.weight.data.view(torch.uint8).reshape(-1), absmax.float(), qs.code,
                                        qs.blocksize, (n, k), torch.float32)


def prefixed(prefix, sd):
    return {f"{prefix}{k}": v for k, v in sd.items()}


def skeleton(*dims, device="cpu", bias=True):
    with torch.device(device):
        return nn.Sequential(*[nn.Linear(k, n, bias=bias) for n, k in dims])


def snapshot(model):
    modules = [(k, type(m).__name__) for k, m in model.named_modules()]
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


# ---- 4-bit state dicts bitsandbytes wrote ------------------------------------------------------------------
CASES4 = [(64, 128, 64), (24, 96, 32), (40, 200, 128), (7, 9, 64), (96, 256, 256), (33, 77, 4096)]


@pytest.mark.parametrize("double", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n,k,blocksize", CASES4, ids=str)
def test_4bit_state_dict_loads_bit_exact(n, k, blocksize, quant_type, double):
    layer = linear4(n, k, quant_type, double, blocksize, seed=n + k)
    cfg = {**CFG4, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double}
    m = fxquant.load_bnb(prefixed("0.", layer.state_dict()), skeleton((n, k)), config=cfg)
    q = m[0]
    assert isinstance(q, QuantizedLinear) and q.scheme == f"{quant_type}-{blocksize}{'+dq' if double else ''}"
    assert torch.equal(q.codes, layer.weight.data.reshape(-1))  # the stored bytes themselves
    assert torch.equal(q.dequantize(), bnb_weight(layer))
    x = torch.randn(5, k)
    with torch.no_grad():
        theirs = layer(x) if k % blocksize == 0 else nn.functional.linear(x, bnb_weight(layer), layer.bias)
    # bitsandbytes' forward (training mode: dequantize + fp32 F.linear) vs ours with compute dtype float32
    # (the config): fp32 summation order only.  Where a block straddles rows its CPU dequantize is wrong
    # (tests/formats/test_bnb4.py), so its generic path's weight stands in for its forward.
    assert rel(m(x), theirs) < 1e-6


def test_4bit_outputs_under_fxquant_compute_policy_without_config(fp32_dense):
    """A bare state dict (no config): compute_dtype None, fp32 on a CPU without a bf16 dense path."""
    layer = linear4(64, 128)
    m = fxquant.load_bnb(prefixed("0.", layer.state_dict()), skeleton((64, 128)))
    assert "compute_dtype" not in m[0].op_attrs and m[0].scheme == "nf4-64+dq"
    x = torch.randn(3, 2, 128)
    with torch.no_grad():
        assert rel(m(x), layer(x)) < 1e-6


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8], ids=str)
def test_quant_storage_views_are_the_same_bytes(storage):
    ref = linear4(32, 64, seed=1)
    other = linear4(32, 64, seed=1, storage=storage)
    sd = other.state_dict()
    assert sd["weight"].dtype == storage
    m = fxquant.load_bnb(prefixed("0.", sd), skeleton((32, 64)))
    assert torch.equal(m[0].codes, ref.weight.data.reshape(-1))
    assert torch.equal(m[0].dequantize(), bnb_weight(ref))


def test_meta_skeleton_mlp_and_compile():
    layers = [linear4(48, 64, seed=1), linear4(32, 48, seed=2, bias=False), linear4(16, 32, seed=3)]
    sd = {}
    for i, layer in enumerate(layers):
        sd.update(prefixed(f"{2 * i}.", layer.state_dict()))
    def build(device):  # noqa: E306
        with torch.device(device):
            return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False), nn.ReLU(),
                                 nn.Linear(32, 16))
    m = fxquant.load_bnb(sd, build("meta"), config=CFG4)
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = layers[0](x)
        for layer in layers[1:]:  # 48 columns: blocks straddle rows, where bitsandbytes' CPU dequantize is wrong
            ref = nn.functional.linear(torch.relu(ref), bnb_weight(layer), layer.bias)
    assert rel(m(x), ref) < 1e-6
    assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))
    rep = fxquant.report(m)
    assert [r.scheme for r in rep.rows] == ["nf4-64+dq"] * 3 and {r.rule for r in rep.rows} == {"quant_state"}


# ---- 8-bit ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("n,k", [(48, 64), (7, 33)])
def test_8bit_state_dict_loads_bit_exact(n, k, threshold):
    layer = linear8(n, k, threshold)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "SCB", "weight_format"}
    cfg = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": threshold}
    m = fxquant.load_bnb(prefixed("0.", sd), skeleton((n, k)), config=cfg)
    q = m[0]
    assert q.scheme == ("bnb8" if threshold else "bnb8-0.0") and q.op_attrs["threshold"] == threshold
    assert torch.equal(q.qweight, sd["weight"]) and torch.equal(q.scb, sd["SCB"])
    assert torch.equal(q.dequantize(), F.int8_vectorwise_dequant(sd["weight"], sd["SCB"]))
    x = torch.randn(6, k)
    x[2, :3] = 9.0  # outlier columns
    xh = x.half()  # bitsandbytes quantizes fp16 activations; fxquant the fp32 values of the same numbers
    with torch.no_grad():
        theirs, ours = layer(xh).float(), m(xh.float())
    exact = xh.float() @ q.dequantize().T + q.bias
    # the same algorithm: they differ by bitsandbytes' fp16 rescale and codes one apart at near-ties
    assert rel(ours, theirs) < 0.5 * rel(ours, exact) + 2e-3 and rel(ours, exact) < 0.02


def test_8bit_without_config_uses_threshold_6():
    layer = linear8(16, 32)
    m = fxquant.load_bnb(prefixed("0.", layer.state_dict()), skeleton((16, 32)))
    assert m[0].scheme == "bnb8" and m[0].op_attrs == {"threshold": 6.0}


# ---- fxquant's export, read by bitsandbytes -----------------------------------------------------------------
def bnb_from_export(sd, prefix, n, k):
    """What transformers does with a pre-quantized 4-bit layer: Params4bit.from_prequantized."""
    stats = {key[len(prefix) + len("weight."):]: v for key, v in sd.items() if key.startswith(prefix + "weight.")}
    layer = bnb.nn.Linear4bit(k, n, bias=prefix + "bias" in sd)
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd[prefix + "weight"],
                                                       {f"weight.{s}": v for s, v in stats.items()},
                                                       device="cpu", module=layer)
    if prefix + "bias" in sd:
        layer.bias = nn.Parameter(sd[prefix + "bias"])
    return layer


@pytest.mark.parametrize("scheme", ["nf4-64+dq", "fp4-128", "nf4-32", "fp4-64+dq"])
def test_bitsandbytes_reads_our_4bit_export(tmp_path, fp32_dense, scheme):
    torch.manual_seed(0)
    dims = [(64, 256), (24, 128)]  # whole blocks per row: bitsandbytes' CPU forward is right there
    model = skeleton(*dims)
    fxquant.quantize_(model, scheme, (torch.randn(3, 256),))
    fxquant.save_bnb(model, tmp_path / "ck")
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    qc = json.load(open(tmp_path / "ck" / "config.json"))["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == scheme[:3]
    assert qc["bnb_4bit_use_double_quant"] == scheme.endswith("+dq")
    for i, (n, k) in enumerate(dims):
        theirs = bnb_from_export(sd, f"{i}.", n, k)
        assert torch.equal(bnb_weight(theirs), model[i].dequantize()), i
        xi = torch.randn(2, k)
        with torch.no_grad():  # fp32 on both sides (fp32_dense: fxquant does not round x to bf16)
            assert rel(theirs(xi), model[i](xi)) < 1e-6


def test_round_trip_is_byte_identical(tmp_path):
    """bitsandbytes' state dict -> fxquant -> save_bnb: every tensor (the quant_state JSON bytes too) as
    bitsandbytes wrote it."""
    layers = [linear4(64, 128, "nf4", True, seed=1), linear4(32, 64, "nf4", True, blocksize=32, seed=2)]
    sd = {**prefixed("0.", layers[0].state_dict()), **prefixed("1.", layers[1].state_dict())}
    m = fxquant.load_bnb(sd, skeleton((64, 128), (32, 64), device="meta"), config=CFG4)
    fxquant.save_bnb(m, tmp_path / "ck")
    back = load_file(tmp_path / "ck" / "model.safetensors")
    assert set(back) == set(sd)
    for key, t in sd.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    again = fxquant.load_bnb(tmp_path / "ck", skeleton((64, 128), (32, 64), device="meta"))
    x = torch.randn(3, 128)
    assert torch.equal(again[1](again[0](x)), m[1](m[0](x)))


def test_8bit_export_loads_into_linear8bitlt(tmp_path):
    layer = linear8(48, 64)
    m = fxquant.load_bnb(prefixed("0.", layer.state_dict()), skeleton((48, 64)))
    fxquant.save_bnb(m, tmp_path / "ck")
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    assert {k: v.dtype for k, v in sd.items()} == {"0.weight": torch.int8, "0.SCB": torch.float32,
                                                   "0.weight_format": torch.uint8, "0.bias": torch.float32}
    qc = json.load(open(tmp_path / "ck" / "config.json"))["quantization_config"]
    assert qc["load_in_8bit"] and qc["llm_int8_threshold"] == 6.0
    theirs = linear8(48, 64, seed=5)  # bitsandbytes loads into an already-quantized module
    theirs.load_state_dict({k[2:]: v for k, v in sd.items()})
    assert torch.equal(theirs.weight.data, layer.weight.data) and torch.equal(theirs.weight.SCB, layer.weight.SCB)
    x = torch.randn(4, 64).half()
    with torch.no_grad():
        assert torch.equal(theirs(x), layer(x))


def test_quantize_bnb8_then_export(tmp_path):
    model = skeleton((32, 64))
    fxquant.quantize_(model, "bnb8-0", (torch.randn(2, 64),))
    fxquant.save_bnb(model, tmp_path / "ck")
    sd = load_file(tmp_path / "ck" / "model.safetensors")
    assert torch.equal(F.int8_vectorwise_dequant(sd["0.weight"], sd["0.SCB"]), model[0].dequantize())
    assert json.load(open(tmp_path / "ck" / "config.json"))["quantization_config"]["llm_int8_threshold"] == 0.0


# ---- transformers -------------------------------------------------------------------------------------------
IDS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128]])


def _tiny_llama():
    """Every linear's K a multiple of 64: bitsandbytes' CPU forward (blocks of 64) is right on it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _hf_quantized(tmp_path, **bnb_kwargs):
    """A tiny random Llama quantized by transformers' bitsandbytes quantizer on the CPU, saved with
    save_pretrained; returns (directory, the quantized model in training mode: bitsandbytes' exact
    dequantize + fp32 path; dropout is 0)."""
    transformers = pytest.importorskip("transformers")
    _tiny_llama().save_pretrained(tmp_path / "float")
    q = transformers.BitsAndBytesConfig(**bnb_kwargs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=q,
                                                           dtype=torch.float32, device_map="cpu")
    hf.save_pretrained(tmp_path / "bnb")
    return tmp_path / "bnb", hf.train()


def _meta_llama(config):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("kwargs", [dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                                    dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")], ids=["nf4-dq", "fp4"])
def test_transformers_4bit_checkpoint(tmp_path, kwargs):
    directory, hf = _hf_quantized(tmp_path, **kwargs)
    m = fxquant.load_bnb(directory, _meta_llama(hf.config)).eval()
    n_q = 0
    for name, layer in m.named_modules():
        if isinstance(layer, QuantizedLinear):
            n_q += 1
            assert torch.equal(layer.dequantize(), bnb_weight(hf.get_submodule(name))), name
            assert layer.op_attrs["compute_dtype"] == torch.float32  # bnb_4bit_compute_dtype
    assert n_q == 14 and m.lm_head.weight is m.model.embed_tokens.weight
    with torch.no_grad():
        ours, theirs = m(IDS).logits, hf(IDS).logits
    assert rel(ours, theirs) < 1e-5
    assert fxquant.report(m).row("lm_head").reason == "stored in float by the checkpoint"


def test_transformers_8bit_checkpoint(tmp_path):
    directory, hf = _hf_quantized(tmp_path, load_in_8bit=True)
    m = fxquant.load_bnb(directory, _meta_llama(hf.config)).eval()
    q = m.model.layers[0].self_attn.q_proj
    assert q.scheme == "bnb8"
    theirs = hf.model.layers[0].self_attn.q_proj
    scb = theirs.weight.SCB if theirs.weight.SCB is not None else theirs.state.SCB
    assert torch.equal(q.dequantize(), F.int8_vectorwise_dequant(theirs.weight.data, scb))
    with torch.no_grad():
        ours, ref = m(IDS).logits, hf.eval()(IDS).logits
    assert rel(ours, ref) < 0.02  # bitsandbytes quantizes fp16 activations, fxquant fp32 ones


def test_transformers_reads_our_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _tiny_llama()
    fxquant.quantize_(m, fxquant.Spec(default="nf4-64+dq", skip=["lm_head"]), (), {"input_ids": IDS})
    fxquant.save_bnb(m, tmp_path / "ck")
    qc = json.load(open(tmp_path / "ck" / "config.json"))["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head"] and qc["bnb_4bit_compute_dtype"] is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", device_map="cpu", dtype=torch.float32)
    for name, layer in m.named_modules():
        if isinstance(layer, QuantizedLinear):
            theirs = hf.get_submodule(name)
            assert isinstance(theirs, bnb.nn.Linear4bit)
            assert torch.equal(bnb_weight(theirs), layer.dequantize()), name
    with torch.no_grad():
        theirs, ours = hf.train()(IDS).logits, m(IDS).logits
    assert rel(ours, theirs) < 1e-2  # ours: fp32 activations rounded to bf16 on AVX512-BF16 CPUs


# ---- refusals -----------------------------------------------------------------------------------------------
def _state(quant_type="nf4", double=True, n=24, k=64, blocksize=64):
    return prefixed("0.", linear4(n, k, quant_type, double, blocksize).state_dict())


def _with_state(sd, **changes):
    key = next(k for k in sd if ".quant_state." in k)
    state = json.loads(bytes(sd[key].tolist()).decode())
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    return {**sd, key: torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


def _replace(sd, key, value):
    out = dict(sd)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


QS = "0.weight.quant_state.bitsandbytes__nf4"
CORRUPT = [
    (lambda sd: _with_state(sd, blocksize=48), QS, "quant_state blocksize=48 is not supported; valid: 32, 64"),
    (lambda sd: _with_state(sd, shape=[24, 32]), QS, r"quant_state shape=\[24, 32\] disagrees with the model's "
                                                     r"layer \[24, 64\]"),
    (lambda sd: _with_state(sd, nested_blocksize=128), QS, "nested_blocksize=128 is not supported; valid: 256"),
    (lambda sd: _with_state(sd, quant_type="fp4"), QS, "quant_type='fp4' disagrees with its key"),
    (lambda sd: _with_state(sd, dtype="float64"), QS, "quant_state dtype='float64' is not supported"),
    (lambda sd: _with_state(sd, nested_offset=None), QS, "lacks 'nested_offset'"),
    (lambda sd: _with_state(sd, colour="red"), QS, "quant_state field 'colour' is unknown"),
    (lambda sd: _replace(sd, QS, torch.tensor([1, 2, 255], dtype=torch.uint8)), QS, "not a packed bitsandbytes "
                                                                                     "quant_state"),
    (lambda sd: {**_replace(sd, QS, None), "0.weight.quant_state.bitsandbytes__int4": sd[QS]},
     "0.weight.quant_state.bitsandbytes__int4", "quant type 'int4' is not supported; valid: nf4, fp4"),
    (lambda sd: _replace(sd, "0.weight", sd["0.weight"].reshape(-1).view(torch.int16)[:, None]), "0.weight",
     "packed 4-bit codes stored as torch.int16; valid quant_storage: uint8, int8, float16, bfloat16, float32"),
    (lambda sd: _replace(sd, "0.weight", sd["0.weight"][:-2]), "0.weight", "the packed codes of an "
                                                                           r"\[N\*K = 1536\] weight are 768 bytes"),
    (lambda sd: _replace(sd, "0.weight.absmax", sd["0.weight.absmax"].float()), "0.weight.absmax",
     r"torch.float32 of shape \(24,\) in the checkpoint; expected torch.uint8 of shape \(24,\)"),
    (lambda sd: _replace(sd, "0.weight.nested_absmax", torch.tensor([float("nan")])), "0.weight.nested_absmax",
     "holds NaN or inf values"),
    (lambda sd: _replace(sd, "0.weight.quant_map", None), "0.weight.quant_map", "missing from the checkpoint"),
    (lambda sd: _replace(sd, "0.weight.quant_map", fmt4.code_table("fp4")), "0.weight.quant_map",
     "differs from bitsandbytes' nf4 table"),
    (lambda sd: _replace(sd, "0.weight.nested_quant_map", fmt4.dynamic_map() * 2), "0.weight.nested_quant_map",
     "differs from bitsandbytes' signed dynamic map"),
    (lambda sd: _replace(sd, "0.weight.nested_quant_map", None), "0.weight.nested_quant_map", "missing"),
    (lambda sd: {**sd, "0.weight.colour": torch.zeros(1)}, "0.weight.colour", "not a tensor of a bitsandbytes 4-bit"),
    (lambda sd: {**sd, "1.weight": torch.zeros(1)}, "1.weight", "in the checkpoint but not in the model"),
]


@pytest.mark.parametrize("corrupt,tensor,match", CORRUPT, ids=[f"{i}:{c[1]}" for i, c in enumerate(CORRUPT)])
def test_corrupt_4bit_tensors_are_refused_by_name(corrupt, tensor, match):
    sd = corrupt(_state())
    model = skeleton((24, 64))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as e:
        fxquant.load_bnb(sd, model)
    assert f"'{tensor}'" in str(e.value)
    after = snapshot(model)
    assert after[0] == before[0] and all(torch.equal(after[1][k], v) for k, v in before[1].items())


CORRUPT8 = [
    (lambda sd: _replace(sd, "0.SCB", sd["0.SCB"].half()), "0.SCB", r"torch.float16 of shape \(16,\) in the "
                                                                    r"checkpoint; expected torch.float32"),
    (lambda sd: _replace(sd, "0.SCB", -sd["0.SCB"]), "0.SCB", "negative row absmax"),
    (lambda sd: _replace(sd, "0.weight_format", torch.tensor(1, dtype=torch.uint8)), "0.weight_format",
     "valid: an integer scalar 0"),
    (lambda sd: _replace(sd, "0.weight", sd["0.weight"][:, :16]), "0.weight", r"expected torch.int8 of shape "
                                                                              r"\(16, 32\)"),
    (lambda sd: _replace(sd, "0.weight", sd["0.weight"].float()), "0.weight", "expected torch.int8"),
]


@pytest.mark.parametrize("corrupt,tensor,match", CORRUPT8, ids=[c[1] + str(i) for i, c in enumerate(CORRUPT8)])
def test_corrupt_8bit_tensors_are_refused_by_name(corrupt, tensor, match):
    sd = corrupt(prefixed("0.", linear8(16, 32).state_dict()))
    with pytest.raises(ValueError, match=match) as e:
        fxquant.load_bnb(sd, skeleton((16, 32)))
    assert f"'{tensor}'" in str(e.value)


@pytest.mark.parametrize("config,match", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True},
     r"layer '0': the checkpoint stores a packed quant_state \(4-bit\), but its quantization_config says load_in_8bit"),
    ({**CFG4, "bnb_4bit_quant_type": "fp4"}, "layer '0': its quant_state is nf4 with double quant.*says "
                                             "bnb_4bit_quant_type='fp4'"),
    ({**CFG4, "bnb_4bit_use_double_quant": False}, "bnb_4bit_use_double_quant=False"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq': not a bitsandbytes checkpoint"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "colour": 1}, "BitsAndBytesConfig.*colour"),
])
def test_config_disagreements_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        fxquant.load_bnb(_state(), skeleton((24, 64)), config=config)


def test_unreadable_directory_is_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    json.dump({"quantization_config": CFG4}, open(tmp_path / "ck" / "config.json", "w"))
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        fxquant.load_bnb(tmp_path / "ck", skeleton((24, 64)))
    save_file(_state(), tmp_path / "ck" / "model.safetensors")
    assert fxquant.load_bnb(tmp_path / "ck", skeleton((24, 64)))[0].scheme == "nf4-64+dq"


def test_export_refusals_leave_files_alone(tmp_path):
    model = skeleton((32, 64), (16, 32))
    fxquant.quantize_(model, fxquant.Spec(default="nf4", rules={"1": "int4wo-32"}), (torch.randn(2, 64),))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"layer '1' \(int4wo-32\): no bitsandbytes form; exportable: nf4"):
        fxquant.save_bnb(model, tmp_path / "ck")
    mixed = skeleton((32, 64), (16, 32))
    fxquant.quantize_(mixed, fxquant.Spec(default="nf4", rules={"1": "bnb8"}), (torch.randn(2, 64),))
    with pytest.raises(ValueError, match="layer '1' .*8-bit with threshold 6.0, but layer '0' is 4-bit nf4 without "
                                         "double quant"):
        fxquant.save_bnb(mixed, tmp_path / "ck")
    with pytest.raises(ValueError, match="no nf4 / fp4 / bnb8 layer"):
        fxquant.save_bnb(skeleton((4, 4)), tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json"]
    assert (tmp_path / "ck" / "config.json").read_text() == "{}"
