"""OneBit (calibrated method) on the ``onebit`` format: output error below the SVID init on
heavy-tailed, channel-imbalanced inputs, every option on and off, stored buffers decode to what the
method reports, determinism, parameter validation, missing statistics, unsupported schemes."""
import itertools
import math

import pytest
import torch

import fxquant.methods.onebit as onebit_method
from fxquant.formats import onebit as fmt
from fxquant.methods import OneBit, Stats, method_from_json, method_to_json, parse_method
from fxquant.schemes import Int4WeightOnly, Int8WeightOnly, parse_scheme
from fxquant.schemes import OneBit as OneBitScheme


def _layer(n=48, k=80, tokens=384, seed=0):
    """Weight ``[n, k]`` and the stats of inputs ``X`` ``[tokens, k]``: Student-t-like heavy tails
    (a Gaussian over the square root of a uniform), 4 channels 25x louder than the rest, mixed a
    little so that ``H = XᵀX`` is not diagonal."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(k, generator=g))
    x = torch.randn(tokens, k, generator=g) / torch.rand(tokens, k, generator=g).clamp(min=0.05).sqrt()
    x[:, torch.randperm(k, generator=g)[:4]] *= 25.0
    x = x @ (torch.eye(k) + 0.2 * torch.randn(k, k, generator=g) / math.sqrt(k))
    stats = Stats(k=k)
    stats.update(x, hessian=True)
    return w, x, stats


def _out_err(w, w_hat, h):
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())


@pytest.fixture(scope="module")
def layer():
    return _layer()


@pytest.fixture(scope="module")
def init(layer):
    """The plain ``onebit`` scheme's SVID init and its output error."""
    w, _, stats = layer
    w0 = OneBitScheme().dequantize(OneBitScheme().quantize(w))
    return w0, _out_err(w, w0, stats.hessian)


# ---- error ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("imp,bal,iters", list(itertools.product([True, False], [True, False], [0, 3])))
def test_output_error_below_svid_init(layer, init, imp, bal, iters):
    w, _, stats = layer
    _, e_init = init
    res = OneBit(iters=iters, use_importance_scaling=imp, use_balancing=bal).quantize(OneBitScheme(), w, stats)
    e = _out_err(w, OneBitScheme().dequantize(res.qweight), stats.hessian)
    assert not res.info["fallback"]
    assert e < e_init
    if iters:  # the refinement (least squares + sign sweeps) is where most of the gain is
        assert e < 0.5 * e_init
    assert res.info["init_output_squared_error"] == pytest.approx(e_init, rel=1e-4)
    assert res.info["output_squared_error"] == pytest.approx(e, rel=1e-4)


def test_options_change_the_init(layer):
    """With iters=0 each option gives a different fit (importance scaling is applied after balancing,
    so balancing does not absorb it)."""
    w, _, stats = layer
    results = {}
    for imp, bal in itertools.product([True, False], [True, False]):
        qw = OneBit(iters=0, use_importance_scaling=imp, use_balancing=bal).quantize(OneBitScheme(), w, stats).qweight
        results[imp, bal] = torch.cat([qw.tensors["a"].float(), qw.tensors["b"].float()])
    for p, q in itertools.combinations(results, 2):
        assert not torch.equal(results[p], results[q]), (p, q)


def test_refinement_is_monotone_and_more_iters_help(layer):
    w, _, stats = layer
    r3 = OneBit(iters=3).quantize(OneBitScheme(), w, stats).info
    r8 = OneBit(iters=8).quantize(OneBitScheme(), w, stats).info
    hist = r8["refine_objective_history"]
    assert len(hist) == 9 and all(b <= a * (1 + 1e-5) for a, b in zip(hist, hist[1:]))
    assert r8["output_squared_error"] < r3["output_squared_error"]
    assert r8["objective"] == "full hessian" and r8["sign_flips"] > 0


def test_balancing_parameters_take_effect(layer):
    w, _, stats = layer
    info = OneBit(iters=0, balance_iters=20).quantize(OneBitScheme(), w, stats).info
    (row0, row1), (col0, col1) = info["balance_row_log_spread"], info["balance_col_log_spread"]
    assert row1 < 0.1 * row0 and col1 < 0.1 * col0
    damped = OneBit(iters=0, balance_iters=1, balance_alpha=0.25).quantize(OneBitScheme(), w, stats).info
    assert damped["balance_row_log_spread"][1] > row1
    # over-relaxation far past 2 oscillates; the clamp keeps it finite and the result is still valid
    wild = OneBit(iters=2, balance_alpha=100.0).quantize(OneBitScheme(), w, stats)
    assert math.isfinite(wild.info["output_squared_error"])
    assert wild.info["output_squared_error"] <= wild.info["init_output_squared_error"]


def test_diagonal_objective_for_large_layers(layer, init, monkeypatch):
    """Above the cost budget the refinement uses diag(H); still below the init."""
    w, _, stats = layer
    monkeypatch.setattr(onebit_method, "FULL_HESSIAN_MAX_FLOPS", 0)
    res = OneBit(iters=4).quantize(OneBitScheme(), w, stats)
    assert res.info["objective"] == "hessian diagonal" and res.info["sign_flips"] == 0
    assert _out_err(w, OneBitScheme().dequantize(res.qweight), stats.hessian) < init[1]


# ---- stored buffers -------------------------------------------------------------------------------------
def test_stored_buffers_decode_to_the_reported_weight(layer):
    w, x, stats = layer
    scheme = OneBitScheme()
    res = OneBit(iters=3).quantize(scheme, w, stats)
    qw, ref = res.qweight, scheme.quantize(w)
    assert (qw.op, qw.attrs, qw.out_features, qw.in_features) == (ref.op, ref.attrs, ref.out_features, ref.in_features)
    assert list(qw.tensors) == list(ref.tensors) == ["sign_bits", "a", "b"]
    for name, t in qw.tensors.items():
        assert t.dtype == ref.tensors[name].dtype and t.shape == ref.tensors[name].shape, name
    assert qw.nbytes == fmt.nbytes(*w.shape)
    w_hat = scheme.dequantize(qw)
    signs = fmt.unpack_signs(qw.tensors["sign_bits"], w.shape[1]).float()
    assert torch.equal(w_hat, signs * qw.tensors["a"].float()[:, None] * qw.tensors["b"].float()[None, :])
    # the errors in info are those of exactly this decoded weight, on the calibration data
    y, y_hat = x @ w.T, x @ w_hat.T
    rel = float((y - y_hat).double().square().sum() / y.double().square().sum())
    assert res.info["relative_output_squared_error"] == pytest.approx(rel, rel=1e-3)
    assert res.info["output_squared_error"] == pytest.approx(_out_err(w, w_hat, stats.hessian), rel=1e-4)
    werr = float((w - w_hat).double().square().sum())
    assert res.info["weight_squared_error"] == pytest.approx(werr, rel=1e-5)
    assert res.info["mean_output_squared_error"] == pytest.approx(res.info["output_squared_error"] / (stats.tokens * w.shape[0]))
    # and the buffers repack to themselves through the format's one packing path
    repacked = fmt.pack(signs, qw.tensors["a"], qw.tensors["b"])
    assert all(torch.equal(repacked[n], qw.tensors[n]) for n in qw.tensors)


def test_format_quantize_goes_through_pack(layer):
    """The format's round-to-nearest quantize is pack(W, a, b) of its SVID vectors."""
    w = layer[0]
    _, b = fmt.svid(w)
    b = b.to(fmt.SCALE_DTYPE)
    expected = fmt.pack(w, fmt.fit_a(w, b), b)
    got = fmt.quantize(w)
    assert all(torch.equal(got[n], expected[n]) for n in ("sign_bits", "a", "b"))
    with pytest.raises(ValueError, match="must be"):
        fmt.pack(w, b, b)


def test_fallback_to_the_init_when_the_fit_is_worse(layer, init, monkeypatch):
    w, _, stats = layer

    def bad_refine(w, sign, a, b, h, iters):
        return a, torch.linspace(0.1, 3.0, b.numel()), sign, {}

    monkeypatch.setattr(onebit_method, "_refine_full", bad_refine)
    res = OneBit(iters=1).quantize(OneBitScheme(), w, stats)
    assert res.info["fallback"] and "fallback_reason" in res.info
    ref = OneBitScheme().quantize(w)
    assert all(torch.equal(res.qweight.tensors[n], ref.tensors[n]) for n in ref.tensors)
    assert res.info["output_squared_error"] == res.info["init_output_squared_error"]


def test_zero_hessian_keeps_the_init(layer):
    w = layer[0]
    stats = Stats(k=w.shape[1], tokens=5, hessian=torch.zeros(w.shape[1], w.shape[1]))
    res = OneBit().quantize(OneBitScheme(), w, stats)
    ref = OneBitScheme().quantize(w)
    assert res.info["fallback"] and all(torch.equal(res.qweight.tensors[n], ref.tensors[n]) for n in ref.tensors)


def test_deterministic(layer):
    w, _, stats = layer
    r1 = OneBit(iters=3).quantize(OneBitScheme(), w, stats)
    r2 = OneBit(iters=3).quantize(OneBitScheme(), w.clone(), Stats(k=stats.k, tokens=stats.tokens,
                                                                        hessian=stats.hessian.clone()))
    assert all(torch.equal(r1.qweight.tensors[n], r2.qweight.tensors[n]) for n in r1.qweight.tensors)
    assert r1.info["output_squared_error"] == r2.info["output_squared_error"]


def test_bf16_weight(layer):
    w, _, stats = layer
    res = OneBit(iters=2).quantize(OneBitScheme(), w.bfloat16(), stats)
    assert res.info["output_squared_error"] < res.info["init_output_squared_error"]


# ---- parameters and errors ------------------------------------------------------------------------------
def test_defaults_and_registration():
    m = OneBit()
    assert (m.iters, m.use_importance_scaling, m.use_balancing, m.balance_iters, m.balance_alpha) == (10, True, True, 40, 1.0)
    assert OneBit.name == "onebit" and OneBit.needs_data and OneBit.needs_hessian
    assert parse_method("onebit") == m and method_to_json(m) == "onebit"
    custom = OneBit(iters=3, use_balancing=False, balance_iters=0)
    assert method_from_json(method_to_json(custom)) == custom
    assert str(parse_scheme("onebit@onebit")) == "onebit@onebit"


@pytest.mark.parametrize("kwargs,field", [
    (dict(iters=-1), "iters"), (dict(iters=1.5), "iters"), (dict(iters=True), "iters"),
    (dict(balance_iters=0), "balance_iters"), (dict(balance_iters=2.0), "balance_iters"),
    (dict(balance_alpha=0), "balance_alpha"), (dict(balance_alpha=-1.0), "balance_alpha"),
    (dict(balance_alpha=float("nan")), "balance_alpha"), (dict(balance_alpha=float("inf")), "balance_alpha"),
    (dict(use_importance_scaling=1), "use_importance_scaling"), (dict(use_balancing="yes"), "use_balancing"),
])
def test_bad_parameters(kwargs, field):
    with pytest.raises(ValueError, match=rf"OneBit\.{field}=.*valid:"):
        OneBit(**kwargs)


def test_balancing_parameters_unchecked_when_balancing_off():
    OneBit(use_balancing=False, balance_iters=0, balance_alpha=0.0)
    OneBit(iters=0, use_importance_scaling=False, use_balancing=False)
    OneBit(balance_alpha=1e-10)
    OneBit(balance_alpha=100.0)


def test_missing_statistics(layer):
    w = layer[0]
    with pytest.raises(ValueError, match="hessian"):
        OneBit().quantize(OneBitScheme(), w, None)
    with pytest.raises(ValueError, match="hessian"):
        OneBit().quantize(OneBitScheme(), w, Stats(k=w.shape[1], tokens=3))
    with pytest.raises(ValueError, match=r"\[80, 80\]"):
        OneBit().quantize(OneBitScheme(), w, Stats(k=8, tokens=3, hessian=torch.eye(8)))


def test_unsupported_schemes(layer):
    m = OneBit()
    assert m.unsupported_reason(OneBitScheme()) is None
    for scheme in (Int8WeightOnly(), Int4WeightOnly(group_size=32)):
        reason = m.unsupported_reason(scheme)
        assert reason and "onebit" in reason and str(scheme) in reason
        with pytest.raises(ValueError, match="onebit"):
            m.quantize(scheme, layer[0], layer[2])
    with pytest.raises(ValueError, match="cannot quantize"):
        parse_scheme("int8wo@onebit")
