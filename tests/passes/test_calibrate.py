"""The calibrate pass: statistics over the calibration data, the data-driven methods on them, AWQ's
folds, sequential calibration, per-layer results, and the same outcome from compile and quantize_."""
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.methods import AWQ, GPTQ, Stats
from fxquant.methods.gptq import gptq_codes
from fxquant.schemes import parse_scheme



warnings.filterwarnings("ignore", category=UserWarning)


def _tiny():
    from fxquant.models import tiny_llama

    return tiny_llama(seed=0, vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=4, num_kv_heads=2).eval()


def _batches(n=3, rows=2, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (rows, seq), generator=g) for _ in range(n)]


IDS = torch.arange(16).reshape(1, 16)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def test_stats_stream_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 16, generator=g) for _ in range(4)]
    streamed, once = Stats(16), Stats(16)
    for x in xs:
        streamed.update(x, hessian=True)
    once.update(torch.cat([x.reshape(-1, 16) for x in xs]), hessian=True)
    assert streamed.tokens == once.tokens == 60
    assert torch.equal(streamed.absmax, once.absmax)
    torch.testing.assert_close(streamed.mean_abs, once.mean_abs)
    torch.testing.assert_close(streamed.hessian, once.hessian)
    x = torch.cat([x.reshape(-1, 16) for x in xs])
    torch.testing.assert_close(once.hessian, x.T @ x)


def test_method_without_data_names_sites_and_method():
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    spec = fxquant.Spec(default="int4wo-32@gptq", rules={"re:.*down_proj": "int4wo-32"})
    with pytest.raises(ValueError, match=r"gptq: model\.layers\.0\.self_attn\.q_proj.*calibration="):
        fxquant.compile(m, spec, example_inputs=(IDS,))
    with pytest.raises(ValueError, match="need calibration data"):
        fxquant.quantize_(m, spec, example_inputs=(IDS,))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # untouched
    assert not any(isinstance(x, fxquant.inplace.QuantizedLinear) for x in m.modules())


def test_rtn_and_hqq_need_no_data_and_report_output_error_with_it():
    m = _tiny()
    qm = fxquant.compile(m, "int4wo-32", example_inputs=(IDS,))
    res = fxquant.report(qm).results["model.layers.0.mlp.down_proj"]
    assert res["method"] == "rtn" and "output_squared_error" not in res
    qm = fxquant.compile(m, "int4wo-32", example_inputs=(IDS,), calibration=_batches())
    rep = fxquant.report(qm)
    res = rep.results["model.layers.0.mlp.down_proj"]
    assert res["calibration_tokens"] == 3 * 2 * 24
    assert 0 < res["relative_output_squared_error"] < 0.1
    assert rep.row("model.layers.0.mlp.down_proj").rel_output_error == res["relative_output_squared_error"]
    # no observer is left behind
    assert not any("observer" in n.name or "observer" in str(n.target) for n in qm.graph.nodes)
    assert not any("observer" in name for name, _ in qm.named_modules())


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_compile_and_quantize_inplace_agree(frontend):
    spec = fxquant.Spec(default="int4wo-32@gptq", skip=["lm_head"],
                        rules={"re:.*mlp.(gate|up)_proj": "int4wo-32@awq", "re:.*down_proj": "uint3wo-32@awq",
                               "re:.*q_proj": "uint3wo-32"})
    batches = _batches()
    m = _tiny()
    ref = _logits(m(IDS))
    qm = fxquant.compile(m, spec, example_inputs=(IDS,), calibration=batches, frontend=frontend)
    assert torch.equal(_logits(m(IDS)), ref)  # compile leaves the user's model as it was
    m2 = _tiny()
    fxquant.quantize_(m2, spec, example_inputs=(IDS,), calibration=batches, frontend=frontend)
    assert fxquant.report(qm) == fxquant.report(m2)
    a, b = _logits(qm(IDS)), _logits(m2(IDS))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert ((a - ref).norm() / ref.norm()) < 0.3
    res = fxquant.report(m2).results
    assert res["model.layers.1.mlp.gate_proj"]["awq_input_scale"].startswith("folded into model.layers.1."
                                                                             "post_attention_layernorm.weight")
    assert res["model.layers.0.mlp.down_proj"]["awq_input_scale"] == "applied to the input before the op"


def test_awq_fold_changes_the_norm_only_in_the_emitted_model():
    m = _tiny()
    spec = fxquant.Spec(default=None, rules={"re:.*self_attn.[qkv]_proj": "int4wo-32@awq"})
    qm = fxquant.compile(m, spec, example_inputs=(IDS,), calibration=_batches())
    res = fxquant.report(qm).results
    folded = [r["awq_input_scale"] for r in res.values()]
    assert all(f.startswith("folded into model.layers.") for f in folded), folded
    norm = "model.layers.0.input_layernorm.weight"
    ours = qm.get_parameter(norm) if norm in dict(qm.named_parameters()) else qm.get_buffer(norm)
    assert not torch.equal(ours, m.get_parameter(norm))
    # the fold is visible on the graph's get_attr node
    assert any("awq_fold" in n.meta.get("fxquant", {}) for n in qm.graph.nodes if n.op == "get_attr")
    m2 = _tiny()
    fxquant.quantize_(m2, spec, example_inputs=(IDS,), calibration=_batches())
    torch.testing.assert_close(m2.get_parameter(norm), ours)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, up with a bias: AWQ's down_proj scale can go into up's rows."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.gate, self.up, self.down = nn.Linear(64, 128, bias=False), nn.Linear(64, 128), nn.Linear(128, 64)
        with torch.no_grad():
            for lin in (self.gate, self.up, self.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
            self.up.bias.copy_(torch.randn(128, generator=g))
            self.down.bias.copy_(torch.randn(64, generator=g) * 0.1)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _awq_down_scale(model, xs):
    """down's AWQ input scale, as the method finds it from the float model's activations (oracle)."""
    h = torch.cat([torch.nn.functional.silu(model.gate(x)) * model.up(x) for x in xs]).detach()
    stats = Stats(128)
    stats.update(h, hessian=True)
    res = AWQ().quantize_group([parse_scheme("int4wo-32").format], [model.down.weight.detach()], stats)[0]
    return res.input_scale


@pytest.mark.parametrize("up_scheme", ["int4wo-32@awq", None])
def test_awq_folds_down_scale_into_up_rows(up_scheme):
    """down_proj's inverse scale goes into up_proj's output rows (weight and bias), through the
    gate product: quantized with its rows divided when up is quantized, the float weight divided
    when up stays float; no division is left before down, and both emits agree."""
    model = GatedMLP().eval()
    xs = _xs(3)
    spec = fxquant.Spec(default="int4wo-32@awq", rules={"up": up_scheme})
    qm = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=xs)
    res = fxquant.report(qm).results
    assert res["down"]["awq_input_scale"] == "folded into up (its output rows)"
    divs = [n.meta["fxquant"]["site"] for n in qm.graph.nodes if n.target == torch.ops.aten.div.Tensor]
    assert "down" not in divs  # nothing applied to down's input (gate and up read x itself: they divide it)
    s = _awq_down_scale(model, xs)
    bias = qm.get_parameter("up.bias") if "up.bias" in dict(qm.named_parameters()) else qm.get_buffer("up.bias")
    torch.testing.assert_close(bias, model.up.bias.detach() / s)
    if up_scheme is None:  # float: the weight's rows divided
        w = dict(qm.named_parameters()).get("up.weight", None)
        w = w if w is not None else qm.get_buffer("up.weight")
        torch.testing.assert_close(w, model.up.weight.detach() / s[:, None])
    else:
        assert res["up"]["awq_fold"] == "output rows divided by the AWQ input scale of down"
    x = torch.cat(xs)
    ref = model(x)
    out = qm(x)
    rtn = fxquant.compile(model, fxquant.Spec(default="int4wo-32", rules={"up": up_scheme and "int4wo-32"}),
                          example_inputs=(xs[0],))
    assert _rel(out, ref) < 0.9 * _rel(rtn(x), ref)
    m2 = GatedMLP().eval()
    fxquant.quantize_(m2, spec, example_inputs=(xs[0],), calibration=xs)
    assert isinstance(m2.down, fxquant.inplace.QuantizedLinear) and m2.down.input_scale is None
    # up's own output is the float one divided by s, up to int4 error where it is quantized
    assert _rel(m2.up(x) * s, model.up(x)) < (0.1 if up_scheme else 1e-6)
    torch.testing.assert_close(m2(x), out, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), ref)  # compile left the user's model as it was


def test_awq_without_linear_fold_in_the_sequential_walk():
    """GPTQ's sequential walk has already run up_proj when it meets down_proj: the scale is applied
    to down's input instead, and the output matches the observer-mode model's closely."""
    model = GatedMLP().eval()
    xs = _xs(3)
    walk = fxquant.Spec(default="int4wo-32@awq", rules={"gate": "int4wo-32@gptq"})
    qm = fxquant.compile(model, walk, example_inputs=(xs[0],), calibration=xs)
    assert fxquant.report(qm).results["down"]["awq_input_scale"] == "applied to the input before the op"
    x = torch.cat(xs)
    rtn = fxquant.compile(model, "int4wo-32", example_inputs=(xs[0],))
    assert _rel(qm(x), model(x)) < 0.9 * _rel(rtn(x), model(x))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(64, 96, bias=False)
        self.b = nn.Linear(96, 48, bias=True)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(96, 64, generator=g) * 0.1)
            self.b.weight.copy_(torch.randn(48, 96, generator=g) * 0.1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _xs(n=3):
    g = torch.Generator().manual_seed(5)

    def student_t3(shape):  # heavy-tailed, from the seeded generator (the same data in any test order)
        return torch.randn(shape, generator=g) / (torch.randn((3, *shape), generator=g).pow(2).mean(0)).sqrt()
    return [student_t3((4, 64)) * (1 + 5 * torch.rand(64, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_runs_on_the_inputs_the_model_feeds_it(sequential):
    """Sequential: the second layer's Hessian is of relu(quantized a(x)), a as the quantized model
    computes it (its op: on a CPU with fast bf16, fp32 activations rounded once to bf16); otherwise
    of relu(a(x))."""
    model = TwoLinears().eval()
    scheme = parse_scheme("int4wo-32")
    method = GPTQ(true_sequential=sequential)
    xs = _xs()
    spec = fxquant.Spec(default=scheme, method=method)
    qm = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=xs)
    x = torch.cat(xs)
    wa, wb = model.a.weight.detach(), model.b.weight.detach()
    qa = gptq_codes(wa, x.T @ x, scheme.grid(96, 64), act_order=True)  # GPTQ's default
    assert torch.equal(qm.get_buffer("a.qweight"), scheme.pack_grid(*qa[:3], 96, 64).tensors["qweight"])
    if sequential:  # a's output as the quantized model computes it
        h_in = torch.relu(_op_output(scheme.pack_grid(*qa[:3], 96, 64), x))
    else:
        h_in = torch.relu(x @ wa.T)
    qb = gptq_codes(wb, h_in.T @ h_in, scheme.grid(48, 96), act_order=True)
    want = scheme.pack_grid(*qb[:3], 48, 96)
    got = qm.get_buffer("b.qweight")
    assert torch.equal(got, want.tensors["qweight"])


def _op_output(q, x):
    return getattr(torch.ops.fxquant, q.op)(x, *q.tensors.values(), None, **q.attrs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequential_walk_sees_the_activations_of_the_quantized_model(monkeypatch, dtype):
    """Every GPTQ group's statistics come from exactly the activations the emitted model computes at
    that site: the earlier sites' products through their ops (bias included), and the input of a
    norm that took an earlier AWQ group's scale divided by it (the walk runs the norm before the
    fold exists); in float32 and in bf16, whose results the op's path rounds."""
    spec = fxquant.Spec(default="int4wo-32@gptq", rules={"re:.*(q|k|v)_proj": "int4wo-32@awq"})
    seen = []
    update = Stats.update
    monkeypatch.setattr(Stats, "update", lambda self, x, *a, **k: (seen.append(x.clone()), update(self, x, *a, **k)))
    batches = _batches(n=3, rows=1)
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:  # biases on some sites: the op adds them as the model's call does
        for lin in (layer.self_attn.o_proj, layer.mlp.gate_proj):
            lin.bias = nn.Parameter(torch.randn(lin.out_features, generator=g) * 0.1)
    q = fxquant.quantize_(model.to(dtype), spec, example_inputs=(batches[0],), calibration=batches)
    assert "folded into" in fxquant.report(q).results["model.layers.1.self_attn.q_proj"]["awq_input_scale"]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].clone()))
             for n, m in q.named_modules() if n.endswith(("o_proj", "gate_proj", "down_proj"))]
    with torch.no_grad():
        for b in batches:
            q(b)
    for h in hooks:
        h.remove()
    # the walk's order: per group in graph order, every batch; the AWQ groups (q/k/v) come first in
    # each layer and see the norm's output before the fold
    per_group = [seen[i:i + len(batches)] for i in range(0, len(seen), len(batches))]
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    gptq_groups = [g for i, g in enumerate(per_group) if i % 4]
    assert len(gptq_groups) == len(names)
    for name, got in zip(names, gptq_groups):
        for g, want in zip(got, inputs[name]):
            assert torch.equal(g.reshape(want.shape), want), name


def test_one_batch_or_many_same_data():
    model = TwoLinears().eval()
    xs = _xs(4)
    spec = fxquant.Spec(default="int4wo-32@gptq")
    many = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=xs)
    one = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=[torch.cat(xs)])
    for name in ("a.qweight", "b.qweight"):
        # the Hessian's float sums differ in order only: at most a few codes move
        differ = (many.get_buffer(name) != one.get_buffer(name)).float().mean()
        assert differ < 0.01
    ra, rb = fxquant.report(many).results["b"], fxquant.report(one).results["b"]
    assert ra["calibration_tokens"] == rb["calibration_tokens"] == 16


def test_gptq_and_awq_beat_rtn_on_the_calibration_data():
    model = TwoLinears().eval()
    xs = _xs(4)
    errs = {}
    for sch in ["int4wo-32", "int4wo-32@gptq", "int4wo-32@awq", "uint3wo-32", "uint3wo-32@gptq", "uint3wo-32@awq"]:
        rep = fxquant.report(fxquant.compile(model, sch, example_inputs=(xs[0],), calibration=xs))
        errs[sch] = rep.results["a"]["output_squared_error"]
    for base in ["int4wo-32", "uint3wo-32"]:
        assert errs[f"{base}@gptq"] < errs[base]
        assert errs[f"{base}@awq"] < errs[base]


@pytest.mark.parametrize("form", ["compile", "quantize_"])
def test_one_tensor_or_dict_is_one_batch_and_the_first_batch_is_the_example(form):
    """``calibration=x`` (a tensor) and ``calibration={"x": x}`` are the batch ``[x]``, not its rows or its
    keys; without example inputs the model is traced with the first batch: the same codes in every case."""
    import copy

    model = TwoLinears().eval()
    x = torch.cat(_xs(2))
    spec = fxquant.Spec(default="int4wo-32@gptq")

    def codes(**kw):
        if form == "compile":
            return fxquant.compile(model, spec, **kw).get_buffer("a.qweight")
        m = fxquant.quantize_(copy.deepcopy(model), spec, **kw)
        return m.a.qweight
    want = codes(example_inputs=(x[:1],), calibration=[x])
    for kw in (dict(example_inputs=(x[:1],), calibration=x), dict(example_inputs=(x[:1],), calibration={"x": x}),
               dict(calibration=[x]), dict(calibration=iter([{"x": x}])), dict(calibration=x)):
        assert torch.equal(codes(**kw), want), kw


def test_calibration_items_and_bad_items():
    model = TwoLinears().eval()
    xs = _xs(2)
    spec = fxquant.Spec(default="int8wo@gptq")
    a = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=[(x,) for x in xs])
    b = fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=[{"x": x} for x in xs])
    assert torch.equal(a.get_buffer("a.qweight"), b.get_buffer("a.qweight"))
    with pytest.raises(ValueError, match=r"calibration\[0\]: expected a tensor"):
        fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=["text"])
    with pytest.raises(ValueError, match="calibration is empty"):
        fxquant.compile(model, spec, example_inputs=(xs[0],), calibration=[])


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(256, 64), nn.Linear(64, 64)

    def forward(self, input_ids, attention_mask=None, labels=None, scale=None):
        h = self.emb(input_ids)
        h = h if attention_mask is None else h * attention_mask[..., None]
        return self.proj(h if scale is None else h * scale)


def test_calibration_argument_the_trace_lacks_is_an_error():
    """A keyword the trace did not take and whose effect is unknown would be dropped: refused, named."""
    m = _Masked().eval()
    batches = [{"input_ids": b, "scale": torch.tensor(2.0)} for b in _batches(2)]
    for sequential in (True, False):
        spec = fxquant.Spec(default="int4wo-32", method=GPTQ(true_sequential=sequential))
        with pytest.raises(ValueError, match=r"passes \['scale'\].*example_kwargs"):
            fxquant.compile(m, spec, example_kwargs={"input_ids": IDS}, calibration=batches)
    ok = fxquant.compile(m, "int4wo-32@gptq", example_kwargs={"input_ids": IDS, "scale": torch.tensor(1.0)},
                         calibration=batches)
    assert fxquant.report(ok).results["proj"]["calibration_tokens"] == 2 * 2 * 24


@pytest.mark.parametrize("sequential", [True, False])
def test_tokenizer_batches_on_a_trace_without_attention_mask(sequential):
    """A tokenizer's batches (attention_mask, padding, labels) on a model traced with input_ids only: an
    all-ones mask and labels are left out, a padded batch runs as its unpadded rows: the same codes as
    calibrating on those rows by hand; a mask that is not one span per row is refused."""
    from transformers import BatchEncoding

    m = _Masked().eval()
    spec = fxquant.Spec(default="int4wo-32", method=GPTQ(true_sequential=sequential))
    ids = _batches(2, rows=3, seq=20)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[2, 12:] = 0  # right padding
    rows = [ids[0][0:1, 5:], ids[0][1:2], ids[0][2:3, :12], ids[1]]
    got = fxquant.compile(m, spec, example_kwargs={"input_ids": IDS}, calibration=[
        BatchEncoding({"input_ids": ids[0], "attention_mask": mask, "labels": ids[0]}),
        {"input_ids": ids[1], "attention_mask": torch.ones_like(ids[1]), "token_type_ids": torch.zeros_like(ids[1])}])
    want = fxquant.compile(m, spec, example_kwargs={"input_ids": IDS}, calibration=[{"input_ids": r} for r in rows])
    assert torch.equal(got.get_buffer("proj.qweight"), want.get_buffer("proj.qweight"))
    assert fxquant.report(got).results["proj"]["calibration_tokens"] == 15 + 20 + 12 + 3 * 20
    traced_with_mask = fxquant.compile(m, spec, example_kwargs={"input_ids": IDS, "attention_mask": torch.ones_like(IDS)},
                                       calibration=[{"input_ids": r} for r in rows])  # an all-ones mask added
    assert torch.equal(traced_with_mask.get_buffer("proj.qweight"), want.get_buffer("proj.qweight"))
    holes = mask.clone()
    holes[1, 7] = 0
    with pytest.raises(ValueError, match=r"row 1 of a batch's attention_mask is not one span"):
        fxquant.compile(m, spec, example_kwargs={"input_ids": IDS},
                        calibration=[{"input_ids": ids[0], "attention_mask": holes}])
    with pytest.raises(ValueError, match=r"token_type_ids"):  # not all zeros: its effect is unknown
        fxquant.compile(m, spec, example_kwargs={"input_ids": IDS},
                        calibration=[{"input_ids": ids[0], "token_type_ids": torch.ones_like(ids[0])}])


def test_bad_method_parameters_name_the_field():
    with pytest.raises(ValueError, match=r"GPTQ\.damp_percent=0 .*\(0, 1\]"):
        GPTQ(damp_percent=0)
    with pytest.raises(ValueError, match=r"GPTQ\.block_size"):
        GPTQ(block_size=0)
    with pytest.raises(ValueError, match=r"AWQ\.max_shrink"):
        AWQ(max_shrink=1.0)
    with pytest.raises(ValueError, match=r"AWQ\.n_grid"):
        AWQ(n_grid=0)
    with pytest.raises(ValueError, match=r"cannot quantize nf4.*no code grid"):
        fxquant.Spec(default="nf4@gptq")
    with pytest.raises(ValueError, match=r"unknown method 'foo'; valid: .*gptq"):
        fxquant.Spec(default="int4wo@foo")


def test_methods_round_trip_through_spec_dicts():
    spec = fxquant.Spec(default="int4wo-128@gptq", skip=["lm_head"],
                        rules={"re:.*down_proj": "int4wo-64@awq", "re:.*q_proj": AWQ(n_grid=5)},
                        method=GPTQ(act_order=True, damp_percent=0.05))
    assert fxquant.Spec.from_dict(spec.to_dict()) == spec
    assert fxquant.Spec.from_json(spec.to_json()) == spec
    assert str(spec.rules[1].scheme) == "int4wo-128@awq" and spec.rules[1].scheme.method == AWQ(n_grid=5)
    # Spec.method applies to schemes that name no method; a scheme's own method wins
    assert spec.default.method == GPTQ()
    assert fxquant.Spec(default="int4wo-64", method="gptq").default == parse_scheme("int4wo-64@gptq")


def test_calibrated_model_saves_loads_and_compiles(tmp_path):
    """AWQ's folds and input divisions survive save -> load bit for bit and torch.compile(fullgraph)."""
    m = _tiny()
    spec = fxquant.Spec(default="int4wo-32@awq", skip=["lm_head"])
    qm = fxquant.compile(m, spec, example_inputs=(IDS,), calibration=_batches(2))
    assert any(r.get("awq_input_scale", "").startswith("applied") for r in fxquant.report(qm).results.values())
    fxquant.save(qm, tmp_path / "m.safetensors")
    loaded = fxquant.load(tmp_path / "m.safetensors")
    want = _logits(qm(IDS))
    assert torch.equal(_logits(loaded(IDS)), want)
    torch.testing.assert_close(_logits(torch.compile(qm, fullgraph=True)(IDS)), want, rtol=1e-4, atol=1e-4)
    m2 = _tiny()
    fxquant.quantize_(m2, spec, example_inputs=(IDS,), calibration=_batches(2))
    torch.testing.assert_close(_logits(torch.compile(m2, fullgraph=True)(IDS)), _logits(m2(IDS)),
                               rtol=1e-4, atol=1e-4)


def test_sequential_walk_stops_after_the_last_site(monkeypatch):
    """Nothing after the last calibrated site runs in the walk (a float lm_head over every batch at
    once would be vocab x tokens x 4 bytes: 34 GB for Gemma-3 at 64 x 512 tokens)."""
    class Headed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(64, 64), nn.Linear(64, 500)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    ran = []
    real = torch.fx.Interpreter.run_node
    monkeypatch.setattr(torch.fx.Interpreter, "run_node", lambda self, n: ran.append(str(n.target)) or real(self, n))
    xs = _xs(2)
    qm = fxquant.compile(Headed().eval(), fxquant.Spec(default="int4wo-32@gptq", skip=["head"]),
                         example_inputs=(xs[0],), calibration=xs)
    assert fxquant.report(qm).results["body"]["calibration_tokens"] == 8
    assert ran and not any("relu" in t for t in ran)  # the walk ended at body, before relu and head


class GatedMatmul(GatedMLP):
    """GatedMLP with up as ``x @ W`` against a ``[K, N]`` parameter (a transposed site, no bias)."""

    def __init__(self):
        super().__init__()
        self.w_up = nn.Parameter(self.up.weight.detach().t().contiguous())
        del self.up

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * (x @ self.w_up))


def _no_up_bias(m):
    with torch.no_grad():
        m.up.bias.zero_()
    return m


def test_awq_fold_into_a_transposed_linear():
    """A ``[K, N]`` weight takes the fold along its columns (its output axis); quantized or float, the
    model's output matches the nn.Linear form's."""
    xs = _xs(3)
    x = torch.cat(xs)
    for up_scheme in ("int4wo-32@awq", None):
        ref = _no_up_bias(GatedMLP().eval())
        m = GatedMatmul().eval()
        torch.testing.assert_close(m(x), ref(x))
        qa = fxquant.compile(ref, fxquant.Spec(default="int4wo-32@awq", rules={"up": up_scheme}),
                             example_inputs=(xs[0],), calibration=xs)
        qb = fxquant.compile(m, fxquant.Spec(default="int4wo-32@awq", rules={"w_up": up_scheme}),
                             example_inputs=(xs[0],), calibration=xs)
        res = fxquant.report(qb).results
        assert res["down"]["awq_input_scale"].startswith("folded into w_up"), res["down"]
        torch.testing.assert_close(qb(x), qa(x), rtol=1e-4, atol=1e-4)


def test_batch_dim_the_export_specialised_to_one_runs_row_by_row():
    """A [1]-shaped tensor input makes the export pin the example's batch of one (no guard recorded): the
    calibration batches of 2 rows run row by row, the same codes as those rows given one by one."""
    m = _Masked().eval()
    ex = {"input_ids": IDS, "scale": torch.ones(1)}
    ids = _batches(2, rows=2, seq=20)
    got = fxquant.compile(m, "int4wo-32@gptq", example_kwargs=ex,
                          calibration=[{"input_ids": b, "scale": torch.ones(1)} for b in ids])
    want = fxquant.compile(m, "int4wo-32@gptq", example_kwargs=ex,
                           calibration=[{"input_ids": b[i:i + 1], "scale": torch.ones(1)} for b in ids for i in range(2)])
    assert torch.equal(got.get_buffer("proj.qweight"), want.get_buffer("proj.qweight"))
    assert fxquant.report(got).results["proj"]["calibration_tokens"] == 2 * 2 * 20
