"""The VPTQ quantizer: weighted k-means (fixed point of Lloyd's step, nearest against cdist, determinism), the
data-free fit (more centroids / a residual codebook lower the error), the calibrated method on channel-imbalanced
inputs (output error below the data-free fit; perm, outliers and norm as VPTQ chooses them), parameter validation,
and the calibrate pass end to end."""
import math

import pytest
import torch

import fxquant
from fxquant.formats import vptq as fmt
from fxquant.methods import VPTQ, Stats, method_from_json, method_to_json, parse_method
from fxquant.methods import _kmeans
from fxquant.methods.vptq import fit
from fxquant.schemes import parse_scheme


def _layer(n=48, k=64, tokens=512, seed=0):
    """Weight ``[n, k]`` and Hessian stats of inputs with 4 channels 20x louder than the rest, mixed a little."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(k, generator=g))
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 20.0
    x = x @ (torch.eye(k) + 0.2 * torch.randn(k, k, generator=g) / math.sqrt(k))
    stats = Stats(k=k)
    stats.update(x, hessian=True)
    return w, x, stats


def _out_err(w, w_hat, h):
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())


def _deq(scheme, qw):
    return scheme.format.dequantize(qw)


@pytest.fixture(scope="module")
def layer():
    return _layer()


# ---- k-means ---------------------------------------------------------------------------------------------
def test_nearest_is_cdist_argmin():
    g = torch.Generator().manual_seed(0)
    p, c = torch.randn(3000, 5, generator=g), torch.randn(37, 5, generator=g)
    assert torch.equal(_kmeans.nearest(p, c), torch.cdist(p.double(), c.double()).argmin(1))


def test_kmeans_converges_to_a_fixed_point_of_lloyds_step():
    """Every centroid is the weighted mean of the points nearest to it (a plain Lloyd step changes nothing)."""
    g = torch.Generator().manual_seed(1)
    p, w = torch.randn(2000, 4, generator=g), torch.rand(2000, generator=g) + 0.1
    c, info = _kmeans.kmeans(p, 16, w, iters=300, tol=0.0, seed=3)
    a = torch.cdist(p.double(), c.double()).argmin(1)
    for j in range(16):
        sel = a == j
        assert sel.any()
        mean = (p[sel].double() * w[sel, None]).sum(0) / w[sel].sum()
        assert torch.allclose(c[j].double(), mean, atol=1e-5)
    assert info["iterations"] < 300


def test_kmeans_weights_pull_centroids():
    """One centroid for two points: it lands on the weighted mean."""
    p = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    c, _ = _kmeans.kmeans(p, 1, torch.tensor([3.0, 1.0]))
    assert torch.allclose(c, torch.tensor([[2.5, 0.0]]))


def test_kmeans_exact_with_enough_centroids_and_deterministic():
    p = torch.randn(10, 3, generator=torch.Generator().manual_seed(2)).repeat(20, 1)
    c, info = _kmeans.kmeans(p, 16, seed=5)
    assert float((p - c[_kmeans.nearest(p, c)]).abs().max()) < 1e-6  # means of 20 copies: fp32 rounding
    c2, _ = _kmeans.kmeans(p, 16, seed=5)
    assert torch.equal(c, c2)


def test_kmeans_samples_at_most_max_points():
    p = torch.randn(5000, 2, generator=torch.Generator().manual_seed(3))
    _, info = _kmeans.kmeans(p, 8, max_points=1000, iters=3)
    assert info["points"] == 1000


# ---- data-free fit ----------------------------------------------------------------------------------------
def _rel(w, scheme):
    s = parse_scheme(scheme)
    return float((s.dequantize(s.quantize(w)) - w).norm() / w.norm())


def test_more_centroids_and_a_residual_codebook_lower_the_error():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    e16, e64, e64r = _rel(w, "vptq-v4-c16"), _rel(w, "vptq-v4-c64"), _rel(w, "vptq-v4-c64-r16")
    assert e64 < e16 and e64r < e64


def test_vq_beats_scalar_rtn_at_fewer_bits():
    """2 bits of index per weight (4-dim vectors, 256 centroids) against 2-bit RTN with groups of 64 (2.5 bits)."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(5))
    s = parse_scheme("vptq-v4-c256")
    qw = s.quantize(w)
    rtn = parse_scheme("uint2wo-64")
    rq = rtn.quantize(w)
    assert 8 * qw.nbytes / w.numel() < 8 * rq.nbytes / w.numel()
    assert float((s.dequantize(qw) - w).norm()) < float((rtn.dequantize(rq) - w).norm())


def test_data_free_fit_is_deterministic_and_seeded():
    w = torch.randn(32, 40, generator=torch.Generator().manual_seed(6))
    s = parse_scheme("vptq-v4-c16-r8-o4-norm-perm")
    a, b = fit(s, w, None, VPTQ())[0], fit(s, w, None, VPTQ())[0]
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    c = fit(s, w, None, VPTQ(seed=1))[0]
    assert not torch.equal(a.tensors["centroids"], c.tensors["centroids"])


def test_norm_stores_column_min_and_range():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.1, 3, 24)
    s = parse_scheme("vptq-v4-c16-norm")
    t = s.quantize(w).tensors
    assert torch.equal(t["weight_bias"], w.amin(0).bfloat16())
    assert torch.equal(t["weight_scale"], (w.amax(0) - w.amin(0)).bfloat16())


def test_data_free_perm_orders_columns_by_energy_and_outliers_come_first():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(8))
    w[:, 5] *= 50
    w[:, 17] *= 30
    s = parse_scheme("vptq-v4-c16-o2-perm")
    qw = s.quantize(w)
    perm = fmt.from_uint16_bits(qw.tensors["perm"])
    assert perm[:2].tolist() == [5, 17]
    assert sorted(perm.tolist()) == list(range(48))
    # the two large columns have a 16-vector codebook of their own: better fitted than sharing one
    shared = parse_scheme("vptq-v4-c16").quantize(w)
    err = lambda qw_, sch: float((parse_scheme(sch).dequantize(qw_) - w)[:, [5, 17]].norm())  # noqa: E731
    assert err(qw, "vptq-v4-c16-o2-perm") < err(shared, "vptq-v4-c16")


# ---- the calibrated method --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["vptq-v4-c64", "vptq-v4-c32-r16", "vptq-v4-c32-o4-perm", "vptq-v4-c32-r8-norm-perm"])
def test_calibrated_output_error_below_data_free(layer, scheme):
    w, _, stats = layer
    s = parse_scheme(scheme)
    free = _out_err(w, s.dequantize(s.quantize(w)), stats.hessian)
    r = VPTQ().quantize(s, w, stats)
    ours = _out_err(w, s.dequantize(r.qweight), stats.hessian)
    assert ours < free, (scheme, ours, free)
    assert r.info["assignment"] in ("error feedback", "nearest")
    assert r.info["output_error_feedback"] >= 0 and r.info["output_error_nearest"] >= 0


def test_error_feedback_and_hessian_weights_each_help(layer):
    w, _, stats = layer
    s = parse_scheme("vptq-v4-c32-r16")
    errs = {}
    for name, m in {"full": VPTQ(), "no_feedback": VPTQ(error_feedback=False),
                    "unweighted": VPTQ(hessian_weighted=False, error_feedback=False)}.items():
        errs[name] = _out_err(w, s.dequantize(m.quantize(s, w, stats).qweight), stats.hessian)
    assert errs["full"] < errs["no_feedback"] < errs["unweighted"]


def test_calibrated_perm_is_by_hessian_diagonal(layer):
    w, _, stats = layer
    s = parse_scheme("vptq-v4-c16-o4-perm")
    qw = VPTQ().quantize(s, w, stats).qweight
    perm = fmt.from_uint16_bits(qw.tensors["perm"])
    assert torch.equal(perm, torch.argsort(stats.hessian.diagonal(), descending=True, stable=True))
    loud = set(torch.topk(stats.hessian.diagonal(), 4).indices.tolist())
    assert set(perm[:4].tolist()) == loud  # the outlier columns are the 4 loud channels


def test_dead_columns_get_zero_weight():
    w, x, _ = _layer(n=16, k=24)
    x[:, 3] = 0
    stats = Stats(k=24)
    stats.update(x, hessian=True)
    s = parse_scheme("vptq-v2-c256")  # enough centroids to hold a zero column exactly
    wq = s.dequantize(VPTQ().quantize(s, w, stats).qweight)
    assert float(wq[:, 3].abs().max()) < 0.05 * float(w.abs().max())


def test_method_rejects_other_formats_and_missing_hessian(layer):
    w, _, stats = layer
    with pytest.raises(ValueError, match="the VPTQ method fits the vptq format"):
        VPTQ().quantize(parse_scheme("int4wo-64"), w, stats)
    with pytest.raises(ValueError, match="method 'vptq' cannot quantize int8wo"):
        parse_scheme("int8wo@vptq")
    with pytest.raises(ValueError, match=r"VPTQ needs calibration statistics with a Hessian .* got no stats"):
        VPTQ().quantize(parse_scheme("vptq-v4-c16"), w, None)
    bad = Stats(k=10)
    bad.update(torch.randn(5, 10), hessian=True)
    with pytest.raises(ValueError, match=r"VPTQ: hessian has shape \(10, 10\)"):
        VPTQ().quantize(parse_scheme("vptq-v4-c16"), w, bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=-1), r"VPTQ.seed=-1 is not valid; valid: an integer >= 0"),
    (dict(kmeans_iters=0), r"VPTQ.kmeans_iters=0"),
    (dict(damp_percent=0), r"VPTQ.damp_percent=0 is not valid; valid: a number in \(0, 1\]"),
    (dict(block_size=0), r"VPTQ.block_size=0"),
    (dict(error_feedback="yes"), r"VPTQ.error_feedback='yes' is not valid; valid: True, False"),
])
def test_parameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VPTQ(**kwargs)


def test_method_json_round_trip():
    m = VPTQ(seed=3, kmeans_iters=10)
    assert method_from_json(method_to_json(m)) == m
    assert parse_method("vptq") == VPTQ()
    assert str(parse_scheme("vptq-v4-c16@vptq")) == "vptq-v4-c16@vptq"


# ---- the calibrate pass -----------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 24))
    with torch.no_grad():  # a few loud input channels, as in language models
        m[0].weight[:, :3] *= 8
    return m


def test_calibrate_pass_end_to_end():
    """quantize_ with calibration data: both layers quantized by the method, output error on the calibration
    data below the data-free fit's, and the packed model runs."""
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, 32, generator=g) * torch.linspace(3, 0.2, 32),) for _ in range(4)]
    x = calib[0][0]
    with torch.no_grad():
        ref = model(x)
    free = fxquant.quantize_(_mlp(), "vptq-v4-c16-o2-perm", (x,))
    calibrated = fxquant.quantize_(model, "vptq-v4-c16-o2-perm@vptq", (x,), calibration=calib)
    rep = fxquant.report(calibrated)
    assert [r.method for r in rep.quantized] == ["vptq", "vptq"]
    assert all(rep.results[r.fqn]["relative_output_squared_error"] < 1 for r in rep.quantized)
    with torch.no_grad():
        out = {name: m(x) for name, m in (("calibrated", calibrated), ("free", free))}
    err = lambda name: float((out[name] - ref).norm() / ref.norm())  # noqa: E731
    assert err("calibrated") < err("free") < 1


def test_method_needs_calibration_data():
    with pytest.raises(Exception, match="need calibration data"):
        fxquant.quantize_(_mlp(), "vptq-v4-c16@vptq", (torch.randn(2, 32),))
