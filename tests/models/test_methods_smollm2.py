"""The algorithms on SmolLM2-135M's real weights and real activations (English text through the model):
GPTQ and AWQ below RTN in output error, HQQ below RTN in weight error, the calibrated OneBit below its
SVID init, and the calibrate pass end to end on the real model (both emits agree)."""
import copy
import warnings

import pytest
import torch

import fxquant
from fxquant.methods import AWQ, GPTQ, HQQ, OneBit, Stats
from fxquant.schemes import parse_scheme



pytestmark = pytest.mark.models

TEXT = ("The history of the printing press shows how a single machine changed the way knowledge moved. "
        "Before it, books were copied by hand, slowly and at great cost; after it, pamphlets, newspapers "
        "and scientific papers spread across countries within weeks. Readers multiplied, languages were "
        "standardised, and arguments that had been confined to a few scholars became public debates.")
LAYERS = ["model.layers.3.self_attn.q_proj", "model.layers.11.mlp.down_proj", "model.layers.20.mlp.up_proj"]


@pytest.fixture(scope="module")
def captured(smollm2):
    """(weight, Stats with H) of a few real layers, inputs captured on English text."""
    model, tok = smollm2
    ids = tok(TEXT * 3, return_tensors="pt").input_ids[:, :256]
    stats, hooks = {}, []
    for name in LAYERS:
        mod = model.get_submodule(name)
        stats[name] = Stats(mod.in_features)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: stats[n].update(a[0], hessian=True)))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: (model.get_submodule(n).weight.detach().float(), stats[n]) for n in LAYERS}


def _out_err(w, wq, h):
    d = w - wq
    return float(((d @ h) * d).sum())


@pytest.mark.parametrize("scheme", ["int4wo-64", "uint3wo-64", "int4wo-128"])
def test_gptq_awq_below_rtn_on_real_layers(captured, scheme):
    s = parse_scheme(scheme)
    for name, (w, st) in captured.items():
        rtn = _out_err(w, s.dequantize(s.quantize(w)), st.hessian)
        gptq = _out_err(w, s.dequantize(GPTQ().quantize(s, w, st).qweight), st.hessian)
        r = AWQ().quantize(s, w, st)
        wq = s.dequantize(r.qweight)
        awq = _out_err(w, wq if r.input_scale is None else wq / r.input_scale, st.hessian)
        assert gptq < rtn and awq < rtn, (name, rtn, gptq, awq)


def test_hqq_below_rtn_in_weight_error(captured):
    for scheme in ["uint4wo-64", "uint3wo-64", "uint2wo-32-axis0"]:
        s = parse_scheme(scheme)
        for name, (w, _) in captured.items():
            rtn = (w - s.dequantize(s.quantize(w))).norm()
            hqq = (w - s.dequantize(HQQ().quantize(s, w).qweight)).norm()
            assert hqq < rtn, (scheme, name)


@pytest.mark.slow  # CI time: ~2 min / ~1 min on 2 cores
def test_onebit_below_its_init_on_real_layers(captured):
    s = parse_scheme("onebit")
    for name, (w, st) in captured.items():
        init = _out_err(w, s.dequantize(s.quantize(w)), st.hessian)
        fit = _out_err(w, s.dequantize(OneBit(iters=3).quantize(s, w, st).qweight), st.hessian)
        assert fit < init, name


@pytest.mark.slow  # CI time: ~2 min / ~1 min on 2 cores
def test_calibrated_spec_on_the_real_model_both_emits(smollm2):
    model, tok = smollm2
    enc = tok([TEXT, TEXT[:120]], return_tensors="pt", padding=True)
    batches = [{"input_ids": enc.input_ids[i:i + 1, :64]} for i in range(2)]
    spec = fxquant.Spec(default=None, rules={"re:model.layers.[01].self_attn.[qkv]_proj": "int4wo-64@awq",
                                             "re:model.layers.[01].mlp.*": "int4wo-128@gptq",
                                             r"re:model\.layers\.2\..*": "uint3wo-64@hqq"})
    ids = enc.input_ids[:1, :32]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = fxquant.compile(model, spec, example_kwargs={"input_ids": ids, "use_cache": False},
                             calibration=batches)
        m2 = copy.deepcopy(model)
        fxquant.quantize_(m2, spec, example_kwargs={"input_ids": ids}, calibration=batches)
    rep = fxquant.report(m2)
    assert fxquant.report(qm) == rep
    assert len(rep.quantized) == 2 * 3 + 2 * 3 + 7
    res = rep.results["model.layers.1.self_attn.q_proj"]
    assert res["method"] == "awq" and res["awq_input_scale"].startswith("folded into model.layers.1.input_layernorm")
    assert rep.results["model.layers.0.mlp.down_proj"]["method"] == "gptq"
    with torch.no_grad():
        a = qm(input_ids=ids, use_cache=False)
        b = m2(input_ids=ids, use_cache=False).logits
    a = a[0] if isinstance(a, tuple) else a.logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
