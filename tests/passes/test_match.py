"""The match pass finds every linear pattern of the brief, in export and FX graphs, and names it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.frontend import trace
from fxquant.passes import PassContext, match_linears


class Patterns(nn.Module):
    """One of each linear pattern: nn.Linear, F.linear, x @ W.t(), addmm with W.t(), matmul [K,N]."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)
        self.w_fn = nn.Parameter(torch.randn(32, 32) / 6)
        self.w_t = nn.Parameter(torch.randn(32, 32) / 6)
        self.w_kn = nn.Parameter(torch.randn(32, 64) / 6)  # stored [in, out] like GPT-2's Conv1D
        self.b_kn = nn.Parameter(torch.randn(64) / 6)
        self.w_addmm = nn.Parameter(torch.randn(64, 64) / 8)
        self.b_addmm = nn.Parameter(torch.randn(64) / 8)

    def forward(self, x):
        h = self.lin(x)
        h = F.linear(h, self.w_fn)
        h = h @ self.w_t.t()
        h = torch.addmm(self.b_kn, h.reshape(-1, 32), self.w_kn).reshape(x.shape[0], x.shape[1], 64)
        h2 = torch.addmm(self.b_addmm, h.reshape(-1, 64), self.w_addmm.t())
        scores = h @ h.transpose(-1, -2)  # activation x activation: not a linear site
        return h2.reshape(x.shape[0], x.shape[1], 64) + scores.sum(-1, keepdim=True)


EXPECTED = {"lin", "w_fn", "w_t", "w_kn", "w_addmm"}


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_all_patterns_found_and_named(frontend):
    m = Patterns()
    x = torch.randn(2, 5, 32)
    t = trace(m, (x,), frontend=frontend)
    ctx = PassContext(spec=fxquant.Spec(), model=m)
    match_linears(t.gm, ctx)
    assert {s.name for s in ctx.sites} == EXPECTED
    shapes = {s.name: s.out_shape for s in ctx.sites}
    assert shapes["w_kn"] == (64, 32) and shapes["w_addmm"] == (64, 64) and shapes["lin"] == (32, 32)


@pytest.mark.parametrize("frontend", ["export", "fx"])
@pytest.mark.parametrize("scheme", ["int8wo", "int4wo-32"])
def test_every_pattern_rewritten_and_numerically_right(frontend, scheme):
    m = Patterns()
    x = torch.randn(2, 5, 32)
    qm = fxquant.compile(m, scheme, (x,), frontend=frontend)
    ops = [n for n in qm.graph.nodes if n.op == "call_function" and str(n.target).startswith("fxquant.")]
    assert len(ops) == 5
    leftover = [n for n in qm.graph.nodes if (n.op == "call_module" and n.target != "_guards_fn") or
                (n.op == "call_function" and "linear" in str(n.target) and "fxquant" not in str(n.target))]
    assert not leftover
    # compare with the float model whose weights are the dequantized ones: only rounding remains
    ref = Patterns()
    ref.load_state_dict(m.state_dict())
    rep = fxquant.report(qm)
    assert all(r.status == "quantized" for r in rep.rows)
    x2 = torch.randn(3, 4, 32)
    rel = ((qm(x2) - m(x2)).norm() / m(x2).norm()).item()
    assert rel < (0.03 if scheme == "int8wo" else 0.3)


def test_tied_lm_head_named_by_its_module(tiny_llama_model):
    t = trace(tiny_llama_model, (torch.randint(0, 512, (1, 8)),))
    ctx = PassContext(spec=fxquant.Spec(), model=tiny_llama_model)
    match_linears(t.gm, ctx)
    names = [s.name for s in ctx.sites]
    assert "lm_head" in names and len(names) == 2 * 7 + 1
    assert "model.layers.1.mlp.down_proj" in names


def test_computed_weight_is_reported_not_quantized():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    qm = fxquant.compile(Computed(), "int8wo", (torch.randn(2, 32),))
    (row,) = fxquant.report(qm).rows
    assert row.status == "skipped" and "computed in the graph" in row.reason


class FixedProjection(nn.Module):
    """A linear against a buffer (a fixed projection) next to a parameter linear."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.register_buffer("proj", torch.randn(64, 32) / 8)  # x @ proj: W = proj.T, a buffer

    def forward(self, x):
        return self.lin(x) @ self.proj


@pytest.mark.parametrize("emit", ["compile", "quantize_"])
def test_buffer_weight_needs_a_rule(emit):
    """The default scheme quantizes parameters only; a buffer-backed site stays float with a reason,
    unless a rule names it."""
    import copy

    run = fxquant.compile if emit == "compile" else fxquant.quantize_
    x = torch.randn(3, 64)
    m = FixedProjection()
    out = run(copy.deepcopy(m), "int8wo", (x,))
    rows = {r.fqn: r for r in fxquant.report(out).rows}
    assert rows["lin"].status == "quantized"
    assert rows["proj"].status == "skipped" and "buffer, not a parameter" in rows["proj"].reason
    assert "name it in a rule" in rows["proj"].reason
    opted = run(copy.deepcopy(m), fxquant.Spec(default="int8wo", rules={"proj": "int8wo"}), (x,))
    row = fxquant.report(opted).row("proj")
    assert row.status == "quantized" and row.rule == "rules['proj']"
    assert ((opted(x) - m(x)).norm() / m(x).norm()).item() < 0.03


class _Experts(nn.Module):
    """Expert weights as 3-D parameters (transformers 5's MoE layout) next to a 2-D linear."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(32, 4)
        self.w_up = nn.Parameter(torch.randn(4, 64, 32) / 6)  # [E, N, K]
        self.w_down = nn.Parameter(torch.randn(4, 32, 64) / 8)
        self.conv = nn.Conv1d(4, 4, 3)  # a 3-D weight that is not a matrix product's: no note

    def forward(self, x):  # x [E, T, 32]
        h = torch.bmm(x, self.w_up.transpose(1, 2))  # a batched linear per expert: a site (kind bmm)
        y = torch.einsum("etn,ekn->etk", h, self.w_down)  # any other product: float, named in a note
        return y + self.router(x).sum() + self.conv(x[:, :, :8].transpose(0, 1)).sum()


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_batched_expert_weights_are_sites_or_named_in_a_note(frontend):
    torch.manual_seed(0)  # the model and x: the error bound below held for 30 random draws but is not a bound on all
    m = _Experts()
    x = torch.randn(4, 5, 32)
    qm = fxquant.compile(m, "int8wo", (x,), frontend=frontend)
    rep = fxquant.report(qm)
    assert {r.fqn: (r.kind, r.shape, r.status) for r in rep.rows} == {
        "router": (rep.row("router").kind, (4, 32), "quantized"), "w_up": ("bmm", (4, 64, 32), "quantized")}
    note = [n for n in rep.notes if n.startswith("left float")]
    assert len(note) == 1 and "1 weight tensors" in note[0], rep.notes
    assert "w_down [4, 32, 64]" in note[0] and "w_up" not in note[0] and "conv" not in note[0]
    assert ((qm(x) - m(x)).norm() / m(x).norm()).item() < 0.02
