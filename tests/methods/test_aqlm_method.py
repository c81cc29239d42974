"""The AQLM quantizer (``fxquant.methods.AQLM``) on the ``aqlm`` format: its steps against brute force and
explicit least squares, the objective never rising, determinism, the weight error against RTN at 2 bits on
structured weights, the output error with calibration, the calibrate pass end to end, parameters and refusals."""
import itertools
import math

import pytest
import torch

import fxquant
from fxquant.formats import aqlm as fmt
from fxquant.methods import AQLM, Stats, method_from_json, method_to_json
from fxquant.methods import _aqlm_search as search
from fxquant.methods import aqlm as method
from fxquant.schemes import AQLM as AQLMScheme
from fxquant.schemes import parse_scheme


def _weight(n=64, k=64, seed=0):
    """Rows of different scales and correlated columns (a real weight's structure: RTN and vector
    quantization both see it)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / math.sqrt(k)
    return (torch.randn(n, k, generator=g) @ mix) * (0.5 + torch.rand(n, 1, generator=g)) * 0.02


def _stats(k=64, tokens=512, seed=1):
    """Inputs with a few loud channels, mixed a little: a non-diagonal Hessian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 20.0
    x = x @ (torch.eye(k) + 0.2 * torch.randn(k, k, generator=g) / math.sqrt(k))
    st = Stats(k=k)
    st.update(x, hessian=True)
    return st


def _rel(w, wq):
    return float((w - wq).norm() / w.norm())


def _out(w, wq, h):
    d = (w - wq).double()
    return float(((d @ h.double()) * d).sum() / ((w.double() @ h.double()) * w.double()).sum())


# ---- the steps ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("full_a", [False, True])
def test_beam_search_with_a_full_beam_is_exhaustive(full_a):
    """With ``beam_size`` >= the number of tuples the search keeps, two codebooks of 8 entries: the minimum of
    ``Q(v) = s2 vᵀ A v - 2 vᵀ z`` over all 64 tuples, computed here by brute force; beam 1 never worse than
    the start."""
    g = torch.Generator().manual_seed(0)
    nc, e, d, p = 2, 8, 4, 50
    cb = torch.randn(nc, e, d, generator=g)
    z, s2 = torch.randn(p, d, generator=g), torch.rand(p, generator=g) + 0.5
    a = None
    if full_a:
        r = torch.randn(d, d, generator=g)
        a = r @ r.T + torch.eye(d)
    am = torch.eye(d) if a is None else a
    ea = ((cb @ am) * cb).sum(-1)
    start = torch.randint(0, e, (p, nc), generator=g)

    def q(codes):
        v = cb[0][codes[:, 0]] + cb[1][codes[:, 1]]
        return s2 * ((v @ am) * v).sum(-1) - 2 * (v * z).sum(-1)

    tuples = torch.tensor(list(itertools.product(range(e), repeat=nc)))
    best = torch.stack([q(tuples[i].expand(p, -1)) for i in range(len(tuples))], 1).min(1).values
    codes, qv = search.beam_search(cb, start, z, s2, a, ea, beam=e)
    assert torch.allclose(q(codes), best, atol=1e-4) and torch.allclose(qv, q(codes), atol=1e-4)
    one, _ = search.beam_search(cb, start, z, s2, a, ea, beam=1)
    assert (q(one) <= q(start) + 1e-5).all()


@pytest.mark.parametrize("calibrated", [False, True])
def test_codebook_update_is_the_least_squares_solution(calibrated):
    """Enough conjugate-gradient steps reach the minimiser of ``tr(D H Dᵀ)`` in the codewords, solved here from
    the explicit design matrix (every weight entry a sum of codeword entries times its row's scale)."""
    scheme = AQLMScheme(num_codebooks=2, nbits_per_codebook=3, in_group_size=4)
    w = _weight(12, 16)
    st = _stats(16, 256) if calibrated else None
    fit = method._Fit(AQLM(calibrated=calibrated, cg_iters=200), scheme, w, None if st is None else st.hessian)
    codes, cb, s = fit.init()
    new = fit.update_codebooks(codes, cb, s)
    # explicit: W_flat = D @ theta, theta = codebooks flattened [M*E*d]
    n, k, nc, e, d = 12, 16, 2, 8, 4
    design = torch.zeros(n * k, nc * e * d, dtype=torch.float64)
    for row in range(n):
        for j in range(k // d):
            for c in range(nc):
                for i in range(d):
                    design[row * k + j * d + i, (c * e + int(codes[row, j, c])) * d + i] += float(s[row])
    h = torch.eye(k, dtype=torch.float64) if fit.h is None else fit.h.double()
    big = torch.kron(torch.eye(n, dtype=torch.float64), h)  # tr(D H Dᵀ) over the flattened rows
    lhs, rhs = design.T @ big @ design, design.T @ big @ w.double().reshape(-1)
    used = lhs.diagonal() > 0  # codewords no block uses keep their values (the method's proximal term)
    theta = torch.linalg.lstsq(lhs[used][:, used], rhs[used]).solution
    got = new.reshape(-1).double()

    def f(t):
        r = w.double().reshape(-1) - design @ t
        return float(r @ big @ r)

    full = got.clone()
    full[used] = theta
    assert f(got) <= f(full) * (1 + 1e-4) + 1e-12
    assert f(got) <= f(cb.reshape(-1).double())


def test_scale_update_is_the_per_group_least_squares():
    scheme = AQLMScheme(num_codebooks=1, nbits_per_codebook=4, in_group_size=4, out_group_size=2)
    w, st = _weight(8, 16), _stats(16)
    fit = method._Fit(AQLM(calibrated=True), scheme, w, st.hessian)
    codes, cb, s = fit.init()
    new = fit.update_scales(codes, cb, s)
    v = fit.rows(fit.decode(codes, cb)).double()
    h = fit.h.double()
    for o in range(4):
        rows = slice(2 * o, 2 * o + 2)
        want = float((w.double()[rows] @ h * v[rows]).sum() / (v[rows] @ h * v[rows]).sum())
        assert float(new[o]) == pytest.approx(want, rel=1e-5)


# ---- the whole method -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["aqlm-2x8-g8", "aqlm-1x8-g4", "aqlm-2x4-g4-o2"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_objective_never_rises_and_the_result_decodes_to_what_it_reports(text, calibrated):
    s = parse_scheme(text)
    w, st = _weight(), _stats()
    res = AQLM(calibrated=calibrated, iters=3).quantize(s, w, st)
    hist = res.info["objective_history"]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(hist, hist[1:])), hist
    wq = s.dequantize(res.qweight)
    assert res.info["relative_weight_squared_error"] == pytest.approx(_rel(w, wq) ** 2, rel=1e-4)
    if calibrated:
        assert res.info["relative_output_squared_error"] == pytest.approx(_out(w, wq, st.hessian), rel=1e-3)
    assert res.info["bits_per_weight"] == 8 * res.qweight.nbytes / w.numel()


def test_deterministic_for_a_seed():
    s, w = parse_scheme("aqlm-2x6-g8"), _weight()
    a, b = AQLM(seed=3).quantize(s, w, None), AQLM(seed=3).quantize(s, w, None)
    c = AQLM(seed=4).quantize(s, w, None)
    assert all(torch.equal(a.qweight.tensors[k], b.qweight.tensors[k]) for k in a.qweight.tensors)
    assert not torch.equal(a.qweight.tensors["codebooks"], c.qweight.tensors["codebooks"])


def _rtn_errors(w):
    rtn = {g: parse_scheme(f"uint2wo-{g}") for g in (32, 64)}
    return {g: _rel(w, s.dequantize(s.quantize(w))) for g, s in rtn.items()}, rtn[64].quantize(w).nbytes


def test_beats_rtn_2bit_in_weight_error_at_fewer_bits():
    """Two bits of codes per weight (1x8-g4: 2.07 bits per weight counting every stored byte here) against
    uint2wo-64 (2.5 bits) and uint2wo-32 (3 bits)."""
    w = _weight(384, 512)
    errors, rtn_bytes = _rtn_errors(w)
    s = parse_scheme("aqlm-1x8-g4")
    qw = AQLM(iters=2).quantize(s, w, None).qweight
    assert qw.nbytes < rtn_bytes and _rel(w, s.dequantize(qw)) < min(errors.values()), errors


@pytest.mark.slow
def test_two_codebooks_and_beams():
    """2x8-g8 (2.36 bits per weight here) below both RTN errors too, and a beam of 4 no worse than 1."""
    w = _weight(384, 512)
    errors, rtn_bytes = _rtn_errors(w)
    s = parse_scheme("aqlm-2x8-g8")
    one = AQLM(beam_size=1).quantize(s, w, None).qweight
    four = AQLM(beam_size=4).quantize(s, w, None).qweight
    assert one.nbytes < rtn_bytes and _rel(w, s.dequantize(one)) < min(errors.values()), errors
    assert _rel(w, s.dequantize(four)) <= _rel(w, s.dequantize(one)) * 1.001


def test_calibration_lowers_the_output_error():
    s, w, st = parse_scheme("aqlm-2x8-g8"), _weight(), _stats()
    plain = _out(w, s.dequantize(AQLM().quantize(s, w, st).qweight), st.hessian)
    cal = _out(w, s.dequantize(AQLM(calibrated=True, damp_percent=0.01).quantize(s, w, st).qweight), st.hessian)
    rtn = parse_scheme("uint2wo-32")
    assert cal < 0.7 * plain and cal < _out(w, rtn.dequantize(rtn.quantize(w)), st.hessian)


def test_padded_groups_and_zero_rows():
    """K and N not multiples of the groups, an all-zero row: finite codes and scales, the zero row decoded as 0
    up to the fp16 scale's smallest value."""
    s = parse_scheme("aqlm-1x6-g8-o2")
    w = _weight(13, 30)
    w[4] = 0
    qw = AQLM(iters=1).quantize(s, w, None).qweight
    o, g = fmt.padded(13, 30, 2, 8)
    assert qw.tensors["codes"].shape == (o, g, 1) and bool(torch.isfinite(qw.tensors["scales"]).all())
    wq = s.dequantize(qw)
    assert wq.shape == (13, 30) and _rel(w, wq) < 0.5


def test_the_calibrate_pass_runs_it_end_to_end():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32))
    scheme = AQLMScheme(num_codebooks=1, nbits_per_codebook=6, in_group_size=8, method=AQLM(calibrated=True, iters=1))
    with pytest.raises(Exception, match="need calibration data"):
        fxquant.quantize_(m, fxquant.Spec(default=scheme), (torch.randn(2, 64),))
    calib = [torch.randn(16, 64) for _ in range(3)]
    fxquant.quantize_(m, fxquant.Spec(default=scheme), (torch.randn(2, 64),), calibration=calib)
    rep = fxquant.report(m)
    row = rep.row("0")
    assert row.scheme == "aqlm-1x6-g8@aqlm" and m[0].op_name == "linear_aqlm"
    assert rep.results["0"]["objective"] == "output error (calibrated)"


# ---- parameters and refusals ----------------------------------------------------------------------------
def test_method_round_trips_and_data_needs():
    for mth in (AQLM(), AQLM(calibrated=True, beam_size=4, seed=7)):
        assert method_from_json(method_to_json(mth)) == mth
    assert not AQLM().needs_data and AQLM(calibrated=True).needs_data and AQLM(calibrated=True).needs_hessian
    assert parse_scheme("aqlm-2x8-g8@aqlm").method == AQLM()


@pytest.mark.parametrize("kwargs,match", [
    ({"beam_size": 0}, r"AQLM.beam_size=0 .*valid: an integer >= 1"), ({"iters": -1}, "AQLM.iters=-1"),
    ({"calibrated": 1}, r"AQLM.calibrated=1 .*valid: True, False"), ({"damp_percent": float("inf")}, "damp_percent"),
    ({"kmeans_points": 0}, "kmeans_points=0"), ({"seed": -1}, "seed=-1")])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AQLM(**kwargs)


def test_refusals_name_the_problem():
    s, w = parse_scheme("aqlm-1x4-g4"), _weight(8, 16)
    with pytest.raises(ValueError, match="needs calibration statistics with the Hessian"):
        AQLM(calibrated=True).quantize(s, w, None)
    with pytest.raises(ValueError, match=r"hessian has shape \(8, 8\), expected \[16, 16\]"):
        st = Stats(k=8)
        st.update(torch.randn(4, 8), hessian=True)
        AQLM(calibrated=True).quantize(s, w, st)
    with pytest.raises(ValueError, match="the AQLM method fits codes and codebooks of the aqlm format, not int4wo-64"):
        AQLM().quantize(parse_scheme("int4wo-64"), w, None)
    with pytest.raises(ValueError, match="weight and hessian must be finite"):
        AQLM().quantize(s, torch.full((8, 16), float("nan")), None)
