"""Mixture-of-experts weights: transformers 5's 3-D expert parameters, quantized per expert.

Oracles: each expert's format math (``Scheme.quantize`` / ``dequantize``) applied to a float copy of
the model, the per-expert op, ``fxquant.compile`` on a copy (same decisions and outputs as
``quantize_``), and the float model's own experts implementations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant import experts
from fxquant.modules import PackedWeight
from fxquant.schemes import parse_scheme
from helpers import FAST_PATH_TOL, policy_x, rel

transformers = pytest.importorskip("transformers")

EXPERTS_ONLY = fxquant.Spec(default=None, rules={"re:.*experts.*": "int4wo-64"})


def _mixtral(dtype=torch.float32, experts=4, layers=2):
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                     num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval().to(dtype)


def _ids(rows=1, n=12, seed=5):
    return torch.randint(3, 256, (rows, n), generator=torch.Generator().manual_seed(seed))


def _fake_quantized(model, scheme: str, rows=None):
    """A float copy whose expert weights are each expert's quantized-dequantized weight (the format's math).
    Each 3-D parameter's orientation: the report row's ``E x N x K`` when given (stored ``[E, K, N]`` if
    it differs), else the experts module's ``is_transposed``."""
    s = parse_scheme(scheme)
    ref = copy.deepcopy(model)
    shapes = {r.fqn: tuple(r.shape) for r in rows or ()}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 3 and "experts" in name:
                kn = (shapes[name] != tuple(p.shape)) if name in shapes else \
                    getattr(ref.get_submodule(name.rsplit(".", 1)[0]), "is_transposed", False)
                for e in range(p.shape[0]):
                    w = p[e].float().T if kn else p[e].float()
                    d = s.dequantize(s.quantize(w))
                    p[e] = (d.T if kn else d).to(p.dtype)
    return ref


def _both_emits(model, ids):
    """``(fake-quantized float reference, compile's module, quantize_'s report)`` under EXPERTS_ONLY;
    ``model`` is quantized in place; the two reports are the same."""
    float_model = copy.deepcopy(model)
    qm = fxquant.compile(copy.deepcopy(model), EXPERTS_ONLY, example_kwargs=dict(input_ids=ids, use_cache=False))
    fxquant.quantize_(model, EXPERTS_ONLY, example_kwargs=dict(input_ids=ids))
    rep = fxquant.report(model)
    assert rep == fxquant.report(qm)
    return _fake_quantized(float_model, "int4wo-64", rep.quantized), qm, rep


@pytest.mark.parametrize("scheme", ["int4wo-64", "int8wo", "nf4", "uint3wo-32"])
def test_experts_op_is_the_per_expert_op(scheme):
    """``fxquant::<op>_experts`` on rows grouped by expert (an expert without rows, rows past the last
    end) equals the per-expert op on each group, and is close to each expert's dequantized weight."""
    s = parse_scheme(scheme)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 48, 96, generator=g)
    q = experts.stack([s.quantize(w[e]) for e in range(3)])
    x = torch.randn(10, 96, generator=g)
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)
    y = experts.grouped(x, q, offs)
    base = getattr(torch.ops.fxquant, q.op).default
    for e, (a, b) in enumerate([(0, 4), (4, 4), (4, 9)]):
        one = experts.select(q, e)
        if b > a:
            assert torch.equal(y[a:b], base(x[a:b], *one.tensors.values(), None, **one.attrs))
            ref = F.linear(policy_x(x[a:b]), s.dequantize(one))
            assert rel(y[a:b], ref) < FAST_PATH_TOL[torch.float32]
    assert torch.equal(y[9:], torch.zeros(1, 48))
    torch.library.opcheck(experts.experts_op(q), (x, offs, *q.tensors.values()), dict(q.attrs),
                          test_utils=("test_schema", "test_faketensor"))


def test_experts_op_gradient_for_x():
    """x's gradient flows through the per-expert ops (the packed weights are frozen, as in QLoRA): it equals
    the gradient through each expert's dequantized weight."""
    s = parse_scheme("int4wo-32")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 16, 64, generator=g)
    q = experts.stack([s.quantize(w[e]) for e in range(3)])
    x = torch.randn(7, 64, generator=g, requires_grad=True)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    dy = torch.randn(7, 16, generator=g)
    experts.grouped(x, q, offs).backward(dy)
    want = torch.zeros(7, 64)
    for e, (a, b) in enumerate([(0, 2), (2, 2), (2, 6)]):
        want[a:b] = dy[a:b] @ s.dequantize(experts.select(q, e))
    assert torch.allclose(x.grad, want, atol=1e-4, rtol=1e-3)


def test_experts_op_rejects_bad_offsets():
    s = parse_scheme("int8wo")
    q = experts.stack([s.quantize(torch.randn(8, 16)) for _ in range(2)])
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match="offs must be an integer \\[2\\]"):
        experts.grouped(x, q, torch.tensor([5], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        experts.grouped(x, q, torch.tensor([4, 2], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_experts_quantized_both_emits(dtype):
    """Every expert weight is a quantized site (shape E x N x K in the report), ``compile`` and
    ``quantize_`` agree exactly, and the outputs match the float model with each expert fake-quantized."""
    model = _mixtral(dtype)
    ids = _ids()
    ref, qm, rep = _both_emits(model, ids)
    rows = {r.fqn: r for r in rep.rows if r.status == "quantized"}
    assert sorted(rows) == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 192, 64)
    assert not any(n.startswith("left float") for n in rep.notes)
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(w, PackedWeight) and w.shape == (4, 192, 64) and w.dtype == dtype
    assert rep.rows[0].bytes_before > 0 and sum(r.bytes_after for r in rows.values()) < \
        sum(r.bytes_before for r in rows.values()) / 3
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(out, qm(input_ids=ids, use_cache=False).logits)
        assert rel(out, ref(ids).logits) < (1e-2 if dtype == torch.float32 else 3e-2)


def test_every_experts_implementation_runs_packed(recwarn):
    """transformers' ``grouped_mm``, ``batched_mm`` and ``eager`` experts code all run on the packed
    experts (no dequantized fallback), with the same result; generate runs with both caches."""
    model = _mixtral()
    ids = _ids(rows=2, n=9, seed=2)
    fxquant.quantize_(model, EXPERTS_ONLY, example_kwargs=dict(input_ids=_ids()))
    outs = {}
    with torch.no_grad():
        for impl in ("grouped_mm", "batched_mm", "eager"):
            model.set_experts_implementation(impl)
            outs[impl] = model(ids).logits
    assert rel(outs["batched_mm"], outs["grouped_mm"]) < 1e-5 and rel(outs["eager"], outs["grouped_mm"]) < 1e-5
    assert not [w for w in recwarn if "dequantized weight" in str(w.message)]
    model.set_experts_implementation("grouped_mm")
    dyn = model.generate(ids, max_new_tokens=4, do_sample=False)
    static = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dyn, static)


def _calib(n=4, rows=2, t=48):
    return [dict(input_ids=_ids(rows, t, 100 + i)) for i in range(n)]


@pytest.mark.parametrize("method", ["gptq", "gptq-observers", "awq"])
def test_data_methods_quantize_each_expert_from_its_rows(method):
    """GPTQ and AWQ on experts: each expert from the calibration rows routed to it (its own statistics),
    GPTQ in the sequential walk and with observers; both emits agree; the output error on each expert's
    own rows (``tr(D H Dᵀ)``, H from those rows, AWQ's input scale included) is below round-to-nearest's."""
    from fxquant.methods import AWQ, GPTQ
    from fxquant.methods._base import quadratic_error

    model = _mixtral()
    ids, calib = _ids(), _calib()
    m = {"gptq": GPTQ(), "gptq-observers": GPTQ(true_sequential=False), "awq": AWQ()}[method]
    spec = fxquant.Spec(default=None, rules={"re:.*experts.*": "int4wo-32"}, method=m)
    qm = fxquant.compile(copy.deepcopy(model), spec, example_kwargs=dict(input_ids=ids, use_cache=False),
                         calibration=calib)
    float_model = copy.deepcopy(model)
    fxquant.quantize_(model, spec, example_kwargs=dict(input_ids=ids), calibration=calib)
    rep = fxquant.report(model)
    assert rep == fxquant.report(qm) and len(rep.quantized) == 4
    res = rep.results["model.layers.0.mlp.experts.gate_up_proj"]
    assert res["method"] == m.name and sum(res["expert_tokens"]) == 4 * 2 * 48 * 2  # tokens x top-2
    assert 0 < rep.quantized[0].rel_output_error < 0.05
    with torch.no_grad():
        assert torch.equal(model(ids).logits, qm(input_ids=ids, use_cache=False).logits)
    # layer 0's experts see the float model's routing: the method's error below RTN's on each expert's rows
    rtn = parse_scheme("int4wo-32")
    cap = {}
    h = float_model.model.layers[0].mlp.experts.register_forward_pre_hook(
        lambda mod, args: cap.setdefault("x", []).append(args))
    with torch.no_grad():
        for c in calib:
            float_model(**c)
    h.remove()
    w = float_model.model.layers[0].mlp.experts.gate_up_proj.detach()
    packed = model.model.layers[0].mlp.experts.gate_up_proj
    assert (packed.input_scale is not None) == (method == "awq")
    for e in range(4):
        xs = torch.cat([x[(idx == e).any(-1)] for x, idx, _ in cap["x"]])
        hess = xs.T.float() @ xs.float()
        eff = rtn.dequantize(experts.select(packed.packed, e))
        eff = eff if packed.input_scale is None else eff / packed.input_scale[e]
        g = quadratic_error(w[e] - eff, hess)
        r = quadratic_error(w[e] - rtn.dequantize(rtn.quantize(w[e])), hess)
        assert g < r, (e, g, r)


def test_methods_that_fit_one_statistic_leave_experts_float_with_reason():
    """OneBit fits one statistic per layer: the experts stay float, the report says why and what to write
    instead; HQQ needs no data and quantizes them."""
    model = _mixtral(layers=1)
    ids = _ids()
    spec = fxquant.Spec(default="onebit@onebit", skip=["lm_head", "re:.*mlp.gate.weight"])
    fxquant.quantize_(model, spec, example_kwargs=dict(input_ids=ids), calibration=_calib(2))
    rep = fxquant.report(model)
    ex = [r for r in rep.rows if "experts" in r.fqn]
    assert len(ex) == 2 and all(r.status == "skipped" and "take rtn, hqq, gptq and awq" in r.reason
                                and "'re:.*experts.*': 'onebit'" in r.reason for r in ex)
    assert sum(r.status == "quantized" for r in rep.rows) == 4
    hqq = _mixtral(layers=1)
    fxquant.quantize_(hqq, fxquant.Spec(default=None, rules={"re:.*experts.*": "int4wo-64@hqq"}),
                      example_kwargs=dict(input_ids=ids))
    res = fxquant.report(hqq).results["model.layers.0.mlp.experts.gate_up_proj"]
    assert res["method"] == "hqq" and res["experts"] == 4


def _saved_and_loaded(model, ids, tmp_path):
    """``(fxquant.load of fxquant.save(model) into a meta skeleton, model's logits)``; the two equal."""
    fxquant.save(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = transformers.MixtralForCausalLM(model.config)
    back = fxquant.load(tmp_path / "m.safetensors", model=skeleton).eval()
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(back(ids).logits, want)
    return back, want


def test_experts_save_load_round_trip(tmp_path):
    """fxquant.save / load and transformers' save_pretrained / from_pretrained keep the packed experts bit
    for bit."""
    from fxquant.hf import FxQuantConfig

    model = _mixtral()
    ids = _ids()
    model.save_pretrained(tmp_path / "float")
    fxquant.quantize_(model, EXPERTS_ONLY, example_kwargs=dict(input_ids=ids))
    back, want = _saved_and_loaded(model, ids, tmp_path)
    qc = FxQuantConfig(spec=EXPERTS_ONLY, example_inputs=dict(input_ids=ids))
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=qc)
    q.save_pretrained(tmp_path / "q")
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    p = r.model.layers[1].mlp.experts.down_proj
    assert isinstance(p, PackedWeight) and p.shape == (4, 64, 96)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, r(ids).logits)
        assert torch.equal(r(ids).logits, want)


@pytest.mark.parametrize("arch", ["gpt_oss", "granitemoe", "qwen3_moe", "llama4"])
def test_other_moe_families(arch):
    """gpt-oss stores its experts transposed ``[E, K, N]`` with biases; GraniteMoE's forward takes
    ``use_cache`` through ``**kwargs`` (the trace binds it); Qwen3-MoE as Mixtral; Llama 4 multiplies
    every expert's tokens by ``bmm(x [E, T, K], W [E, K, N])``.  Every expert weight is quantized, both
    emits agree, the outputs follow the fake-quantized float model."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    cfgs = {"gpt_oss": ("GptOss", {**base, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                   "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}),
            "granitemoe": ("GraniteMoe", {**base, "num_local_experts": 4, "num_experts_per_tok": 2}),
            "qwen3_moe": ("Qwen3Moe", {**base, "num_experts": 4, "num_experts_per_tok": 2,
                                       "moe_intermediate_size": 64}),
            "llama4": ("Llama4", {**base, "num_local_experts": 4, "num_experts_per_tok": 1, "head_dim": 16,
                                  "intermediate_size_mlp": 96, "pad_token_id": 0})}
    name, kw = cfgs[arch]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}TextConfig" if arch == "llama4" else f"{name}Config")(**kw)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    ids = _ids()
    ref, qm, rep = _both_emits(model, ids)
    assert len(rep.quantized) == 4 and all(len(r.shape) == 3 for r in rep.quantized)
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(out, qm(input_ids=ids, use_cache=False).logits)
        assert rel(out, ref(ids).logits) < 1e-2
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_torch_compile_adds_no_graph_break():
    """``torch._dynamo.explain`` of the quantized model: one graph, as the float model (the packed experts'
    grouped matmul is one opaque op, as transformers' own float fallback is)."""
    model = _mixtral()
    ids = _ids()
    fxquant.quantize_(model, fxquant.Spec(default="int4wo-64", skip=["lm_head"]), example_kwargs=dict(input_ids=ids))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(ids)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


def test_calibration_through_kwargs_forward():
    """GraniteMoE's forward takes use_cache through ``**kwargs``: calibration batches (which quantize_ gives
    use_cache=False, as the trace bound it) run the traced graph; GPTQ quantizes every layer, experts included."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(**base)).eval()
    spec = fxquant.Spec(default="int4wo-32@gptq", skip=["lm_head"])
    fxquant.quantize_(model, spec, example_kwargs=dict(input_ids=_ids()), calibration=[dict(input_ids=_ids(2, 40, 7))])
    rep = fxquant.report(model)
    assert sorted(r.method for r in rep.quantized) == ["gptq"] * 7
    assert all(r.rel_output_error is not None for r in rep.quantized)


def test_experts_quantized_without_a_graph():
    """Where torch.export fails (``frontend="modules"``: the model's nn.Linear modules, no trace), the
    experts modules' weights are still sites: the same decisions and outputs as with the export trace
    (the routers, F.linear on a parameter, are sites of the trace only: skipped in both here)."""
    model = _mixtral()
    ids = _ids()
    traced = copy.deepcopy(model)
    spec = fxquant.Spec(default="int4wo-64", skip=["lm_head", "re:.*mlp.gate.weight"])
    fxquant.quantize_(traced, spec, example_kwargs=dict(input_ids=ids))
    fxquant.quantize_(model, spec, frontend="modules")
    rep, want = fxquant.report(model), fxquant.report(traced)
    assert rep.frontend == "modules"
    assert {r.fqn: (r.status, r.shape) for r in rep.rows if "experts" in r.fqn} == \
        {r.fqn: (r.status, r.shape) for r in want.rows if "experts" in r.fqn} and len(rep.quantized) == 12
    with torch.no_grad():
        assert torch.equal(model(ids).logits, traced(ids).logits)


def test_gptq_on_llama4_bmm_experts():
    """Llama 4's ``bmm`` experts under GPTQ: each expert's Hessian from its ``[T, K]`` slice (every token,
    scaled by its routing score), both emits equal, output error reported."""
    from fxquant.methods import GPTQ

    cfg = transformers.Llama4TextConfig(hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        vocab_size=256, num_local_experts=4, num_experts_per_tok=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    ids, calib = _ids(), _calib(2)
    for sequential in (True, False):
        spec = fxquant.Spec(default=None, rules={"re:.*experts.*": "int4wo-32"}, method=GPTQ(true_sequential=sequential))
        qm = fxquant.compile(copy.deepcopy(model), spec, example_kwargs=dict(input_ids=ids, use_cache=False),
                             calibration=calib)
        m = copy.deepcopy(model)
        fxquant.quantize_(m, spec, example_kwargs=dict(input_ids=ids), calibration=calib)
        rep = fxquant.report(m)
        assert rep == fxquant.report(qm) and [r.kind for r in rep.quantized] == ["bmm", "bmm"]
        res = rep.results["model.layers.0.feed_forward.experts.gate_up_proj"]
        assert res["method"] == "gptq" and res["expert_tokens"] == [2 * 2 * 48] * 4
        assert 0 < rep.quantized[0].rel_output_error < 0.05
        with torch.no_grad():
            assert torch.equal(m(ids).logits, qm(input_ids=ids, use_cache=False).logits)


def test_awq_expert_scales_survive_save_load(tmp_path):
    """AWQ's per-expert input scales ``[E, K]`` are part of the packed experts: fxquant.save / load and the
    eager / batched_mm implementations (which index them per expert) keep the outputs."""
    from fxquant.methods import AWQ

    model = _mixtral()
    ids = _ids()
    spec = fxquant.Spec(default=None, rules={"re:.*experts.*": "int4wo-32"}, method=AWQ())
    fxquant.quantize_(model, spec, example_kwargs=dict(input_ids=ids), calibration=_calib(2))
    w = model.model.layers[1].mlp.experts.down_proj
    assert w.input_scale is not None and w.input_scale.shape == (4, 96)
    back, want = _saved_and_loaded(model, ids, tmp_path)
    with torch.no_grad():
        for impl in ("batched_mm", "eager"):
            back.set_experts_implementation(impl)
            assert rel(back(ids).logits, want) < 1e-5


def test_compressed_tensors_export_refuses_experts(tmp_path):
    """compressed-tensors holds Linear layers: a model with packed experts is refused before any file is
    written, the error naming the tensor and what to use instead."""
    from fxquant.checkpoints.compressed_tensors import save_compressed_tensors

    model = _mixtral(layers=1)
    spec = fxquant.Spec(default="int8wo", skip=["lm_head", "re:.*mlp.gate.weight"])  # exportable 2-D layers
    fxquant.quantize_(model, spec, example_kwargs=dict(input_ids=_ids()))
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj'?: mixture-of-experts weights \(4 experts stacked\)"
                                         r".*fxquant\.save or save_pretrained"):
        save_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists() or not any((tmp_path / "ct").iterdir())


def test_sequential_walk_sees_the_quantized_experts_outputs(monkeypatch):
    """GPTQ's walk runs each quantized experts site through its experts op, as the emitted model
    does: the next layer's statistics are of exactly the emitted model's activations."""
    from fxquant.methods import Stats

    model, calib = _mixtral(), _calib(n=2, rows=1, t=24)
    seen, update = [], Stats.update
    monkeypatch.setattr(Stats, "update", lambda self, x, *a, **k: (seen.append(x.clone()), update(self, x, *a, **k)))
    spec = fxquant.Spec(default="int4wo-32@gptq", skip=["lm_head"])
    fxquant.quantize_(model, spec, example_kwargs=calib[0], calibration=calib)
    want = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: want.append(a[0].clone()))
    with torch.no_grad():
        for c in calib:
            model(**c)
    h.remove()
    # the attention groups' inputs are [1, 24, K] (router and experts rows are 2-D): per layer q/k/v
    # then o_proj, each batch in order; layer 1's q/k/v come after layer 0's experts
    attention = [x for x in seen if x.dim() == 3]
    got = attention[4:6]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert torch.equal(g.reshape(w.shape), w)
