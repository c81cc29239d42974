"""``fxquant.save`` / ``fxquant.load``: one safetensors file, both forms, nothing unpickled.

Oracle: the model before saving (its outputs and every tensor, bit for bit, and its report).  Bad
files and mismatched skeletons: a clear ``ValueError`` and the skeleton as it was (its tensor objects,
values, module types and attributes compared before and after)."""
import hashlib
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import fxquant
from fxquant.models import LlamaConfig, TinyLlama, tiny_llama
from fxquant.modules import PackedWeight, QuantizedLinear
from fxquant.persist import packed_state_dict
from passes.test_match import Patterns

SIZE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
#: one layer per scheme family asked for in the issue; the rest (and the tied lm_head) stay float
SCHEMES = {"layers.0.self_attn.q_proj": "int8wo", "layers.0.self_attn.k_proj": "int4wo-64",
           "layers.0.self_attn.v_proj": "nf4-64+dq", "layers.0.self_attn.o_proj": "uint3wo-32",
           "layers.0.mlp.gate_proj": "llm.int8", "layers.0.mlp.up_proj": "float8dq-row",
           "layers.0.mlp.down_proj": "fp6_e3m2", "layers.1.self_attn.q_proj": "onebit"}
SHAPES = [(2, 16), (1, 1), (3, 5)]


def ids(shape=(2, 16), seed=0):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def skeleton(meta: bool, **overrides) -> TinyLlama:
    """The same architecture, untrained (real, with other values) or on the meta device."""
    with torch.device("meta" if meta else "cpu"):
        return TinyLlama(LlamaConfig(**{**SIZE, **overrides}))


def snapshot(model: nn.Module):
    """What a failed load must not change: every tensor object at every path, values (real ones),
    module types and the model's attributes."""
    slots = {}
    for mpath, m in model.named_modules(remove_duplicate=False):
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            slots[f"{mpath}.{name}"] = (id(t), None if t is None or t.is_meta else t.detach().clone())
    return slots, [(n, type(m)) for n, m in model.named_modules()], set(vars(model))


def assert_unchanged(before, model):
    after = snapshot(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert {k: v[0] for k, v in before[0].items()} == {k: v[0] for k, v in after[0].items()}
    assert all(v is None or torch.equal(v, after[0][k][1]) for k, (_, v) in before[0].items())


def assert_same_tensors(a: nn.Module, b: nn.Module):
    sa, sb = packed_state_dict(a), packed_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def no_pickle(monkeypatch):
    """Within ``with no_pickle():`` anything that unpickles raises."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        def refuse(*a, **k):
            raise AssertionError("fxquant.load unpickled something")
        with monkeypatch.context() as mp:
            for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                                (torch.serialization, "load"), (torch._C, "_pickle_load_obj")]:
                mp.setattr(owner, name, refuse)
            yield
    return guard


# ---- a compiled module ----------------------------------------------------------------------------------------
def test_compiled_module_round_trip(tmp_path, no_pickle):
    torch._dynamo.reset()
    spec = fxquant.Spec(default="int4wo-64", skip=["lm_head"], rules={"re:.*layers\\.0\\.mlp\\..*": "nf4-64+dq",
                                                                      "layers.1.self_attn.q_proj": "float8dq-row"})
    qm = fxquant.compile(tiny_llama(seed=0, **SIZE), spec, (ids(),))
    path = tmp_path / "q.safetensors"
    fxquant.save(qm, path)
    with no_pickle():
        lm = fxquant.load(path)
    sd, sd2 = qm.state_dict(), lm.state_dict()
    assert sd.keys() == sd2.keys() and all(sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]) for k in sd)
    assert fxquant.report(lm).to_dict() == fxquant.report(qm).to_dict()
    assert fxquant.Spec.from_dict(fxquant.report(lm).spec) == spec  # the spec travels with the report
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            assert torch.equal(lm(ids(shape, i)), qm(ids(shape, i))), shape
        cm = torch.compile(lm, fullgraph=True)
        torch.testing.assert_close(cm(ids((3, 7), 9)), qm(ids((3, 7), 9)), rtol=2e-2, atol=2e-2)
    fxquant.save(lm, tmp_path / "again.safetensors")  # a loaded module saves again, to the same tensors
    with torch.no_grad():
        assert torch.equal(fxquant.load(tmp_path / "again.safetensors")(ids()), qm(ids()))
    with pytest.raises(ValueError, match="holds a compiled module .* needs no model"):
        fxquant.load(path, model=skeleton(True))


def test_pt2_archive_is_opt_in(tmp_path, no_pickle):
    qm = fxquant.compile(tiny_llama(seed=0, **SIZE), "int8wo", (ids(),))
    with pytest.raises(ValueError, match="ends in .pt2 but format='safetensors'"):
        fxquant.save(qm, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()
    fxquant.save(qm, tmp_path / "m.pt2", format="pt2")
    with pytest.raises(ValueError, match="zip archive .* unpickles .* format='pt2'"):
        fxquant.load(tmp_path / "m.pt2")
    with no_pickle(), pytest.raises(AssertionError, match="unpickled"):  # the guard the other tests rely on
        fxquant.load(tmp_path / "m.pt2", format="pt2")
    lm = fxquant.load(tmp_path / "m.pt2", format="pt2")
    assert torch.equal(lm(ids()), qm(ids()))
    with pytest.raises(ValueError, match="format='pt2' is for modules fxquant.compile returned"):
        fxquant.save(fxquant.quantize_(tiny_llama(seed=0, **SIZE), "int8wo", (ids(),)), tmp_path / "x", format="pt2")


# ---- a model quantized in place ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def every_scheme():
    """A tiny Llama with one layer per scheme family, its lm_head tied to the embedding and kept float."""
    model = tiny_llama(seed=0, **SIZE)
    fxquant.quantize_(model, fxquant.Spec(rules=SCHEMES), (ids(),))
    assert {r.scheme for r in fxquant.report(model).quantized} == set(SCHEMES.values())
    return model


@pytest.mark.parametrize("meta", [True, False], ids=["meta", "float"])
def test_quantized_model_round_trip(every_scheme, tmp_path, meta, no_pickle):
    model = every_scheme
    path = tmp_path / "m.safetensors"
    fxquant.save(model, path)
    sk = skeleton(meta)
    with no_pickle():
        out = fxquant.load(path, model=sk)
    assert out is sk
    assert_same_tensors(sk, model)
    assert fxquant.report(sk).to_dict() == fxquant.report(model).to_dict()
    assert fxquant.report(sk).spec["version"] == 2 and fxquant.Spec.from_dict(fxquant.report(sk).spec).rules
    assert [(n, type(m)) for n, m in sk.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    assert sk.lm_head.weight is sk.model.embed_tokens.weight  # the tie, one Parameter again
    with safe_open(path, "pt") as f:  # ... stored once
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            assert torch.equal(sk(ids(shape, i)), model(ids(shape, i))), shape
    fxquant.save(sk, tmp_path / "again.safetensors")  # a loaded model saves again, to the same tensors
    again = fxquant.load(tmp_path / "again.safetensors", model=skeleton(True))
    assert_same_tensors(again, model)


class Tied(nn.Module):
    """A parameter read by F.embedding and by F.linear: packed, with its float tensor kept."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(100, 64) / 8)

    def forward(self, ids):
        return F.linear(F.embedding(ids, self.w), self.w)


@pytest.mark.parametrize("make, example, scheme", [
    (Patterns, lambda: torch.randn(2, 5, 32), "int4wo-32"),
    (Tied, lambda: torch.randint(0, 100, (2, 7)), "int8wo"),
], ids=["packed-weight-sites", "functional-tie"])
def test_packed_weight_sites_round_trip(tmp_path, make, example, scheme):
    torch.manual_seed(0)
    x = example()
    model = fxquant.quantize_(make(), scheme, (x,))
    assert any(isinstance(p, PackedWeight) for p in model.parameters())
    fxquant.save(model, tmp_path / "p.safetensors")
    with torch.device("meta"):
        sk = make()
    fxquant.load(tmp_path / "p.safetensors", model=sk)
    assert_same_tensors(sk, model)
    for (n, p), (_, q) in zip(model.named_parameters(), sk.named_parameters()):
        assert type(p) is type(q) and isinstance(q, nn.Parameter), n
        if isinstance(p, PackedWeight):
            assert (q.transposed, q.dtype, q.shape, q.float_data is None) == (
                p.transposed, p.dtype, p.shape, p.float_data is None), n
    with torch.no_grad():
        assert torch.equal(sk(x), model(x))


def test_awq_input_scale_and_folds_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 512, (2, 24), generator=g) for _ in range(2)]
    model = fxquant.quantize_(tiny_llama(seed=0, **SIZE), fxquant.Spec(default="int4wo-32@awq", skip=["lm_head"]),
                              (ids(),), calibration=calib)
    assert any(m.input_scale is not None for m in model.modules() if isinstance(m, QuantizedLinear))
    fxquant.save(model, tmp_path / "awq.safetensors")
    sk = fxquant.load(tmp_path / "awq.safetensors", model=skeleton(True))
    assert_same_tensors(sk, model)  # folded norms and input scales included
    assert fxquant.report(sk).to_dict() == fxquant.report(model).to_dict()
    with torch.no_grad():
        assert torch.equal(sk(ids()), model(ids()))


# ---- bad files, wrong skeletons -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = fxquant.quantize_(tiny_llama(seed=0, **SIZE), fxquant.Spec(default="int4wo-64", skip=["lm_head"]),
                              (ids(),))
    path = tmp_path_factory.mktemp("saved") / "m.safetensors"
    fxquant.save(model, path)
    return path


def rewrite(src, dst, edit):
    """Re-save ``src`` as another writer could: ``edit(doc, tensors)`` changes them in place, and the
    document's checksum is recomputed (so the document is consistent; only its content is wrong)."""
    with safe_open(src, "pt") as f:
        doc = json.loads(f.metadata()["fxquant"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(doc, tensors)
    text = json.dumps(doc)
    save_file(tensors, dst, metadata={"fxquant": text, "fxquant_sha256": hashlib.sha256(text.encode()).hexdigest()})
    return dst


def _sha(t):
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def drop_norm(doc, tensors):
    del tensors["model.norm.weight"], doc["tensors"]["model.norm.weight"]
    doc["objects"] = [o for o in doc["objects"] if o.get("tensor") != "model.norm.weight"]


def shrink_norm(doc, tensors):
    tensors["model.norm.weight"] = t = tensors["model.norm.weight"][:128].clone()
    doc["tensors"]["model.norm.weight"].update(shape=[128], sha256=_sha(t))


def flip(at):
    def corrupt(data: bytearray) -> bytearray:
        i = at(data)
        data[i] ^= 0xFF
        return data
    return corrupt


def header_end(data):
    return 8 + int.from_bytes(data[:8], "little")


BAD_FILES = {
    "truncated": (lambda d: d[: len(d) // 2], "truncated"),
    "header-bytes-flipped": (flip(lambda d: 12), "not valid JSON"),
    "document-changed": (lambda d: d.replace(b'int4wo-64', b'int4wo-32'), "does not match its checksum"),
    "data-bytes-flipped": (flip(lambda d: len(d) - 3), "do not match their checksum"),
    "length-too-big": (lambda d: (10**9).to_bytes(8, "little") + d[8:], "claims 1000000000 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("meta", [True, False], ids=["meta", "float"])
def test_corrupt_file_is_refused_and_skeleton_unchanged(saved, tmp_path, case, meta):
    corrupt, message = BAD_FILES[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(corrupt(bytearray(saved.read_bytes()))))
    sk = skeleton(meta)
    before = snapshot(sk)
    with pytest.raises(ValueError, match=message):
        fxquant.load(bad, model=sk)
    assert_unchanged(before, sk)


EDITS = {
    "tensor-missing": (drop_norm, r"'model.norm.weight': in the model, not in the file|in the model, not in the file: "
                                  r"'model.norm.weight'"),
    "shape-changed": (shrink_norm, r"'model.norm.weight': float32 \[128\] in the file, float32 \[256\] in the model"),
    "version-bumped": (lambda doc, t: doc.update(version=2), "format version 2; this fxquant reads version 1"),
    "header-disagrees": (lambda doc, t: doc["tensors"]["model.norm.weight"].update(shape=[2, 128]),
                         r"tensor 'model.norm.weight' is F32 \[256\] in the file, float32 \[2, 128\] in the document"),
    "kind-unknown": (lambda doc, t: doc.update(kind="weights"), "unknown kind 'weights'"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_inconsistent_file_is_refused_and_skeleton_unchanged(saved, tmp_path, case):
    edit, message = EDITS[case]
    bad = rewrite(saved, tmp_path / "bad.safetensors", edit)
    sk = skeleton(False)
    before = snapshot(sk)
    with pytest.raises(ValueError, match=message):
        fxquant.load(bad, model=sk)
    assert_unchanged(before, sk)


def with_extra_buffer(meta: bool) -> TinyLlama:
    sk = skeleton(meta)
    sk.model.norm.register_buffer("extra", torch.zeros(3, device="meta" if meta else "cpu"))
    return sk


@pytest.mark.parametrize("make, message", [
    (lambda meta: skeleton(meta, num_layers=1),
     r"layer 'model.layers.1.self_attn.q_proj': the model has no such module"),
    (lambda meta: skeleton(meta, hidden_size=128, num_heads=2, num_kv_heads=1),
     r"shape \[256, 256\] in the file, \[128, 128\] in the model"),
    (lambda meta: skeleton(meta, intermediate_size=384), r"shape \[512, 256\] in the file, \[384, 256\] in the model"),
    (with_extra_buffer, r"in the model, not in the file: 'model.norm.extra'"),
], ids=["layer-missing", "hidden-size", "intermediate-size", "extra-buffer"])
@pytest.mark.parametrize("meta", [True, False], ids=["meta", "float"])
def test_other_architecture_is_refused_and_unchanged(saved, make, message, meta):
    sk = make(meta)
    before = snapshot(sk)
    with pytest.raises(ValueError, match=message):
        fxquant.load(saved, model=sk)
    assert_unchanged(before, sk)


def test_file_ties_win_over_the_skeleton(saved):
    """An untied skeleton of a tied model loads tied: the file says which paths hold one tensor."""
    sk = fxquant.load(saved, model=skeleton(True, tie_embeddings=False))
    assert sk.lm_head.weight is sk.model.embed_tokens.weight


def test_skeleton_in_another_dtype_is_refused(saved):
    sk = skeleton(True).to(torch.bfloat16)
    before = snapshot(sk)
    with pytest.raises(ValueError, match=r"'model.norm.weight': float32 \[256\] in the file, bfloat16 \[256\] in the "
                                         "model"):
        fxquant.load(saved, model=sk)
    assert_unchanged(before, sk)


def test_wrong_calls_and_foreign_files(saved, tmp_path):
    with pytest.raises(ValueError, match=r"pass the float architecture as model=.*torch.device\('meta'\)"):
        fxquant.load(saved)
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, plain, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not a file fxquant.save wrote .* keys: \['format'\]"):
        fxquant.load(plain, model=skeleton(True))
    with pytest.raises(FileNotFoundError):
        fxquant.load(tmp_path / "absent.safetensors")
    loaded = fxquant.load(saved, model=skeleton(True))
    before = snapshot(loaded)
    with pytest.raises(ValueError, match="already quantized"):
        fxquant.load(saved, model=loaded)
    assert_unchanged(before, loaded)
    with pytest.raises(ValueError, match="fxquant.save expects the module fxquant.compile returned"):
        fxquant.save(tiny_llama(seed=0, **SIZE), tmp_path / "float.safetensors")


def test_failed_save_leaves_the_file(saved, tmp_path):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(saved.read_bytes())
    model = fxquant.load(saved, model=skeleton(True))
    model.model.norm.weight = nn.Parameter(torch.empty(256, device="meta"))
    with pytest.raises(ValueError, match="'model.norm.weight' is on the meta device"):
        fxquant.save(model, path)
    assert path.read_bytes() == saved.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


# ---- a graph file cannot run code ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    qm = fxquant.compile(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)), "int8wo", (torch.randn(2, 32),))
    path = tmp_path_factory.mktemp("graph") / "g.safetensors"
    fxquant.save(qm, path)
    return path


def _nodes(doc):
    return doc["program"]["graph_module"]["graph"]["nodes"]


def _payload(marker):
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _sym_expr(doc, text):
    vals = doc["program"]["graph_module"]["graph"]["sym_int_values"]
    vals["sym_evil"] = {"as_expr": {"expr_str": text, "hint": {"as_int": 2}}}


ATTACKS = {
    "guard": (lambda doc, m: doc["program"]["guards_code"].append(_payload(m)), "guard .* is not of the allowed form"),
    "shape-expression": (lambda doc, m: _sym_expr(doc, _payload(m)), "shape expression .* is not allowed"),
    "sympy-string": (lambda doc, m: _sym_expr(doc, f"Max({_payload(m)!r}, 1)"), "shape expression .* is not allowed"),
    "node-target": (lambda doc, m: _nodes(doc)[0].update(target="torch.load"), "node target 'torch.load'"),
    "node-name": (lambda doc, m: _nodes(doc)[0].update(name=f"x; {_payload(m)}"), "name .* is not allowed"),
    "enum-import": (lambda doc, m: doc["program"]["graph_module"]["module_call_graph"][0]["signature"].update(
        in_spec=json.dumps([1, {"type": "builtins.dict", "context": json.dumps(
            [{"__enum__": True, "fqn": "antigravity:x", "name": "y"}]), "children_spec": []}])), "names an enum"),
    "parameter-path": (lambda doc, m: doc["program"]["graph_module"]["signature"]["input_specs"][0]["parameter"].update(
        parameter_name="__class__"), "attribute path '__class__' is not allowed"),
}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_graph_file_strings_never_run(graph_file, tmp_path, case, no_pickle):
    edit, message = ATTACKS[case]
    marker = tmp_path / "ran"
    bad = rewrite(graph_file, tmp_path / "bad.safetensors", lambda doc, t: edit(doc, marker))
    with no_pickle(), pytest.raises(ValueError, match=message):
        fxquant.load(bad)
    assert not marker.exists()


# ---- a Hugging Face model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM, cfg


def test_hf_model_both_forms(hf_llama, tmp_path):
    """quantize_: loads into a meta skeleton (its non-persistent rotary buffers come from the file) and
    generates the same tokens; compile: keyword example inputs and a ModelOutput round trip."""
    cls, cfg = hf_llama
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    spec = fxquant.Spec(default="int4wo-32", skip=["lm_head"])
    model = fxquant.quantize_(cls(cfg).eval(), spec, example_kwargs=dict(input_ids=x))
    fxquant.save(model, tmp_path / "hf.safetensors")
    with torch.device("meta"):
        sk = cls(cfg).eval()
    fxquant.load(tmp_path / "hf.safetensors", model=sk)
    assert_same_tensors(sk, model)
    with torch.no_grad():
        assert torch.equal(sk(x).logits, model(x).logits)
        assert torch.equal(sk.generate(x, max_new_tokens=4, do_sample=False),
                           model.generate(x, max_new_tokens=4, do_sample=False))
    kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    qm = fxquant.compile(cls(cfg).eval(), spec, example_kwargs=kwargs)
    fxquant.save(qm, tmp_path / "hfg.safetensors")
    lm = fxquant.load(tmp_path / "hfg.safetensors")
    y = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        call = dict(input_ids=y, attention_mask=torch.ones_like(y), use_cache=False)
        assert torch.equal(lm(**call).logits, qm(**call).logits)
