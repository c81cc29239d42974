"""``fxquant.quantize_``: the same plan as ``fxquant.compile``, lowered into the user's module tree.

Oracle: ``compile`` on a copy of the same model with the same spec and example (same report, same
outputs bit for bit: both emits call the same op on the same packed tensors)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.modules import PackedWeight, QuantizedLinear
from helpers import rel
from passes.test_match import Patterns
from test_compile import EVERY_FAMILY, ISSUE_SPEC


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def both(model, spec, args=(), kwargs=None, **kw):
    """``(compile(copy), quantize_(model))``: the graph emit of an untouched copy, and the model itself."""
    qm = fxquant.compile(copy.deepcopy(model), spec, args, kwargs, **kw)
    out = fxquant.quantize_(model, spec, args, kwargs, **kw)
    assert out is model
    return qm, model


def state(model):
    """Everything a user could see change: tensor objects, values, dtypes and module types."""
    sd = model.state_dict(keep_vars=True)
    return ({k: id(v) for k, v in sd.items()}, {k: v.detach().clone() for k, v in sd.items()},
            [(n, type(m)) for n, m in model.named_modules()], set(vars(model)))


def assert_state_equal(a, b):
    assert a[0] == b[0] and a[2] == b[2] and a[3] == b[3]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_same_report_and_outputs_as_compile(tiny_llama_model, ids):
    qm, m = both(tiny_llama_model, ISSUE_SPEC, (ids,))
    assert fxquant.report(m) == fxquant.report(qm)
    assert "TOTAL (13/15 quantized)" in str(fxquant.report(m))
    with torch.no_grad():
        for shape in [(2, 16), (1, 1), (3, 7)]:
            x = torch.randint(0, 512, shape)
            assert torch.equal(m(x), qm(x)), shape
    assert isinstance(m.model.layers[1].mlp.up_proj, QuantizedLinear)
    assert type(m.model.layers[1].mlp.down_proj) is nn.Linear  # skipped by its rule


@pytest.mark.parametrize("frontend", ["export", "fx"])
@pytest.mark.parametrize("scheme", ["int8wo", "int4wo-32", "nf4"])
def test_every_site_kind(frontend, scheme):
    """nn.Linear -> QuantizedLinear; F.linear, x @ W.t(), addmm(b, x, W_kn), addmm(b, x, W.t()) ->
    PackedWeight parameters routing to the op; outputs equal compile's bit for bit."""
    torch.manual_seed(0)
    m = Patterns()
    x = torch.randn(2, 5, 32)
    qm, m = both(m, scheme, (x,), frontend=frontend)
    assert fxquant.report(m) == fxquant.report(qm)
    assert all(r.status == "quantized" for r in fxquant.report(m).rows)
    assert isinstance(m.lin, QuantizedLinear)
    for name in ("w_fn", "w_t", "w_kn", "w_addmm"):
        p = getattr(m, name)
        assert isinstance(p, nn.Parameter) and isinstance(p, PackedWeight) and p.float_data is None, name
    assert m.w_kn.shape == (32, 64) and m.w_kn.transposed  # stored [in, out], as the float one was
    x2 = torch.randn(3, 4, 32)
    with torch.no_grad():
        assert torch.equal(m(x2), qm(x2))


def test_float_weights_are_released(tiny_llama_model, ids):
    """No quantized site's float storage is left in the model, except the tied embedding's (once)."""
    storages = {n: p.untyped_storage().data_ptr() for n, p in tiny_llama_model.named_parameters()}
    embed = tiny_llama_model.model.embed_tokens.weight
    fxquant.quantize_(tiny_llama_model, "int8wo", (ids,))
    left = {p.untyped_storage().data_ptr() for p in tiny_llama_model.parameters() if type(p) is nn.Parameter}
    quantized = {f"{r.fqn}.weight" for r in fxquant.report(tiny_llama_model).quantized} - {"lm_head.weight"}
    assert not {storages[n] for n in quantized} & left
    assert tiny_llama_model.model.embed_tokens.weight is embed  # the tied float weight, kept once
    assert isinstance(tiny_llama_model.lm_head, QuantizedLinear)
    assert "float weight kept" in fxquant.report(tiny_llama_model).row("lm_head").reason


def test_functional_tied_weight_keeps_float_for_other_uses():
    """A parameter used by F.embedding and by F.linear: the linear runs packed, the embedding on the
    kept float tensor, as compile's graph does."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(100, 64) / 8)

        def forward(self, ids):
            return F.linear(F.embedding(ids, self.w), self.w)

    m = Tied()
    ids = torch.randint(0, 100, (2, 7))
    qm, m = both(m, "int8wo", (ids,))
    assert fxquant.report(m) == fxquant.report(qm)
    assert isinstance(m.w, PackedWeight) and m.w.float_data is not None
    with torch.no_grad():
        assert torch.equal(m(ids), qm(ids))


def test_linear_subclass_keeps_its_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(Scaled(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(3, 64)
    qm, m = both(m, "int8wo", (x,))
    assert type(m[0]) is Scaled and isinstance(m[0].weight, PackedWeight)  # the subclass's forward still runs
    assert isinstance(m[2], QuantizedLinear)
    assert torch.equal(m(x), qm(x))


class _TransposeSpellings(nn.Module):
    """``x @ W.T`` in every spelling a model uses (Falcon's ``FalconLinear``: ``input @ self.weight.T``,
    which torch.export records as ``aten.numpy_T``), plus a Falcon-like nn.Linear subclass."""

    class WeightT(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(32, 32) / 6) for _ in range(6)])
        self.sub = self.WeightT(32, 32)

    def forward(self, x):
        w = self.ws
        x = x @ w[0].T
        x = x @ w[1].mT
        x = x @ w[2].swapaxes(0, 1)
        x = x @ w[3].adjoint()
        x = torch.matmul(x, w[4].permute(-1, -2))
        x = x @ torch.transpose(w[5], 1, 0)
        return self.sub(x)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_every_transpose_spelling_is_a_site(frontend):
    torch.manual_seed(0)
    m = _TransposeSpellings()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        ref = m(x)
    qm, m = both(m, "int8wo", (x,), frontend=frontend)
    rows = fxquant.report(m).rows
    assert len(rows) == 7 and all(r.status == "quantized" for r in rows), fxquant.report(m)
    assert fxquant.report(m) == fxquant.report(qm)
    assert all(isinstance(p, PackedWeight) for p in m.ws) and isinstance(m.sub.weight, PackedWeight)
    with torch.no_grad():
        assert torch.equal(m(x), qm(x))
        assert rel(m(x), ref) < 0.02  # int8 weights, per-channel scales

def test_module_called_twice_and_shared_module():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(64, 64)
            self.alias = self.l  # the same module at two paths

        def forward(self, x):
            return self.alias(torch.relu(self.l(x)))

    m = Twice()
    x = torch.randn(2, 64)
    qm, m = both(m, "int8wo", (x,))
    assert fxquant.report(m) == fxquant.report(qm)
    assert m.l is m.alias and isinstance(m.l, QuantizedLinear)
    assert torch.equal(m(x), qm(x))


def test_every_format_family_in_place(tiny_llama_model, ids):
    spec = fxquant.Spec(skip=["lm_head"], rules=EVERY_FAMILY)
    qm, m = both(tiny_llama_model, spec, (ids,))
    assert fxquant.report(m) == fxquant.report(qm)
    with torch.no_grad():
        assert torch.equal(m(ids), qm(ids))


@pytest.mark.parametrize("bad, exc, match", [
    ("int5wo-7x", ValueError, "unknown scheme 'int5wo-7x'"),
    ({"default": "int8wo", "skip": ["re:("]}, ValueError, "invalid regular expression"),
    ({"default": "int8wo", "rules": {"layers.*": "nope"}}, ValueError, r"Spec.rules\['layers.\*'\]: unknown scheme"),
    ({"default": "int8wo", "colour": 1}, ValueError, "unknown keys"),
])
def test_bad_spec_leaves_model_untouched(tiny_llama_model, ids, bad, exc, match):
    before = state(tiny_llama_model)
    with pytest.raises(exc, match=match):
        fxquant.quantize_(tiny_llama_model, bad, (ids,))
    assert_state_equal(before, state(tiny_llama_model))


def test_bad_frontend_and_bad_example_leave_model_untouched(tiny_llama_model, ids):
    before = state(tiny_llama_model)
    with pytest.raises(ValueError, match="frontend='onnx' is not valid"):
        fxquant.quantize_(tiny_llama_model, "int8wo", (ids,), frontend="onnx")
    with pytest.raises(Exception):
        fxquant.quantize_(tiny_llama_model, "int8wo", (torch.randn(2, 3, 4),), frontend="export")
    assert_state_equal(before, state(tiny_llama_model))


def test_not_a_module_and_already_quantized(tiny_llama_model, ids):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        fxquant.quantize_(lambda x: x, "int8wo", (ids,))
    fxquant.quantize_(tiny_llama_model, "int8wo", (ids,))
    with pytest.raises(ValueError, match="already quantized by fxquant.quantize_"):
        fxquant.quantize_(tiny_llama_model, "int4wo-64", (ids,))
    with pytest.raises(ValueError, match="already quantized"):
        fxquant.compile(tiny_llama_model, "int4wo-64", (ids,))
    qm = fxquant.compile(copy.deepcopy(Patterns()), "int8wo", (torch.randn(2, 5, 32),))
    with pytest.raises(ValueError, match="GraphModule fxquant.compile returned"):
        fxquant.quantize_(qm, "int8wo", (torch.randn(2, 5, 32),))


def test_report_of_unquantized_model_says_how():
    with pytest.raises(ValueError, match="fxquant.quantize_ converted"):
        fxquant.report(nn.Linear(4, 4))


@pytest.mark.parametrize("model_name", ["llama", "patterns"])
def test_torch_compile_fullgraph_no_graph_break(tiny_llama_model, ids, model_name):
    torch._dynamo.reset()
    if model_name == "llama":
        m, x, spec = tiny_llama_model, ids, fxquant.Spec(default="int4wo-64", rules={"re:.*self_attn.*": "int8wo"})
    else:
        torch.manual_seed(0)
        m, x, spec = Patterns(), torch.randn(2, 5, 32), "int8wo"
    fxquant.quantize_(m, spec, (x,))
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-5, atol=1e-5)


def test_dtype_and_device_moves_keep_the_packed_layout(tiny_llama_model, ids):
    torch.manual_seed(0)
    m = Patterns()
    x = torch.randn(2, 5, 32)
    fxquant.quantize_(m, "int4wo-32", (x,))
    fxquant.quantize_(tiny_llama_model, "nf4", (ids,))
    packed_before = {k: v.dtype for k, v in m.lin.named_buffers()}
    y32 = m(x)
    m.to(torch.bfloat16)
    assert {k: v.dtype for k, v in m.lin.named_buffers()} == packed_before
    assert m.lin.bias.dtype == torch.bfloat16 and m.w_fn.dtype == torch.bfloat16
    assert isinstance(m.w_fn, PackedWeight)
    y16 = m(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and rel(y16.float(), y32) < 0.02
    m.to("cpu")
    tiny_llama_model.to(torch.bfloat16)
    assert tiny_llama_model(ids).dtype == torch.bfloat16


def test_packed_weight_other_uses_run_on_dequantized_weight():
    """An operation the plan did not see (not a linear) still computes right, on the dequantized
    weight, with a warning; the op's own dequantization is the oracle."""
    torch.manual_seed(0)
    m = Patterns()
    x = torch.randn(2, 5, 32)
    fxquant.quantize_(m, "int8wo", (x,))
    from fxquant.modules import _dequantize

    with pytest.warns(UserWarning, match="not a linear use of a packed weight"):
        s = m.w_fn.sum()
    assert torch.allclose(s, _dequantize(m.w_fn.packed).sum(), atol=1e-4)


def test_quantized_linear_weight_reads_as_the_float_weight():
    """Model code reads ``layer.weight`` (T5: ``hidden.to(self.wo.weight.dtype)``; others: ``.shape``,
    ``F.linear(x, layer.weight)``): a PackedWeight with the float weight's shape and dtype, following
    dtype casts of the module, and no parameter or state-dict entry of its own."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    fxquant.quantize_(m, "int8wo", (x,))
    layer = m[0]
    w = layer.weight
    assert isinstance(w, PackedWeight) and w.shape == (32, 64) and w.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(F.linear(x, w, layer.bias), layer(x))
        assert torch.equal(w.dense(), layer.dequantize().to(torch.bfloat16))
    assert set(layer.state_dict()) == {*layer.tensor_names, "bias"} and "weight" not in layer.tensor_names
    layer.float()
    assert layer.weight.dtype == torch.float32 and layer.bias.dtype == torch.float32
    with pytest.raises(KeyError, match="weight"):
        layer.weight = nn.Parameter(torch.zeros(32, 64))


def test_report_notes_layers_that_grow():
    """A layer with few output rows padded to int4wo's 64-row tiles takes more bytes than its float
    weight (a MoE router, a classifier): the report's notes name it; int8wo (no row tiles) does not."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    for scheme, grows in [("int4wo-64", True), ("int8wo", False)]:
        m = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4)).to(torch.bfloat16)
        rep = fxquant.report(fxquant.quantize_(m, scheme, (x,)))
        small = next(r for r in rep.rows if r.shape == (4, 256))
        assert (small.bytes_after > small.bytes_before) == grows
        noted = [n for n in rep.notes if "larger than in float" in n]
        assert len(noted) == grows and (not grows or "1 (4x256" in noted[0]), rep.notes


def test_reports_are_equal_but_for_times_and_differ_on_a_decision(tiny_llama_model, ids):
    """Report equality compares every decision and result but the measured quantization times."""
    qm, m = both(tiny_llama_model, "int8wo", (ids,))
    a, b = fxquant.report(m), fxquant.report(qm)
    assert a.results and all(r["quantization_time"] > 0 for r in a.results.values())
    b.results = {k: {**r, "quantization_time": r["quantization_time"] + 1.0} for k, r in b.results.items()}
    assert a == b
    b.rows[0].scheme = "int4wo-64"
    assert a != b


class _Head(nn.Module):
    """nn.Linear sites plus a parameter used through F.linear (a PackedWeight after quantize_)."""

    def __init__(self, seed: int, head_dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.w = nn.Parameter(torch.randn(32, 64) * 0.1)
        self.head = nn.Linear(32, 8).to(head_dtype)

    def forward(self, x):
        y = F.linear(self.b(self.a(x)), self.w)
        return self.head(y.to(self.head.weight.dtype)).float()


def test_load_state_dict_copies_packed_weights_and_refuses_floats():
    """load_state_dict between two models quantized alike copies the packed tensors of every site kind
    (QuantizedLinear buffers, PackedWeight parameters); a float tensor or an in-place op on a packed
    weight raises instead of writing into a temporary copy."""
    x = torch.randn(3, 64)
    a, b = _Head(0), _Head(1)
    for m in (a, b):
        fxquant.quantize_(m, "int8wo", (x,))
    assert isinstance(b.w, PackedWeight) and not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError, match="cannot copy a Tensor of dtype torch.float32 into a packed weight"):
        b.load_state_dict({**a.state_dict(), "w": torch.randn(32, 64)})
    with torch.no_grad(), pytest.raises(RuntimeError, match="would modify a packed weight in place"):
        b.w.mul_(2)
    assert torch.equal(a(x), b(x))


def test_pickle_deepcopy_and_torch_load_of_quantized_models(tmp_path):
    """torch.save / torch.load of the whole model (both site kinds) and of its state dict (weights_only),
    and copy.deepcopy, give a model that computes the same, with storage of its own."""
    x = torch.randn(3, 64)
    m = _Head(0)
    fxquant.quantize_(m, "int4wo-32", (x,))
    want = m(x)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(loaded.a, QuantizedLinear) and isinstance(loaded.w, PackedWeight)
    assert isinstance(loaded.w, nn.Parameter) and torch.equal(loaded(x), want)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    other = _Head(1)
    fxquant.quantize_(other, "int4wo-32", (x,))
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(other(x), want)
    twin = copy.deepcopy(m)
    assert torch.equal(twin(x), want)
    assert twin.w.packed_qweight.data_ptr() != m.w.packed_qweight.data_ptr()
    twin.a.qweight.zero_()
    assert torch.equal(m(x), want)


def test_float64_layers_stay_float_with_the_reason():
    """A layer fxquant does not quantize by dtype (float64) stays float, named in the report, and the
    rest of the model is quantized: no error half-way through the conversion."""
    x = torch.randn(3, 64)
    m = _Head(0, head_dtype=torch.float64)
    fxquant.quantize_(m, "int8wo", (x,))
    row = fxquant.report(m).row("head")
    assert row.status == "skipped" and "torch.float64" in row.reason and "float32, bfloat16, float16" in row.reason
    assert isinstance(m.a, QuantizedLinear) and type(m.head) is nn.Linear and m.head.weight.dtype == torch.float64
    m(x)


def test_a_quantize_that_packed_nothing_can_be_run_again():
    x = torch.randn(3, 64)
    m = _Head(0)
    fxquant.quantize_(m, fxquant.Spec(default=None), (x,))
    assert not fxquant.report(m).quantized
    fxquant.quantize_(m, "int8wo", (x,))
    assert isinstance(m.a, QuantizedLinear) and len(fxquant.report(m).quantized) == 4


class _Untraceable(nn.Module):
    """Neither export (on a wrong example) nor FX (data-dependent branch) can trace it."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(16, 32), nn.Linear(32, 8)

    def forward(self, input_ids=None, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return self.proj(h if h.max() > 0 else -h)


def test_a_wrong_example_raises_the_models_own_error():
    """A misspelt keyword on a model FX cannot trace either: the model's own error, no silent fallback
    to the modules front end, nothing changed; with no example at all the modules front end is used."""
    model = _Untraceable()
    before = state(model)
    with pytest.raises(ValueError, match="the model fails on the example inputs .*unexpected keyword argument .input_idz."):
        fxquant.quantize_(model, "int8wo", example_kwargs=dict(input_idz=torch.ones(1, 4, dtype=torch.long)))
    assert_state_equal(before, state(model))
    fxquant.quantize_(model, "int8wo")
    assert fxquant.report(model).frontend == "modules" and isinstance(model.proj, QuantizedLinear)
