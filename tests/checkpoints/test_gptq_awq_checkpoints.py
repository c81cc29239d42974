"""GPTQ and AWQ checkpoints: load_gptq / load_awq / save_gptq / save_awq.

Oracle: the published layouts re-implemented plainly here with numpy (AutoGPTQ's ``QuantLinear.pack``
loops for packing, including the 3-bit 10-1-10-1-10 split, and its torch dequantization with ``wf``
shifts and ``scales[g_idx] * (q - zeros[g_idx])``, v1 zeros ``+ 1``; AutoAWQ's ``WQLinear_GEMM``
packing with ``[0, 2, 4, 6, 1, 3, 5, 7]`` and its ``dequantize_gemm``): checkpoints are written from
known codes / scales / zeros / ``g_idx``, loaded packed, and the weights fxquant multiplies by must be the
oracle's bit for bit (float64 products of fp16 scales and small integers, exact in fp32); outputs are
``F.linear`` on the oracle's weight up to fp32 summation order (tolerance ``1e-5 * |x| @ |W|.T``, fp32
activations not rounded: ``fp32_dense``).
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import fxquant
from fxquant.modules import QuantizedLinear
from helpers import assert_linear_close

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
M32 = 0xFFFFFFFF


# ---- the oracle: the published packings and dequantizations, plainly ------------------------------------
def gptq_pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``pack`` loop: integers ``[R, C]`` packed along R into int32 ``[R // 32 * bits, C]``."""
    q = q.astype(np.uint64)
    out = np.zeros((q.shape[0] // 32 * bits, q.shape[1]), dtype=np.uint64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(32 // bits):
                out[row] |= q[i + j] << np.uint64(bits * j)
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 codes, a code split across words, 10, split, 10
            for j in range(10):
                out[row] |= q[i + j] << np.uint64(3 * j)
            i += 10
            out[row] |= (q[i] << np.uint64(30)) & np.uint64(M32)
            row += 1
            out[row] |= (q[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(10):
                out[row] |= q[i + j] << np.uint64(3 * j + 1)
            i += 10
            out[row] |= (q[i] << np.uint64(31)) & np.uint64(M32)
            row += 1
            out[row] |= (q[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(10):
                out[row] |= q[i + j] << np.uint64(3 * j + 2)
            i += 10
            row += 1
    return (out & np.uint64(M32)).astype(np.uint32).view(np.int32)


def gptq_unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's torch dequantization of the packing (``wf`` shifts; 3 bits with its fix-ups): int32
    ``[R * bits / 32, C]`` -> integers ``[R, C]``."""
    p = packed.astype(np.int64) & M32
    if bits in (2, 4, 8):
        wf = np.arange(0, 32, bits)
        w = (p[:, None, :] >> wf[None, :, None]) & ((1 << bits) - 1)
        return w.reshape(-1, p.shape[1])
    wf = np.array([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                   [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]])
    w = (p.reshape(-1, 3, 1, p.shape[1]) >> wf[None, :, :, None]) & 7
    w[:, 0, 10] = (w[:, 0, 10] & 3) | ((w[:, 1, 0] << 2) & 4)
    w[:, 1, 11] = (w[:, 1, 11] & 1) | ((w[:, 2, 0] << 1) & 6)
    return np.concatenate([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], axis=1).reshape(-1, p.shape[1])


def gptq_dequantize(t: dict, bits: int, v2: bool) -> np.ndarray:
    """float64 ``W`` ``[N, K]`` = ``(scales[g_idx] * (q - zeros[g_idx])).T``, v1 zeros ``+ 1``."""
    q = gptq_unpack_rows(t["qweight"].numpy(), bits)  # [K, N]
    z = gptq_unpack_rows(t["qzeros"].numpy().T, bits).T + (0 if v2 else 1)  # [G, N]
    g = t["g_idx"].numpy().astype(np.int64)
    s = t["scales"].double().numpy()
    return (s[g] * (q - z[g])).T


def awq_pack(q: np.ndarray) -> np.ndarray:
    """AutoAWQ's ``WQLinear_GEMM.from_linear`` packing: ``[R, N]`` -> int32 ``[R, N/8]`` in its order."""
    q = q.astype(np.uint64)
    out = np.zeros((q.shape[0], q.shape[1] // 8), dtype=np.uint64)
    for col in range(q.shape[1] // 8):
        for i in range(8):
            out[:, col] |= q[:, col * 8 + AWQ_ORDER[i]] << np.uint64(4 * i)
    return out.astype(np.uint32).view(np.int32)


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    """AutoAWQ's ``unpack_awq`` + ``reverse_awq_order``."""
    p = packed.astype(np.int64) & M32
    w = ((p[:, :, None] >> np.arange(0, 32, 4)[None, None, :]) & 15).reshape(p.shape[0], -1)
    order = np.arange(w.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
    return w[:, order]


def awq_dequantize(t: dict, group_size: int) -> np.ndarray:
    """AutoAWQ's ``dequantize_gemm`` in float64: ``(q - zeros) * scales`` repeated per group, transposed."""
    q, z = awq_unpack(t["qweight"].numpy()), awq_unpack(t["qzeros"].numpy())
    g = q.shape[0] if group_size == -1 else group_size
    s = t["scales"].double().numpy()
    return ((q - np.repeat(z, g, 0)) * np.repeat(s, g, 0)).T


# ---- writing checkpoints from known values ----------------------------------------------------------------
class Net(nn.Module):
    """Two quantizable layers and a float head."""

    def __init__(self, k=128, n=64, m=96):
        super().__init__()
        self.fc1 = nn.Linear(k, n)
        self.fc2 = nn.Linear(n, m, bias=False)
        self.head = nn.Linear(m, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def known_layer(n, k, bits, group, sym, act_order, seed, v2=True):
    """Random codes ``[K, N]``, zeros ``[G, N]``, fp16 scales, ``g_idx`` (act order: ``invperm // g``)."""
    rng = np.random.default_rng(seed)
    g = k if group == -1 else group
    groups = -(-k // g)
    q = rng.integers(0, 1 << bits, (k, n))
    lo = 0 if v2 else 1  # v1 cannot hold a zero point 0
    z = np.full((groups, n), 1 << (bits - 1)) if sym else rng.integers(lo, 1 << bits, (groups, n))
    s = torch.tensor(rng.uniform(0.001, 0.05, (groups, n)), dtype=torch.float16)
    g_idx = np.arange(k) // g
    if act_order:
        invperm = np.argsort(rng.permutation(k))
        g_idx = invperm // g
    return q, z, s, torch.tensor(g_idx, dtype=torch.int32)


def gptq_tensors(n, k, bits, group, sym, act_order, v2, seed):
    q, z, s, g_idx = known_layer(n, k, bits, group, sym, act_order, seed, v2)
    stored_z = z if v2 else z - 1
    return {"qweight": torch.from_numpy(gptq_pack_rows(q, bits)),
            "qzeros": torch.from_numpy(np.ascontiguousarray(gptq_pack_rows(stored_z.T, bits).T)),
            "scales": s, "g_idx": g_idx}


def awq_tensors(n, k, group, seed):
    q, z, s, _ = known_layer(n, k, 4, group, False, False, seed)
    return {"qweight": torch.from_numpy(awq_pack(q)), "qzeros": torch.from_numpy(awq_pack(z)), "scales": s}


def write_checkpoint(directory, layers: dict, qc: dict, float_model: Net | None = None):
    """``model.safetensors`` (layer tensors, biases fp16, the float head) and ``config.json``."""
    ref = float_model or Net()
    tensors = {f"{p}.{name}": t for p, local in layers.items() for name, t in local.items()}
    tensors["fc1.bias"] = ref.fc1.bias.detach().half()
    tensors["head.weight"], tensors["head.bias"] = ref.head.weight.detach(), ref.head.bias.detach()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "net", "quantization_config": qc}, f)
    return tensors


def gptq_config(bits=4, group=32, sym=False, desc_act=False, v2=False, **extra):
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": "gptq_v2" if v2 else "gptq", "damp_percent": 0.1, **extra}


def layer_weight(m) -> torch.Tensor:
    return m.dequantize() if isinstance(m, QuantizedLinear) else m.weight


def check_outputs(model, oracle: dict, tensors: dict):
    """Each quantized layer's output is F.linear on the oracle's weight (fp32 summation order)."""
    for name, w in oracle.items():
        layer = getattr(model, name)
        x = torch.randn(5, w.shape[1])
        b = tensors.get(f"{name}.bias")
        ref = F.linear(x, w.float(), None if b is None else b.float())
        assert_linear_close(layer(x), ref, x, w, 1e-5, b)


# ---- GPTQ: load ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,act_order", [(32, False), (32, True), (-1, False), (-1, True), (48, True)])
@pytest.mark.parametrize("v2,sym", [(False, False), (True, True), (True, False)])
def test_gptq_loads_the_oracles_weights(tmp_path, fp32_dense, bits, v2, group, act_order, sym):
    """v1 asymmetric (stored z - 1), v2 symmetric and asymmetric; v1 symmetric: the round trips below."""
    k, n, m = 128 if group != 48 else 96, 64, 96
    layers = {"fc1": gptq_tensors(n, k, bits, group, sym, act_order, v2, 1),
              "fc2": gptq_tensors(m, n, bits, group, sym, act_order, v2, 2)}
    tensors = write_checkpoint(tmp_path, layers, gptq_config(bits, group, sym, act_order, v2), Net(k, n, m))
    model = fxquant.load_gptq(tmp_path, Net(k, n, m))
    oracle = {p: torch.from_numpy(gptq_dequantize(t, bits, v2)) for p, t in layers.items()}
    for p, w in oracle.items():
        layer = getattr(model, p)
        assert isinstance(layer, QuantizedLinear)
        permuted = act_order and group != -1
        assert layer.op_name == ("linear_affine_perm" if permuted else "linear_affine"), p
        assert torch.equal(layer.dequantize(), w.float()), p  # exact: fp16 scale x small integer
        assert layer.scale.dtype == torch.float16 and (layer.zero_point.numel() == 0) == sym
    assert torch.equal(model.head.weight, tensors["head.weight"]) and model.fc1.bias.dtype == torch.float16
    check_outputs(model, oracle, tensors)
    rows = {r.fqn: r for r in fxquant.report(model).rows}
    assert rows["fc1"].status == "quantized" and rows["head"].status == "skipped"


def test_gptq_policy_outputs_and_compile(tmp_path):
    """Default compute_dtype policy (fp32 x rounded to bf16 on AVX512-BF16 CPUs), whole model, and
    torch.compile(fullgraph=True) equal to eager."""
    layers = {"fc1": gptq_tensors(64, 128, 4, 32, False, True, False, 3),
              "fc2": gptq_tensors(96, 64, 4, 32, False, False, False, 4)}
    ref = Net()
    tensors = write_checkpoint(tmp_path, layers, gptq_config(desc_act=True), ref)
    model = fxquant.load_gptq(tmp_path, Net())
    from helpers import policy_x

    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(0))
    w1, w2 = (torch.from_numpy(gptq_dequantize(layers[p], 4, False)).float() for p in ("fc1", "fc2"))
    h = torch.relu(F.linear(policy_x(x), w1, tensors["fc1.bias"].float()))
    h = torch.relu(F.linear(policy_x(h), w2))
    want = F.linear(h, tensors["head.weight"], tensors["head.bias"])
    got = model(x)
    # the hidden activations are rounded to bf16 (the policy) in both: a summation-order difference
    # before that rounding can flip one element by a bf16 step (2**-8 relative), hence 1e-3, not 1e-4
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert torch.allclose(torch.compile(model, fullgraph=True)(x), got, atol=1e-5)


def test_gptq_into_a_meta_skeleton_and_a_state_dict(tmp_path):
    layers = {"fc1": gptq_tensors(64, 128, 4, 32, True, True, False, 5),
              "fc2": gptq_tensors(96, 64, 4, 32, True, False, False, 6)}
    tensors = write_checkpoint(tmp_path, layers, gptq_config(sym=True, desc_act=True))
    with torch.device("meta"):
        skeleton = Net()
    model = fxquant.load_gptq(tmp_path, skeleton)
    cpu = fxquant.load_gptq(dict(tensors), Net(), config=gptq_config(sym=True, desc_act=True))
    x = torch.randn(2, 128)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model(x), cpu(x))


def test_autogptq_quantize_config_file_and_base_name(tmp_path):
    """Older AutoGPTQ checkpoints: quantize_config.json beside a config.json without quantization_config,
    weights in <model_file_base_name>.safetensors."""
    layers = {"fc1": gptq_tensors(64, 128, 4, 32, False, False, False, 7),
              "fc2": gptq_tensors(96, 64, 4, 32, False, False, False, 8)}
    write_checkpoint(tmp_path, layers, {})
    os.rename(tmp_path / "model.safetensors", tmp_path / "gptq_model-4bit-32g.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "net"}, f)
    with open(tmp_path / "quantize_config.json", "w") as f:
        json.dump({**gptq_config(), "model_file_base_name": "gptq_model-4bit-32g", "is_marlin_format": False}, f)
    model = fxquant.load_gptq(tmp_path, Net())
    assert torch.equal(model.fc1.dequantize(), torch.from_numpy(gptq_dequantize(layers["fc1"], 4, False)).float())


# ---- GPTQ: write ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym,act_order,v2", [(4, 32, False, True, False), (3, 32, True, True, True),
                                                          (8, -1, False, False, False), (2, 32, False, False, True)])
def test_gptq_checkpoint_round_trips_bit_identical(tmp_path, bits, group, sym, act_order, v2):
    """Checkpoint -> load_gptq -> save_gptq writes the same tensors, and a config GPTQConfig reads."""
    layers = {"fc1": gptq_tensors(64, 128, bits, group, sym, act_order, v2, 9),
              "fc2": gptq_tensors(96, 64, bits, group, sym, act_order, v2, 10)}
    tensors = write_checkpoint(tmp_path / "a", layers, gptq_config(bits, group, sym, act_order, v2))
    model = fxquant.load_gptq(tmp_path / "a", Net())
    fxquant.save_gptq(model, tmp_path / "b", checkpoint_format="gptq_v2" if v2 else "gptq")
    again = load_file(tmp_path / "b" / "model.safetensors")
    assert set(again) == set(tensors)
    for key, t in tensors.items():
        assert again[key].dtype == t.dtype and torch.equal(again[key], t), key
    qc = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    from transformers import GPTQConfig

    hf = GPTQConfig.from_dict(qc)
    assert (hf.bits, hf.group_size, hf.sym, hf.desc_act, hf.format) == (bits, group, sym, act_order,
                                                                        "gptq_v2" if v2 else "gptq")
    reloaded = fxquant.load_gptq(tmp_path / "b", Net())
    for p in layers:
        a, b = getattr(model, p), getattr(reloaded, p)
        assert a.op_name == b.op_name and a.op_attrs == b.op_attrs
        assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.tensor_names)


@pytest.mark.parametrize("scheme", ["affine4-g32-fp16", "affine4-g32-sym", "affine8-ch-fp16", "affine3-g64",
                                    "affine2-g32-sym-fp16", "int4wo-32-sym", "int8wo"])
def test_fxquant_to_gptq_and_back(tmp_path, scheme):
    """fxquant's own layers written as GPTQ: the oracle reads fxquant's weights, load_gptq gives them
    back bit for bit (bf16 scales are written as the same fp16 values)."""
    model = Net()
    x = torch.randn(4, 128)
    fxquant.quantize_(model, fxquant.Spec(default=scheme, skip=["head"]), (x,))
    fmt = "gptq_v2" if "sym" not in scheme and scheme != "int8wo" else "gptq"
    fxquant.save_gptq(model, tmp_path, checkpoint_format=fmt)
    files = load_file(tmp_path / "model.safetensors")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    for p in ("fc1", "fc2"):
        local = {n: files[f"{p}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(torch.from_numpy(gptq_dequantize(local, qc["bits"], fmt == "gptq_v2")).float(),
                           getattr(model, p).dequantize()), p
    back = fxquant.load_gptq(tmp_path, Net())
    for p in ("fc1", "fc2"):
        a, b = getattr(model, p), getattr(back, p)
        assert torch.equal(b.dequantize(), a.dequantize())
        if scheme.startswith("affine") and "fp16" in scheme:  # the same scheme: the same buffers
            assert b.scheme == scheme and all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.tensor_names)
    assert torch.allclose(back(x), model(x), rtol=1e-4, atol=1e-4)


def test_gptq_method_on_the_affine_grid_saved_for_other_tools(tmp_path):
    """fxquant.quantize_(m, "affine4-g128@gptq", calibration=...) -> save_gptq: the oracle's weights are
    fxquant's dequantized weights."""
    torch.manual_seed(0)
    model = Net(k=256, n=64, m=96)
    calib = [(torch.randn(8, 256),) for _ in range(4)]
    fxquant.quantize_(model, fxquant.Spec(default="affine4-g128@gptq", skip=["head"]), calib[0], calibration=calib)
    assert fxquant.report(model).row("fc1").method == "gptq"
    fxquant.save_gptq(model, tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    for p in ("fc1", "fc2"):
        local = {n: files[f"{p}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(torch.from_numpy(gptq_dequantize(local, 4, False)).float(), getattr(model, p).dequantize())
    x = torch.randn(3, 256)
    assert torch.equal(fxquant.load_gptq(tmp_path, Net(k=256, n=64, m=96))(x), model(x))


def test_act_order_layers_through_fxquant_save_and_load(tmp_path):
    """A model load_gptq made (act-order: linear_affine_perm) saved with fxquant.save and loaded into a
    meta skeleton gives the same buffers and outputs."""
    layers = {"fc1": gptq_tensors(64, 128, 4, 32, False, True, False, 21),
              "fc2": gptq_tensors(96, 64, 4, 32, False, True, False, 22)}
    write_checkpoint(tmp_path / "ck", layers, gptq_config(desc_act=True))
    model = fxquant.load_gptq(tmp_path / "ck", Net())
    fxquant.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = Net()
        skeleton.fc1.bias = nn.Parameter(torch.empty(64, dtype=torch.float16))  # stored fp16, as GPTQ does
    back = fxquant.load(tmp_path / "m.safetensors", skeleton)
    assert back.fc1.op_name == "linear_affine_perm" and torch.equal(back.fc1.perm, model.fc1.perm)
    x = torch.randn(4, 128)
    assert torch.equal(back(x), model(x))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


AWQ_FOLDABLE = {"re:.*(q|k|v|gate|up)_proj": "affine4-g32-fp16@awq"}  # scales folded into the norms


@pytest.mark.slow
@pytest.mark.parametrize("save,load,spec", [(fxquant.save_gptq, fxquant.load_gptq, "affine4-g32@gptq"),
                                            (fxquant.save_awq, fxquant.load_awq, "affine4-g32-fp16")])
def test_llama_quantized_by_fxquant_round_trips_on_a_meta_skeleton(tmp_path, save, load, spec):
    """A Hugging Face Llama (tied embeddings) quantized by fxquant's GPTQ / AWQ, written as a checkpoint
    and read back into a meta skeleton: the same logits, and generate runs.  (fxquant's AWQ folds scales
    into norms only: o_proj / down_proj keep an input scale no AWQ checkpoint holds, so RTN there.)"""
    from transformers import LlamaForCausalLM

    ids = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128]])
    m = _tiny_llama()
    calib = [{"input_ids": torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i))}
             for i in range(2)]
    rules = AWQ_FOLDABLE if save is fxquant.save_awq else {}
    fxquant.quantize_(m, fxquant.Spec(default=spec, rules=rules, skip=["lm_head"]), (), {"input_ids": ids},
                      calibration=calib)
    save(m, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] in ("gptq", "awq")
    with torch.device("meta"):
        sk = LlamaForCausalLM(m.config)
    load(tmp_path / "ck", sk)
    assert not any(t.is_meta for t in list(sk.parameters()) + list(sk.buffers()))
    assert sk.lm_head.weight is sk.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(sk.eval()(ids).logits, m(ids).logits)
    out = sk.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)


# ---- AWQ --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, -1])
def test_awq_loads_the_oracles_weights(tmp_path, fp32_dense, group):
    layers = {"fc1": awq_tensors(64, 128, group, 11), "fc2": awq_tensors(96, 64, group, 12)}
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": ["head"]}
    tensors = write_checkpoint(tmp_path, layers, qc)
    model = fxquant.load_awq(tmp_path, Net())
    oracle = {p: torch.from_numpy(awq_dequantize(t, group)) for p, t in layers.items()}
    for p, w in oracle.items():
        assert getattr(model, p).op_name == "linear_affine"
        assert torch.equal(getattr(model, p).dequantize(), w.float()), p
    check_outputs(model, oracle, tensors)
    fxquant.save_awq(model, tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert set(again) == set(tensors) and all(torch.equal(again[k], t) for k, t in tensors.items())
    qc2 = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    from transformers import AwqConfig

    hf = AwqConfig.from_dict(qc2)
    assert (hf.bits, hf.group_size, hf.zero_point, hf.modules_to_not_convert) == (4, group, True, ["head"])
    assert hf.to_dict()["version"] == "gemm"


@pytest.mark.parametrize("scheme", ["affine4-g32-fp16", "affine4-g32", "affine4-ch-sym-fp16", "int4wo-32-sym"])
def test_fxquant_to_awq_and_back(tmp_path, scheme):
    model = Net()
    x = torch.randn(4, 128)
    fxquant.quantize_(model, fxquant.Spec(default=scheme, skip=["head"]), (x,))
    fxquant.save_awq(model, tmp_path)
    files = load_file(tmp_path / "model.safetensors")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    for p in ("fc1", "fc2"):
        local = {n: files[f"{p}.{n}"] for n in ("qweight", "qzeros", "scales")}
        group = qc["group_size"]
        assert torch.equal(torch.from_numpy(awq_dequantize(local, group)).float(), getattr(model, p).dequantize())
    back = fxquant.load_awq(tmp_path, Net())
    if scheme.startswith("affine"):  # the same op on the same values; int4wo-sym runs the intx kernels
        assert torch.equal(back(x), model(x))
    assert torch.allclose(back(x), model(x), rtol=1e-4, atol=1e-4)


class RMSNorm(nn.Module):
    """Llama's RMSNorm as written in transformers (a ``mul`` by the weight the AWQ fold finds)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class NormNet(nn.Module):
    """A norm feeding both quantized layers: AWQ folds its scales into the norm weight."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(128)
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(128, 96, bias=False)
        self.head = nn.Linear(160, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.head(torch.cat([self.fc1(h), self.fc2(h)], -1))


def test_awq_method_saved_for_other_tools(tmp_path):
    """fxquant's AWQ on the affine grid, scales folded into the norm: save_awq, the oracle reads fxquant's
    weights, load_awq gives the same model back.  Where a scale cannot be folded (Net: a ReLU before each
    layer) the writer refuses by layer name before writing."""
    torch.manual_seed(0)
    calib = [(torch.randn(8, 128),) for _ in range(2)]
    model = NormNet()
    fxquant.quantize_(model, fxquant.Spec(default="affine4-g32-fp16@awq", skip=["head"]), calib[0], calibration=calib)
    assert fxquant.report(model).row("fc1").method == "awq" and model.fc1.input_scale is None
    fxquant.save_awq(model, tmp_path / "ok")
    files = load_file(tmp_path / "ok" / "model.safetensors")
    for p in ("fc1", "fc2"):
        local = {n: files[f"{p}.{n}"] for n in ("qweight", "qzeros", "scales")}
        assert torch.equal(torch.from_numpy(awq_dequantize(local, 32)).float(), getattr(model, p).dequantize())
    x = torch.randn(3, 128)
    assert torch.equal(fxquant.load_awq(tmp_path / "ok", NormNet())(x), model(x))
    model = Net()
    fxquant.quantize_(model, fxquant.Spec(default="affine4-g32-fp16@awq", skip=["head"]), calib[0], calibration=calib)
    assert model.fc1.input_scale is not None
    with pytest.raises(ValueError, match=r"layer 'fc1' .*AWQ scale that could not be folded"):
        fxquant.save_awq(model, tmp_path / "no")
    assert not os.path.exists(tmp_path / "no")


# ---- refusals -----------------------------------------------------------------------------------------------
def _gptq_dir(tmp_path, **cfg):
    layers = {"fc1": gptq_tensors(64, 128, 4, 32, False, True, False, 13),
              "fc2": gptq_tensors(96, 64, 4, 32, False, False, False, 14)}
    return layers, gptq_config(desc_act=True, **cfg)


@pytest.mark.parametrize("change,match", [
    (lambda L: L["fc1"].update(qweight=L["fc1"]["qweight"][:-1]), r"tensor 'fc1.qweight': expected torch.int32 of "
                                                                     r"shape \(16, 64\)"),
    (lambda L: L["fc1"].pop("qzeros"), r"tensor 'fc1.qzeros': missing"),
    (lambda L: L["fc2"].update(scales=L["fc2"]["scales"].to(torch.int32)), r"tensor 'fc2.scales': expected .* got "
                                                                             r"torch.int32"),
    (lambda L: L["fc1"].update(qweight=L["fc1"]["qweight"].float()), r"tensor 'fc1.qweight'.* got torch.float32"),
    (lambda L: L["fc1"].update(g_idx=L["fc1"]["g_idx"].long()), r"tensor 'fc1.g_idx': expected torch.int32"),
    (lambda L: L["fc1"].pop("g_idx"), r"tensor 'fc1.g_idx': missing"),
    (lambda L: L["fc1"].update(g_idx=torch.full((128,), 4, dtype=torch.int32)), r"fc1.g_idx': groups 4..4 outside"),
    (lambda L: L["fc1"].update(g_idx=torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32)),
     r"fc1.g_idx': group 0 has 40 columns"),
    (lambda L: L["fc1"].update(weight=torch.zeros(64, 128)), r"tensor 'fc1.weight': not a tensor of the GPTQ layout"),
])
def test_gptq_corrupt_tensors_are_refused_by_name(tmp_path, change, match):
    layers, qc = _gptq_dir(tmp_path)
    change(layers)
    write_checkpoint(tmp_path, layers, qc)
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fxquant.load_gptq(tmp_path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


@pytest.mark.parametrize("cfg,match", [
    ({"bits": 5}, r"bits=5 is not supported; valid: 2, 3, 4, 8"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not supported; valid: 'gptq', 'gptq_v2'"),
    ({"is_marlin_format": True}, r"checkpoint_format='marlin \(is_marlin_format\)'"),
    ({"group_size": 0}, r"group_size=0 is not valid"),
    ({"sym": "yes"}, r"sym='yes' is not valid"),
    ({"pack_dtype": "int64"}, r"pack_dtype='int64' is not supported"),
    ({"dynamic": {r"+:.*fc1": {"bits": 8}}}, r"dynamic: per-module overrides"),
    ({"quant_method": "awq"}, r"quant_method='awq'; valid: 'gptq'"),
])
def test_gptq_unsupported_configs_are_refused_by_field(tmp_path, cfg, match):
    layers, qc = _gptq_dir(tmp_path)
    write_checkpoint(tmp_path, layers, {**qc, **cfg})
    with pytest.raises(ValueError, match=match):
        fxquant.load_gptq(tmp_path, Net())


def test_gptq_shape_and_module_mismatches(tmp_path):
    layers, qc = _gptq_dir(tmp_path)
    write_checkpoint(tmp_path, layers, qc)
    with pytest.raises(ValueError, match=r"tensor 'fc1.qweight': expected torch.int32 of shape \(12, 64\)"):
        fxquant.load_gptq(tmp_path, Net(k=96))  # the checkpoint's K is 128
    other = nn.Sequential()
    other.fc1 = nn.Conv1d(1, 1, 1)
    with pytest.raises(ValueError, match=r"tensor 'fc1.qweight': the model has a Conv1d, not an nn.Linear"):
        fxquant.load_gptq(tmp_path, other)
    with pytest.raises(ValueError, match=r"tensor 'fc1.qweight': the model has no such module"):
        fxquant.load_gptq(tmp_path, nn.Sequential())
    v1 = {"fc1": gptq_tensors(64, 128, 8, 32, False, False, False, 15)}
    v1["fc1"]["qzeros"] = torch.full_like(v1["fc1"]["qzeros"], -1)  # every stored field 255: z = 256
    write_checkpoint(tmp_path / "z", {**layers, **v1}, gptq_config(bits=8))
    with pytest.raises(ValueError, match=r"fc1.qzeros'"):
        fxquant.load_gptq(tmp_path / "z", Net())


def test_unreadable_files_are_refused(tmp_path):
    layers, qc = _gptq_dir(tmp_path)
    write_checkpoint(tmp_path, layers, qc)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fxquant.load_gptq(tmp_path, Net())
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not a readable JSON file"):
        fxquant.load_gptq(tmp_path, Net())


@pytest.mark.parametrize("change,cfg,match", [
    (lambda L: L["fc1"].update(qzeros=L["fc1"]["qzeros"][:, :4].contiguous()), {},
     r"tensor 'fc1.qzeros': expected .* \(4, 8\)"),
    (lambda L: None, {"bits": 8}, r"bits=8 is not supported; valid: 4"),
    (lambda L: None, {"version": "gemv"}, r"version='gemv' is not supported; valid: 'gemm'"),
    (lambda L: None, {"zero_point": False}, r"zero_point=False is not supported"),
    (lambda L: L["fc2"].pop("scales"), {}, r"tensor 'fc2.scales': missing"),
    (lambda L: L["fc2"].update(g_idx=torch.zeros(64, dtype=torch.int32)), {}, r"'fc2.g_idx': not a tensor of the AWQ"),
])
def test_awq_refusals(tmp_path, change, cfg, match):
    layers = {"fc1": awq_tensors(64, 128, 32, 16), "fc2": awq_tensors(96, 64, 32, 17)}
    change(layers)
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm", **cfg}
    write_checkpoint(tmp_path, layers, qc)
    model = Net()
    with pytest.raises(ValueError, match=match):
        fxquant.load_awq(tmp_path, model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_writers_refuse_by_layer_before_writing(tmp_path):
    x = torch.randn(2, 128)
    cases = [
        ("nf4", fxquant.save_gptq, r"layer 'fc1' \(scheme nf4-64\): op linear_bnb4 has no integer zero point form"),
        ("uint4wo-32", fxquant.save_gptq, r"layer 'fc1' .*asymmetric intx stores a bf16 offset"),
        ("affine4-g32-fp32", fxquant.save_gptq, r"layer 'fc1': scale .* is not an fp16 number"),
        ("affine5-g32-fp16", fxquant.save_gptq, r"layer 'fc1': 5-bit codes"),
        ("affine8-g32-fp16", fxquant.save_awq, r"layer 'fc1': 8-bit codes; the AWQ GEMM layout stores 4"),
    ]
    for scheme, save, match in cases:
        model = Net()
        fxquant.quantize_(model, fxquant.Spec(default=scheme, skip=["head"]), (x,))
        with pytest.raises(ValueError, match=match):
            save(model, tmp_path / "out")
        assert not os.path.exists(tmp_path / "out")
    model = Net()
    fxquant.quantize_(model, fxquant.Spec(default="affine4-g32-fp16", skip=["head"]), (x,))
    model.fc1.zero_point[0, 0] = 0
    with pytest.raises(ValueError, match=r"layer 'fc1': zero point 0 has no checkpoint_format 'gptq' form"):
        fxquant.save_gptq(model, tmp_path / "out")
    fxquant.save_gptq(model, tmp_path / "out", checkpoint_format="gptq_v2")
    model = Net()
    fxquant.quantize_(model, fxquant.Spec(default="affine4-g32-fp16", rules={"fc2": "affine4-g16-fp16"},
                                          skip=["head"]), (x,))
    with pytest.raises(ValueError, match=r"one group_size for every layer"):
        fxquant.save_gptq(model, tmp_path / "mixed")
    with pytest.raises(ValueError, match="no packed layer"):
        fxquant.save_awq(Net(), tmp_path / "float")
    small = nn.Sequential(nn.Linear(40, 24))
    fxquant.quantize_(small, "affine4-g8-fp16", (torch.randn(1, 40),))
    with pytest.raises(ValueError, match=r"layer '0' \[24, 40\]: GPTQ readers allocate"):
        fxquant.save_gptq(small, tmp_path / "small")
