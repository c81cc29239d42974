"""End to end: fxquant.compile on a Llama-style model with tied embeddings."""
import copy

import pytest
import torch
from torch import nn

import fxquant
from helpers import rel
from fxquant import frontend

ISSUE_SPEC = fxquant.Spec(default="int4wo-128", skip=["lm_head", "re:.*router.*"],
                          rules={r"re:layers\.0\..*": "int8wo", "layers.*.mlp.down_proj": None})


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}, \
        {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}, \
        [type(m) for m in model.modules()]


@pytest.mark.parametrize("fe", ["export", "fx"])
def test_issue_spec_end_to_end(tiny_llama_model, ids, fe):
    m = tiny_llama_model
    before = snapshot(m)
    qm = fxquant.compile(m, ISSUE_SPEC, example_inputs=(ids,), frontend=fe)
    rep = fxquant.report(qm)
    rows = {r.fqn: r for r in rep.rows}
    assert len(rows) == 15 and rep.frontend == fe
    assert rows["lm_head"].status == "skipped" and rows["lm_head"].rule == "skip['lm_head']"
    assert rows["model.layers.0.self_attn.q_proj"].scheme == "int8wo"
    assert rows["model.layers.0.mlp.down_proj"].scheme == "int8wo"  # the layers.0 rule comes first
    assert rows["model.layers.1.mlp.down_proj"].status == "skipped"
    assert rows["model.layers.1.mlp.up_proj"].scheme == "int4wo-128"
    for r in rep.quantized:
        assert r.bytes_after < r.bytes_before and 0 < r.rel_error < 0.12
    assert "skip['re:.*router.*'] matched no linear layer" in " ".join(rep.notes)
    assert "TOTAL (13/15 quantized)" in str(rep)
    # runs, on the example and on other batch sizes / sequence lengths (including one token)
    for shape in [(2, 16), (1, 1), (3, 7), (1, 33)]:
        x = torch.randint(0, 512, shape)
        y = qm(x)
        assert y.shape == (*shape, 512)
        assert rel(y, m(x)) < 0.25
    # the user's model is untouched: same tensors, same values, same module types
    after = snapshot(m)
    assert after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_int8wo_output_close_to_float(tiny_llama_model, ids):
    qm = fxquant.compile(tiny_llama_model, "int8wo", (ids,))
    assert rel(qm(ids), tiny_llama_model(ids)) < 0.03
    assert all(r.status == "quantized" for r in fxquant.report(qm).rows)


def test_tied_lm_head_keeps_float_embedding(tiny_llama_model, ids):
    qm = fxquant.compile(tiny_llama_model, "int8wo", (ids,))
    row = fxquant.report(qm).row("lm_head")
    assert row.status == "quantized" and "float weight kept" in row.reason


def test_torch_compile_fullgraph_matches_eager(tiny_llama_model, ids):
    torch._dynamo.reset()
    qm = fxquant.compile(tiny_llama_model, fxquant.Spec(default="int4wo-64", rules={"re:.*self_attn.*": "int8wo"}),
                         (ids,))
    cm = torch.compile(qm, fullgraph=True)
    for shape in [(2, 16), (1, 9)]:
        x = torch.randint(0, 512, shape)
        torch.testing.assert_close(cm(x), qm(x), rtol=2e-2, atol=2e-2)


def test_example_kwargs_and_memory():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 128)
            self.b = nn.Linear(128, 64)

        def forward(self, x, *, scale: float = 1.0, mask=None):
            h = self.b(torch.relu(self.a(x))) * scale
            return h if mask is None else h * mask[..., None]

    m = KW()
    x, mask = torch.randn(2, 8, 64), torch.ones(2, 8)
    qm = fxquant.compile(m, "int8wo", (x,), {"mask": mask})
    rep = fxquant.report(qm)
    assert len(rep.quantized) == 2
    assert rep.model_bytes_after < rep.model_bytes_before
    x2, mask2 = torch.randn(3, 5, 64), torch.ones(3, 5)
    assert rel(qm(x2, mask=mask2), m(x2, mask=mask2)) < 0.03


def test_export_failure_falls_back_to_fx_with_reason(monkeypatch, tiny_llama_model, ids):
    def fail(*a, **k):
        raise RuntimeError("unsupported op for export")

    monkeypatch.setattr(frontend, "export_module", fail)
    qm = fxquant.compile(tiny_llama_model, "int8wo", (ids,))
    rep = fxquant.report(qm)
    assert rep.frontend == "fx" and "unsupported op for export" in rep.export_error
    assert "torch.export failed" in str(rep)
    assert len(rep.quantized) == 15


def test_bad_frontend_and_model():
    with pytest.raises(ValueError, match="frontend='onnx' is not valid; choose one of auto, export, fx"):
        fxquant.compile(nn.Linear(4, 4), "int8wo", (torch.randn(1, 4),), frontend="onnx")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fxquant.compile(lambda x: x, "int8wo", (torch.randn(1, 4),))


def test_compile_twice_is_independent(tiny_llama_model, ids):
    a = fxquant.compile(tiny_llama_model, "int8wo", (ids,))
    b = fxquant.compile(copy.deepcopy(tiny_llama_model), "int4wo-32", (ids,))
    assert fxquant.report(a).rows[0].scheme == "int8wo" and fxquant.report(b).rows[0].scheme == "int4wo-32"
    assert a(ids).shape == b(ids).shape


@pytest.mark.parametrize("fe", ["export", "fx"])
def test_save_load_bit_for_bit(tiny_llama_model, ids, tmp_path, fe):
    qm = fxquant.compile(tiny_llama_model, ISSUE_SPEC, (ids,), frontend=fe)
    path = tmp_path / "q.safetensors"
    fxquant.save(qm, path)
    lm = fxquant.load(path)
    sd, sd2 = qm.state_dict(), lm.state_dict()
    assert set(sd) == set(sd2)
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    assert fxquant.report(lm).to_dict() == fxquant.report(qm).to_dict()
    for shape in [(2, 16), (1, 1), (3, 5)]:
        x = torch.randint(0, 512, shape)
        assert torch.equal(lm(x), qm(x))
    fxquant.save(lm, tmp_path / "again.safetensors")  # a loaded module can be saved again
    assert torch.equal(fxquant.load(tmp_path / "again.safetensors")(ids), qm(ids))


# one layer per format family (hidden 256, intermediate 512): every op in one graph
EVERY_FAMILY = {
    "layers.0.self_attn.q_proj": "nf4+dq", "layers.0.self_attn.k_proj": "fp4-128",
    "layers.0.self_attn.v_proj": "uint3wo-32", "layers.0.self_attn.o_proj": "int2wo-64-axis0",
    "layers.0.mlp.gate_proj": "int8dq", "layers.0.mlp.up_proj": "llm.int8",
    "layers.0.mlp.down_proj": "float8wo", "layers.1.self_attn.q_proj": "float8dq-row",
    "layers.1.self_attn.k_proj": "fp6_e3m2", "layers.1.self_attn.v_proj": "onebit",
    "layers.1.self_attn.o_proj": "int4wo-64", "layers.1.mlp.gate_proj": "int8wo",
    "layers.1.mlp.up_proj": "fp5_e2m2", "layers.1.mlp.down_proj": "uint5wo-128",
}


def test_every_format_family_in_one_model(tiny_llama_model, ids, tmp_path):
    """A model mixing every format: the report's bytes are the stored buffers', eager output matches
    the float model run on the schemes' dequantized weights, torch.compile(fullgraph=True) matches
    eager at other shapes, torch.export works, save -> load is bit for bit."""
    from fxquant.schemes import parse_scheme

    torch._dynamo.reset()
    spec = fxquant.Spec(skip=["lm_head"], rules=EVERY_FAMILY)
    qm = fxquant.compile(tiny_llama_model, spec, (ids,))
    report = fxquant.report(qm)
    sd = qm.state_dict()
    oracle = copy.deepcopy(tiny_llama_model)
    for name, scheme in EVERY_FAMILY.items():
        row = report.row(f"model.{name}")
        assert row.status == "quantized" and row.scheme == str(parse_scheme(scheme)), (name, row)
        stored = sum(t.numel() * t.element_size() for k, t in sd.items() if k.startswith(f"model.{name}."))
        assert row.bytes_after == stored > 0, name
        lin = oracle.get_submodule(f"model.{name}")
        s = parse_scheme(scheme)
        lin.weight.data = s.dequantize(s.quantize(lin.weight.detach())).to(lin.weight.dtype)
    ops = {n.target for n in qm.graph.nodes if n.op == "call_function" and "fxquant" in str(n.target)}
    assert len(ops) == 11  # int8wo, int4wo, intx, bnb4, bnb4_dq, int8dq, llm_int8, float8wo/dq, fpx, onebit
    with torch.no_grad():
        # the dynamic-activation formats (int8dq, llm.int8, float8dq) also round activations
        assert rel(qm(ids), oracle(ids)) < 0.05
        cm = torch.compile(qm, fullgraph=True)
        for shape in [(2, 16), (1, 1), (3, 7)]:
            x = torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(sum(shape)))
            assert rel(cm(x), qm(x)) < 1e-2, shape
        ep = torch.export.export(qm, (ids,))
        assert torch.equal(ep.module()(ids), qm(ids))
    fxquant.save(qm, tmp_path / "all.safetensors")
    lm = fxquant.load(tmp_path / "all.safetensors")
    assert all(torch.equal(t, lm.state_dict()[k]) and t.dtype == lm.state_dict()[k].dtype for k, t in sd.items())
    assert torch.equal(lm(ids), qm(ids))


def test_partial_groups_compile_save_load(ids, tmp_path):
    """Hidden 96 and intermediate 200: no group size below divides them, yet every linear is
    quantized (partial groups padded: int4wo / intx axis 1 along K, axis 0 along N; nf4 blocks
    straddle rows); eager output is the float model on the dequantized weights; save -> load (a
    re-export through the fake impls with in_features) is bit for bit."""
    from fxquant.models import tiny_llama
    from fxquant.schemes import parse_scheme

    model = tiny_llama(seed=0, vocab_size=512, hidden_size=96, intermediate_size=200, num_layers=1, num_heads=4,
                       num_kv_heads=2)
    rules = {"layers.0.self_attn.k_proj": "uint2wo-64-axis0", "layers.0.mlp.down_proj": "uint3wo-64",
             "layers.0.mlp.up_proj": "nf4-128"}
    spec = fxquant.Spec(default="int4wo-128", skip=["lm_head"], rules=rules)
    qm = fxquant.compile(model, spec, (ids,))
    report, sd = fxquant.report(qm), qm.state_dict()
    oracle = copy.deepcopy(model)
    for row in report.rows:
        if row.fqn == "lm_head":
            continue
        assert row.status == "quantized", row
        stored = sum(t.numel() * t.element_size() for k, t in sd.items() if k.startswith(f"{row.fqn}."))
        assert row.bytes_after == stored > 0, row
        lin, s = oracle.get_submodule(row.fqn), parse_scheme(row.scheme)
        lin.weight.data = s.dequantize(s.quantize(lin.weight.detach()))
    assert len(report.quantized) == 7 and {r.scheme for r in report.quantized} == {
        "int4wo-128", "uint2wo-64-axis0", "uint3wo-64", "nf4-128"}
    with torch.no_grad():
        assert rel(qm(ids), oracle(ids)) < 5e-3  # the CPU paths' bf16 roundings (measured 1.6e-3)
    fxquant.save(qm, tmp_path / "partial.safetensors")
    lm = fxquant.load(tmp_path / "partial.safetensors")
    assert all(torch.equal(t, lm.state_dict()[k]) for k, t in sd.items())
    assert torch.equal(lm(ids), qm(ids))
