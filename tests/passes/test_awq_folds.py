"""AWQ's folds as the emitted model computes them: the reported output error wherever the scale went, and
the fold into a layer norm's weight and bias."""
import copy

import pytest
import torch
from torch import nn

import fxquant
from fxquant.methods import Stats
from passes.test_calibrate import GatedMLP, _awq_down_scale, _batches, _rel, _tiny, _xs


def _out_err(f, g, xs) -> tuple[float, float]:
    """(sum ||f(x) - g(x)||², that over sum ||f(x)||²) over xs, in float64."""
    with torch.no_grad():
        err = sum(float((f(x).double() - g(x).double()).pow(2).sum()) for x in xs)
        return err, err / sum(float(f(x).double().pow(2).sum()) for x in xs)


def test_awq_output_error_is_the_emitted_models_wherever_the_scale_went(fp32_dense):
    """The reported output error of an AWQ site is that of the model it emits against the float model on
    the calibration data, whether its scale folded into a norm (q_proj), divides the input (o_proj), or
    was folded into a linear's rows (down's scale into up's rows: up's error counts them multiplied
    back); measured by running both models' layers on the float model's own inputs of them."""
    batches = _batches(n=3, rows=2)
    model = _tiny()
    q = fxquant.quantize_(copy.deepcopy(model), "uint4wo-32@awq", example_inputs=(batches[0],), calibration=batches)
    res = fxquant.report(q).results
    assert res["model.layers.0.self_attn.q_proj"]["awq_input_scale"].startswith("folded into model.layers.0.")
    assert res["model.layers.0.self_attn.o_proj"]["awq_input_scale"] == "applied to the input before the op"
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, m in model.named_modules() if n in ("model.layers.0.input_layernorm",
                                                         "model.layers.0.self_attn.o_proj")]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    fl, ql = model.model.layers[0], q.model.layers[0]
    for name, xs, f, g in (
            ("self_attn.q_proj", inputs["model.layers.0.input_layernorm"],
             lambda h: fl.self_attn.q_proj(fl.input_layernorm(h)), lambda h: ql.self_attn.q_proj(ql.input_layernorm(h))),
            ("self_attn.o_proj", inputs["model.layers.0.self_attn.o_proj"], fl.self_attn.o_proj, ql.self_attn.o_proj)):
        want = _out_err(f, g, xs)[1]
        got = res[f"model.layers.0.{name}"]["relative_output_squared_error"]
        assert abs(got - want) <= 0.02 * want, (name, got, want)
    mlp, xs = GatedMLP().eval(), _xs(3)
    qm = fxquant.quantize_(copy.deepcopy(mlp), "int4wo-32@awq", example_inputs=(xs[0],), calibration=xs)
    rep = fxquant.report(qm).results
    assert rep["down"]["awq_input_scale"] == "folded into up (its output rows)"
    s = _awq_down_scale(mlp, xs)  # the fold's scale (oracle: the method on the float activations)
    want = _out_err(mlp.up, lambda x: qm.up(x) * s, xs)[0]  # the sum: up's bias is not in the report's energy
    assert abs(rep["up"]["output_squared_error"] - want) <= 0.02 * want, (rep["up"], want)


class _LayerNormBlock(nn.Module):
    """A LayerNorm feeding two linears (AWQ's fold target), then a linear on their product."""

    def __init__(self, bias: bool):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.ln = nn.LayerNorm(64, bias=bias)
        self.q, self.k, self.out = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 32)
        with torch.no_grad():
            for lin in (self.q, self.k, self.out):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
                lin.bias.copy_(torch.randn(lin.out_features, generator=g) * 0.1)
            self.ln.weight.copy_(torch.rand(64, generator=g) + 0.5)
            self.ln.weight[:4] *= 8  # channels whose activations are large: AWQ protects them
            if bias:
                self.ln.bias.copy_(torch.randn(64, generator=g))

    def forward(self, x):
        h = self.ln(x)
        return self.out(torch.tanh(self.q(h)) * self.k(h))


@pytest.mark.parametrize("bias", [True, False])
def test_awq_folds_into_a_layer_norm_weight_and_bias(bias, monkeypatch):
    """AWQ's inverse scale goes into a LayerNorm's weight and bias (export); the model computes what the
    same AWQ weights compute with the division before the op (the FX front end's call_module norm keeps
    it there); both emits agree, and a later GPTQ site's statistics are the emitted model's activations."""
    model = _LayerNormBlock(bias).eval()
    g = torch.Generator().manual_seed(7)  # more tokens than channels: a search that is not on a knife's edge
    xs = [torch.randn(48, 64, generator=g) * (1 + 5 * torch.rand(64, generator=g)) for _ in range(3)]
    spec = fxquant.Spec(default="int4wo-32@awq", rules={"out": "int4wo-32@gptq"})
    seen = []
    update = Stats.update
    monkeypatch.setattr(Stats, "update", lambda self, x, *a, **k: (seen.append(x.clone()), update(self, x, *a, **k)))
    folded = fxquant.quantize_(copy.deepcopy(model), spec, example_inputs=(xs[0],), calibration=xs)
    where = fxquant.report(folded).results["q"]["awq_input_scale"]
    assert where == ("folded into ln.weight and ln.bias" if bias else "folded into ln.weight"), where
    assert folded.q.input_scale is None
    inputs = []
    hook = folded.out.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    x = torch.cat(xs)
    with torch.no_grad():
        for b in xs:
            folded(b)
        hook.remove()
        out_seen = seen[-len(xs):]  # the walk's last group: out's inputs, batch by batch
        assert all(torch.equal(s.reshape(i.shape), i) for s, i in zip(out_seen, inputs))
        divided = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=xs, frontend="fx")
        assert fxquant.report(divided).results["q"]["awq_input_scale"] == "applied to the input before the op"
        compiled = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=xs)
        assert torch.equal(compiled(x), folded(x))
        torch.testing.assert_close(folded(x), divided(x), rtol=1e-4, atol=1e-4)
        rtn = fxquant.compile(model, "int4wo-32", example_inputs=(xs[0],))
        assert _rel(folded(x), model(x)) < _rel(rtn(x), model(x))
