"""Pass infrastructure and the rewrite/cleanup passes: node counts, buffers, failures."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant.frontend import trace
from fxquant.passes import PIPELINE, PassContext, PassError, run_passes


def count(gm, pred):
    return sum(1 for n in gm.graph.nodes if pred(n))


def is_fx_op(name):
    return lambda n: n.op == "call_function" and str(n.target) == f"fxquant.{name}.default"


def test_rewrite_counts_and_buffers(tiny_llama_model):
    ids = torch.randint(0, 512, (1, 8))
    spec = fxquant.Spec(default="int4wo-64", skip=["lm_head"], rules={r"re:.*\.0\.self_attn\..*": "int8wo"})
    t = trace(tiny_llama_model, (ids,))
    before = count(t.gm, lambda n: n.op == "call_function" and str(n.target) == "aten.linear.default")
    assert before == 15
    gm = run_passes(t.gm, PassContext(spec=spec, model=tiny_llama_model))
    assert count(gm, is_fx_op("linear_int8wo")) == 4
    assert count(gm, is_fx_op("linear_int4wo")) == 10
    assert count(gm, lambda n: n.op == "call_function" and str(n.target) == "aten.linear.default") == 1
    names = dict(gm.named_buffers())
    assert names["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int8
    assert names["model.layers.1.mlp.up_proj.scales_and_zeros"].dtype == torch.bfloat16
    params = dict(gm.named_parameters())
    assert "model.layers.1.mlp.up_proj.weight" not in params  # float weight deleted
    assert "model.embed_tokens.weight" in params or "lm_head.weight" in params


def test_failing_pass_is_named_with_its_predecessors(tiny_llama_model):
    def broken_pass(gm, ctx):
        """Always fails."""
        raise RuntimeError("boom")

    t = trace(tiny_llama_model, (torch.randint(0, 512, (1, 8)),))
    with pytest.raises(PassError, match=r"'broken_pass' failed \(passes run before it: match_linears, resolve_spec\)"):
        run_passes(t.gm, PassContext(spec=fxquant.Spec(default="int8wo")), (*PIPELINE[:2], broken_pass))


def test_indivisible_group_is_padded_and_quantized():
    """in_features 96 and 40 at group 64 (1.5 and 0.6 groups): both layers quantized, the last group
    padded (96 -> 128, 40 -> 64 stored columns); the output is the float model on the dequantized
    weights."""
    from fxquant.formats import int4
    from fxquant.schemes import parse_scheme

    m = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8))
    qm = fxquant.compile(m, "int4wo-64", (torch.randn(3, 96),))
    rows = {r.fqn: r for r in fxquant.report(qm).rows}
    assert rows["0"].status == rows["2"].status == "quantized"
    assert rows["0"].bytes_after == int4.nbytes(40, 96, 64) and rows["2"].bytes_after == int4.nbytes(8, 40, 64)
    oracle = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8))
    oracle.load_state_dict(m.state_dict())
    s = parse_scheme("int4wo-64")
    for i in (0, 2):
        oracle[i].weight.data = s.dequantize(s.quantize(m[i].weight.detach()))
    x = torch.randn(5, 96)
    torch.testing.assert_close(qm(x), oracle(x), rtol=1e-2, atol=1e-2)


def test_unused_rule_is_warned_and_reported():
    m = nn.Sequential(nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"rules\['nope\.\*'\] matched no linear layer"):
        qm = fxquant.compile(m, fxquant.Spec(default="int8wo", rules={"nope.*": None}), (torch.randn(2, 64),))
    assert any("rules['nope.*'] matched no linear layer" in n for n in fxquant.report(qm).notes)
    assert "rules['nope.*'] matched no linear layer" in str(fxquant.report(qm))


def test_module_called_twice_is_quantized_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(64, 64)

        def forward(self, x):
            return self.l(torch.relu(self.l(x)))

    qm = fxquant.compile(Twice(), "int8wo", (torch.randn(2, 64),))
    assert count(qm, is_fx_op("linear_int8wo")) == 2
    assert len([k for k in dict(qm.named_buffers()) if k.endswith("qweight")]) == 1
    rows = fxquant.report(qm).rows
    assert sum(r.bytes_after for r in rows) == 64 * 64 + 64 * 2
