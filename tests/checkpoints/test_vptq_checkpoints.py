"""VPTQ checkpoints: synthetic ``VQuantLinear`` layers built here from known indices and codebooks as the VPTQ
library lays them out (``VQuantLinear.__init__`` shapes, ``pack_index``'s bit streams, uint16 values in int16
tensors), loaded packed into a float or meta skeleton; the oracle is a plain re-implementation of VPTQ's
``dequant`` (loops, no fxquant code).  Written back bit for bit; corrupt and unsupported checkpoints refused
naming the tensor or field, the model unchanged."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxquant
from fxquant.checkpoints.vptq import load_vptq, save_vptq
from fxquant.modules import QuantizedLinear

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
#: per projection: the VPTQ layer config (the main-codebook sizes vary so every part of the layout is exercised)
KINDS = {
    "self_attn.q_proj": dict(v=8, C=64, Cr=16, o=8, vo=4, Co=16, G=1, norm=True, perm=True),
    "self_attn.k_proj": dict(v=4, C=32, Cr=-1, o=0, vo=-1, Co=-1, G=2, norm=False, perm=True),
    "self_attn.v_proj": dict(v=6, C=16, Cr=8, o=0, vo=-1, Co=-1, G=1, norm=True, perm=False),
    "self_attn.o_proj": dict(v=8, C=256, Cr=256, o=0, vo=-1, Co=-1, G=1, norm=True, perm=True),
    "mlp.gate_proj": dict(v=4, C=16, Cr=-1, o=4, vo=2, Co=8, G=3, norm=False, perm=False),
    "mlp.up_proj": dict(v=8, C=65536, Cr=-1, o=0, vo=-1, Co=-1, G=1, norm=True, perm=True),
    "mlp.down_proj": dict(v=4, C=128, Cr=64, o=0, vo=-1, Co=-1, G=1, norm=True, perm=True),
}


# ---- VPTQ's layout, written out plainly ----------------------------------------------------------------------
def int16_bits(values: torch.Tensor) -> torch.Tensor:
    """uint16 values as the int16 tensor VPTQ stores (``.to(torch.uint16).view(torch.int16)``)."""
    return torch.tensor([x - 65536 if x >= 32768 else x for x in values.flatten().tolist()],
                        dtype=torch.int16).reshape(values.shape)


def pack_row(merged: list[int], bits: int) -> list[int]:
    """``pack_index`` of one row: bit t of element c at stream bit c*bits + t, 32 bits per little-endian word."""
    stream = sum(m << (c * bits) for c, m in enumerate(merged))
    words = []
    for w in range(-(-len(merged) * bits // 32)):
        u = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(u - (1 << 32) if u >= 1 << 31 else u)
    return words


def vptq_layer(n: int, k: int, spec: dict, dtype, bias: bool, seed: int, indices_as_float: bool = False):
    """``(tensors by their VQuantLinear names, layer config dict, plain fields for the oracle)``."""
    g = torch.Generator().manual_seed(seed)
    v, c, cr, o, vo, co, groups = (spec[x] for x in ("v", "C", "Cr", "o", "vo", "Co", "G"))
    gs = (k - o) // groups
    rows = -(-n // v)
    ib, rb = int(math.log2(c)), int(math.log2(cr)) if cr > 0 else 0
    idx = torch.randint(0, c, (groups, rows, gs), generator=g)
    res = torch.randint(0, cr, (groups, rows, gs), generator=g) if cr > 0 else torch.zeros_like(idx)
    packed = [[pack_row([(int(r) << ib) | int(i) for i, r in zip(idx[a, b], res[a, b])], ib + rb)
               for b in range(rows)] for a in range(groups)]
    t = {"indices": torch.tensor(packed, dtype=torch.int32),
         "centroids.weight": (torch.randn(groups, c * v, generator=g) / 8).to(dtype)}
    plain = {"idx": idx, "res": res if cr > 0 else None, "gs": gs}
    if cr > 0:
        t["res_centroids.weight"] = (torch.randn(groups, cr * v, generator=g) / 32).to(dtype)
    if o:
        oidx = torch.randint(0, co, (1, -(-n // vo), o), generator=g)
        t["outlier_indices"] = int16_bits(oidx)
        if indices_as_float:
            t["outlier_indices"] = t["outlier_indices"].view(torch.float16)
        t["outlier_centroids.weight"] = (torch.randn(1, co * vo, generator=g) / 2).to(dtype)
        plain["oidx"] = oidx
    if spec["perm"]:
        plain["perm"] = torch.randperm(k, generator=g)
        t["perm"] = int16_bits(plain["perm"])
    if spec["norm"]:
        t["weight_scale"] = (torch.rand(k, generator=g) + 0.5).to(dtype)
        t["weight_bias"] = (torch.randn(k, generator=g) / 50).to(dtype)
    if bias:
        t["bias"] = torch.randn(n, generator=g).to(dtype)
    cfg = {"in_features": k, "out_features": n, "vector_lens": [vo, v], "num_centroids": [co, c],
           "num_res_centroids": [-1, cr], "group_num": groups, "group_size": gs, "outlier_size": o,
           "enable_norm": spec["norm"], "enable_perm": spec["perm"], "is_indice_packed": True,
           "indices_as_float": indices_as_float, "bias": bias}
    return t, cfg, plain


def oracle_weight(t: dict, cfg: dict, plain: dict) -> torch.Tensor:
    """VPTQ's ``dequant`` in fp32: codebook vector rows, residual added, padding rows dropped, outliers first,
    ``Wp[:, argsort(perm)]``, then ``* weight_scale + weight_bias``."""
    n, k = cfg["out_features"], cfg["in_features"]
    vo, v = cfg["vector_lens"]
    groups, gs, o = cfg["group_num"], plain["gs"], cfg["outlier_size"]
    cent = t["centroids.weight"].float().reshape(groups, -1, v)
    res = t["res_centroids.weight"].float().reshape(groups, -1, v) if plain["res"] is not None else None
    rows = plain["idx"].shape[1]
    main = torch.zeros(rows * v, groups * gs)
    for a in range(groups):
        for r in range(rows):
            for col in range(gs):
                vec = cent[a, plain["idx"][a, r, col]]
                if res is not None:
                    vec = vec + res[a, plain["res"][a, r, col]]
                main[r * v:(r + 1) * v, a * gs + col] = vec
    w = main[:n]
    if o:
        oc = t["outlier_centroids.weight"].float().reshape(-1, vo)
        out = torch.zeros(plain["oidx"].shape[1] * vo, o)
        for r in range(plain["oidx"].shape[1]):
            for col in range(o):
                out[r * vo:(r + 1) * vo, col] = oc[plain["oidx"][0, r, col]]
        w = torch.cat([out[:n], w], 1)
    if "perm" in plain:
        w = w[:, torch.argsort(plain["perm"])]
    if cfg["enable_norm"]:
        w = w * t["weight_scale"].float() + t["weight_bias"].float()
    return w


def make_checkpoint(directory, dtype=torch.float32, shared=False, indices_as_float=False):
    """A tiny Llama with every projection a VPTQ layer: the checkpoint directory, the float model whose
    projections hold the oracle weights, and the per-layer pieces."""
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    state = {k: v for k, v in ref.state_dict().items()}
    layers, pieces = {}, {}
    for i in range(CFG["num_hidden_layers"]):
        for j, (kind, spec) in enumerate(KINDS.items()):
            path = f"model.layers.{i}.{kind}"
            lin = ref.get_submodule(path)
            n, k = lin.weight.shape
            t, cfg, plain = vptq_layer(n, k, spec, dtype, lin.bias is not None, seed=10 * i + j,
                                       indices_as_float=indices_as_float)
            del state[f"{path}.weight"]
            state.update({f"{path}.{name}": x for name, x in t.items()})
            layers[path] = cfg
            pieces[path] = (t, cfg, plain)
            with torch.no_grad():
                lin.weight.copy_(oracle_weight(t, cfg, plain))
    state.pop("lm_head.weight", None)  # tied: stored once, as transformers does
    qc = {"quant_method": "vptq", "enable_proxy_error": False, "config_for_layers": layers,
          "shared_layer_config": {}, "modules_to_not_convert": None}
    if shared:  # the q_proj / o_proj configs keyed by the last name component instead
        for i in range(CFG["num_hidden_layers"]):
            for kind in ("self_attn.q_proj", "self_attn.o_proj"):
                qc["shared_layer_config"][kind.rsplit(".", 1)[1]] = layers.pop(f"model.layers.{i}.{kind}")
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**ref.config.to_dict(), "quantization_config": qc}, f, default=str)
    return ref, pieces


def skeleton(meta: bool = True):
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(**CFG)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vptq")
    ref, pieces = make_checkpoint(d)
    return d, ref, pieces


# ---- loading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", [True, False])
def test_load_packed_weights_are_the_published_dequantization(ckpt, meta, fp32_dense):
    d, ref, pieces = ckpt
    model = load_vptq(d, skeleton(meta))
    for path, (t, cfg, plain) in pieces.items():
        m = model.get_submodule(path)
        assert isinstance(m, QuantizedLinear) and m.op_name == "linear_vptq"
        assert torch.equal(m.dequantize(), oracle_weight(t, cfg, plain)), path
        assert torch.equal(m.indices, t["indices"])  # the stored stream itself, not a repacking
    ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    got, want = _logits(model, ids), _logits(ref, ids)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_report_and_scheme_strings(ckpt):
    d, _, pieces = ckpt
    model = load_vptq(d, skeleton())
    rep = fxquant.report(model)
    rows = {r.fqn: r for r in rep.quantized}
    assert set(rows) == set(pieces)
    assert rows["model.layers.0.self_attn.q_proj"].scheme == "vptq-v8-c64-r16-o8-ov4-oc16-norm-perm-fp32"
    assert rows["model.layers.0.mlp.up_proj"].scheme == "vptq-v8-c65536-norm-perm-fp32"
    assert rows["model.layers.1.mlp.gate_proj"].rule == "config_for_layers['model.layers.1.mlp.gate_proj']"
    assert all(r.bytes_after == sum(b.numel() * b.element_size() for b in
                                    model.get_submodule(r.fqn).packed().tensors.values()) for r in rows.values())
    assert rep.row("lm_head").status == "skipped"


def test_shared_layer_config_and_half_codebooks(tmp_path, fp32_dense):
    ref, pieces = make_checkpoint(tmp_path, dtype=torch.float16, shared=True, indices_as_float=True)
    model = load_vptq(tmp_path, skeleton())
    rows = {r.fqn: r for r in fxquant.report(model).quantized}
    assert rows["model.layers.1.self_attn.o_proj"].rule == "shared_layer_config['o_proj']"
    assert rows["model.layers.1.self_attn.o_proj"].scheme.endswith("-fp16")
    for path, (t, cfg, plain) in pieces.items():
        assert torch.equal(model.get_submodule(path).dequantize(), oracle_weight(t, cfg, plain)), path
    ids = torch.randint(0, CFG["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    model.float()  # the float tensors (embeddings, norms) were stored in fp16
    ref16 = ref.half().float()
    assert ((_logits(model, ids) - _logits(ref16, ids)).norm() / _logits(ref16, ids).norm()).item() < 1e-3


def test_save_writes_the_layout_back_bit_for_bit(ckpt, tmp_path):
    d, ref, pieces = ckpt
    model = load_vptq(d, skeleton())
    save_vptq(model, tmp_path / "out")
    theirs, ours = load_file(os.path.join(d, "model.safetensors")), load_file(tmp_path / "out" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    original = json.loads((d / "config.json").read_text())["quantization_config"]["config_for_layers"]
    for path, cfg in qc["config_for_layers"].items():
        want = {f: v for f, v in original[path].items() if f not in ("bias",)}
        assert {f: v for f, v in cfg.items() if f in want} == want, path
    again = load_vptq(tmp_path / "out", skeleton())
    ids = torch.randint(0, CFG["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_quantize_save_load_round_trip(tmp_path):
    """A model fxquant quantized with a vptq scheme writes a VPTQ checkpoint that loads back to the same bytes."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    ids = torch.randint(0, CFG["vocab_size"], (1, 6))
    spec = fxquant.Spec(default="vptq-v4-c16-r4-norm-perm", skip=["lm_head"])
    q = fxquant.quantize_(model, spec, (), {"input_ids": ids, "use_cache": False})
    save_vptq(q, tmp_path)
    back = load_vptq(tmp_path, skeleton())
    for name, m in q.named_modules():
        if isinstance(m, QuantizedLinear):
            b = back.get_submodule(name)
            assert all(torch.equal(getattr(m, t), getattr(b, t)) for t in m.tensor_names), name
    assert torch.equal(_logits(back, ids), _logits(q, ids))


def test_state_dict_with_config_argument(ckpt):
    d, _, pieces = ckpt
    state = load_file(os.path.join(d, "model.safetensors"))
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    model = load_vptq(state, skeleton(), config=qc)
    assert len(fxquant.report(model).quantized) == len(pieces)


# ---- refusals -----------------------------------------------------------------------------------------------
def _edit(d, tmp_path, tensors=None, config=None):
    """A copy of checkpoint ``d`` with ``tensors(state)`` / ``config(quantization_config)`` applied."""
    state = load_file(os.path.join(d, "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    if tensors:
        tensors(state)
    if config:
        config(cfg["quantization_config"])
    out = tmp_path / "edited"
    out.mkdir()
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"


def _set(key, value):
    def f(s):
        s[key] = value(s[key]) if callable(value) else value
    return f


def _dup_perm(s):
    p = s[f"{Q}.perm"].clone()
    p[1] = p[0]
    s[f"{Q}.perm"] = p


@pytest.mark.parametrize("tensors,config,match", [
    (lambda s: s.pop(f"{Q}.indices"), None, rf"tensor '{Q}.indices': missing"),
    (lambda s: s.__setitem__(f"{Q}.codes", torch.zeros(3)), None, rf"tensor '{Q}.codes': not a tensor of a VPTQ layer"),
    (lambda s: s.__setitem__(f"{Q}.weight", torch.zeros(64, 64)), None, rf"tensor '{Q}.weight': not a tensor of a VPTQ"),
    (lambda s: s.__setitem__(f"{Q}.res_indices", torch.zeros(1, 8, 56, dtype=torch.int16)), None,
     rf"tensor '{Q}.res_indices': unpacked residual indices"),
    (_set(f"{Q}.indices", lambda t: t.to(torch.int64)), None, r"indices must be one of torch.int32"),
    (_set(f"{Q}.centroids.weight", lambda t: t[:, :-8]), None, r"centroids must be one of .* of shape \(1, 512\)"),
    (_set(f"{Q}.centroids.weight", lambda t: t.to(torch.int32)), None, rf"'{Q}.centroids.weight': dtype torch.int32"),
    (_dup_perm, None, rf"tensor '{Q}.perm': not a permutation of 0 .. 63"),
    (_set(f"{Q}.outlier_indices", lambda t: torch.full_like(t, 16)), None,
     rf"tensor '{Q}.outlier_indices': values must be in 0 .. 15, got 16 .. 16"),
    (_set(f"{Q}.perm", lambda t: t.float()), None, rf"tensor '{Q}.perm': dtype torch.float32 is not supported"),
    (lambda s: s.pop("model.norm.weight"), None, r"tensor 'model.norm.weight': missing from the checkpoint"),
    (None, lambda q: q["config_for_layers"][Q].update(is_indice_packed=False), r"is_indice_packed: False is not"),
    (None, lambda q: q["config_for_layers"][Q].update(norm_dim=1), r"norm_dim: 1 is not supported"),
    (None, lambda q: q["config_for_layers"][Q].update(group_size=40), r"group_size: outlier_size 8 \+ group_num 1"),
    (None, lambda q: q["config_for_layers"][UP].update(num_centroids=[-1, 32768]),
     r"layer '.*up_proj' .*: indices must be one of torch.int32 of shape \(1, 12, 30\)"),
    (None, lambda q: q.update(quant_method="aqlm"), r"quantization_config.quant_method='aqlm'; valid: 'vptq'"),
    (None, lambda q: q.update(bits=2), r"quantization_config.bits: no version of VptqConfig has this field"),
    (None, lambda q: q.update(config_for_layers={}), r"no linear of the model is named"),
    (None, lambda q: q["config_for_layers"].pop(Q), r"tensor '" + Q + r".weight': missing from the checkpoint"),
], ids=["missing", "unknown", "float_weight", "res_indices", "indices_dtype", "centroids_shape", "centroids_dtype",
        "perm_dup", "outlier_range", "perm_dtype", "float_missing", "unpacked", "norm_dim", "group_size",
        "codebook_size", "quant_method", "unknown_field", "no_layer", "unnamed_layer"])
def test_refusals_name_the_tensor_and_leave_the_model(ckpt, tmp_path, tensors, config, match):
    d, _, _ = ckpt
    src = _edit(d, tmp_path, tensors, config)
    model = skeleton(meta=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_vptq(src, model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_unreadable_files(tmp_path, ckpt):
    d, _, _ = ckpt
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_vptq(tmp_path, skeleton())
    with pytest.raises(ValueError, match="no such file"):
        load_vptq(tmp_path / "nowhere", skeleton())


def test_save_refuses_other_packed_layers(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16))
    q = fxquant.quantize_(model, "int8wo", (torch.randn(2, 32),))
    with pytest.raises(ValueError, match=r"layer '0' \(scheme int8wo\): not a VPTQ layer"):
        save_vptq(q, tmp_path / "x")
    assert not (tmp_path / "x").exists()
