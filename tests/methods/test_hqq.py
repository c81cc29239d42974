"""HQQ (fxquant.methods.hqq): half-quadratic zero / scale optimisation on the integer grids.

Lower weight error than round-to-nearest on heavy-tailed weights, never a higher one, the same
bytes every run, buffers that decode to the grid's values of the codes, validated parameters, and
(when the ``hqq`` library is importable) the library's own optimiser as the oracle."""
import math

import pytest
import torch

from fxquant.methods import HQQ, RTN, method_from_json, method_to_json, parse_method
from fxquant.methods import hqq as hqq_mod
from fxquant.schemes import parse_scheme

ASYMMETRIC = ["uint4wo-64", "uint3wo-64", "uint2wo-16-axis0", "int4wo-64", "uint8wo-128", "uint1wo-64"]
SYMMETRIC = ["int3wo-32", "int8wo"]


def _student_t(n, k, df=3, seed=0):
    """Heavy-tailed weights (Student-t, ``df`` degrees of freedom) with an all-zero row and a
    constant row (a group of zero range), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g)
    chi2 = torch.randn(df, n, k, generator=g).pow(2).sum(0)
    w = z / (chi2 / df).sqrt() * 0.02
    w[0] = 0
    w[1] = 0.0123
    return w


def _err(scheme, w, qw):
    return ((scheme.dequantize(qw) - w).norm() / w.norm()).item()


def _same(a, b):
    assert a.op == b.op and a.attrs == b.attrs
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        assert t.dtype == b.tensors[name].dtype and torch.equal(t, b.tensors[name]), name


# 90 x 200: a partial last group along both axes (200 = 3 * 64 + 8, 90 = 5 * 16 + 10)
W = _student_t(90, 200)


@pytest.mark.parametrize("name", ASYMMETRIC)
def test_lower_error_than_rtn(name):
    s = parse_scheme(name)
    res = HQQ().quantize(s, W)
    err, rtn = _err(s, W, res.qweight), _err(s, W, s.quantize(W))
    assert err < rtn, (err, rtn)
    assert res.info["rtn_groups"] < res.info["groups"] and "fallback" not in res.info
    assert res.info["rel_error"] == pytest.approx(err, rel=1e-4)
    assert res.info["rtn_rel_error"] == pytest.approx(rtn, rel=1e-4)
    scaled = HQQ(optimize_scale=True).quantize(s, W)
    assert _err(s, W, scaled.qweight) < rtn


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_grids(name):
    """No offset to optimise: the scale is (``optimize_scale`` or not), and the weight error drops below
    RTN's (the issue's ``int3wo-64@hqq`` used to be RTN's bytes)."""
    s = parse_scheme(name)
    rtn = s.quantize(W)
    res = HQQ().quantize(s, W)
    assert "fallback" not in res.info and res.info["optimised"].startswith("scale (symmetric")
    assert _err(s, W, res.qweight) < _err(s, W, rtn)
    _same(HQQ(optimize_scale=True).quantize(s, W).qweight, res.qweight)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("axis", [0, 1])
def test_every_bit_width_and_axis(bits, axis):
    w = _student_t(37, 45, seed=bits)
    for name, strict in [(f"uint{bits}wo-8-axis{axis}", True), (f"int{bits}wo-8-axis{axis}", False)]:
        if name.startswith("int1"):
            continue  # no symmetric 1-bit format
        s = parse_scheme(name)
        rtn = _err(s, w, s.quantize(w))
        err = _err(s, w, HQQ(optimize_scale=True).quantize(s, w).qweight)
        assert err < rtn if strict else err <= rtn, (name, err, rtn)


@pytest.mark.parametrize("name", ["uint3wo-64", "uint2wo-16-axis0", "int4wo-64", "int8wo"])
def test_deterministic_and_independent_of_the_chunk(name, monkeypatch):
    s = parse_scheme(name)
    method = HQQ(optimize_scale=True)
    first = method.quantize(s, W)
    _same(first.qweight, method.quantize(s, W).qweight)
    monkeypatch.setattr(hqq_mod, "CHUNK_ELEMENTS", 300)  # a few groups per chunk
    again = method.quantize(s, W)
    _same(first.qweight, again.qweight)
    assert again.info == first.info


@pytest.mark.parametrize("name", ["uint4wo-64", "uint2wo-16-axis0", "int4wo-64", "int3wo-32", "int8wo"])
def test_buffers_decode_to_the_grid_values_of_the_codes(name, monkeypatch):
    """What HQQ hands to ``pack_grid``: stored parameters, codes re-encoded against them; the packed
    buffers dequantize to exactly the grid's decode of those codes."""
    s = parse_scheme(name)
    n, k = W.shape
    seen = {}
    pack = type(s).pack_grid

    def spy(self, q, scale, offset, n_, k_):
        seen.update(q=q.clone(), scale=scale.clone(), offset=offset.clone())
        return pack(self, q, scale, offset, n_, k_)

    monkeypatch.setattr(type(s), "pack_grid", spy)
    qw = HQQ(optimize_scale=True).quantize(s, W).qweight
    grid = s.grid(n, k)
    q, scale, offset = seen["q"], seen["scale"], seen["offset"]
    stored = grid.store(scale, offset)
    assert torch.equal(stored[0], scale) and torch.equal(stored[1], offset)
    assert torch.equal(q, grid.encode(grid.groups(W), scale, offset))
    assert torch.equal(s.dequantize(qw), grid.ungroup(grid.decode(q, scale, offset), n, k))


def test_keeps_rtn_when_it_cannot_do_better():
    """Weights already on the min / max grid: RTN is exact, HQQ returns RTN's bytes and says so."""
    s = parse_scheme("uint4wo-16")
    q = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(1)).float()
    q[:, 0::16], q[:, 1::16] = 0, 15  # every group spans the whole code range
    w = (q - 8) * 0.25
    res = HQQ().quantize(s, w)
    _same(res.qweight, s.quantize(w))
    assert res.info["fallback"] == "rtn" and res.info["rtn_groups"] == res.info["groups"]
    assert res.info["rel_error"] == 0.0


def test_no_iterations_is_rtn():
    s = parse_scheme("uint3wo-64")
    _same(HQQ(iters=0).quantize(s, W).qweight, RTN().quantize(s, W, None).qweight)


def test_without_early_stop_all_iterations_run():
    s = parse_scheme("uint4wo-64")
    res = HQQ(early_stop=False, iters=7).quantize(s, W)
    assert res.info["iters"] == 7
    assert _err(s, W, res.qweight) < _err(s, W, s.quantize(W))


@pytest.mark.parametrize("field, value", [
    ("lp_norm", 0), ("lp_norm", -0.5), ("lp_norm", 1.5), ("lp_norm", math.nan), ("lp_norm", "0.7"),
    ("beta", 0), ("beta", -1.0), ("beta", math.inf), ("kappa", 0.99), ("kappa", math.nan),
    ("iters", -1), ("iters", 2.5), ("iters", True), ("early_stop", 1), ("optimize_scale", "yes"),
])
def test_bad_parameters(field, value):
    with pytest.raises(ValueError, match=rf"HQQ\.{field}=.*valid"):
        HQQ(**{field: value})


def test_parameters_and_registry():
    assert HQQ(lp_norm=1, beta=1e3, kappa=1, iters=0, early_stop=False).lp_norm == 1
    assert parse_method("hqq") == HQQ() and HQQ.needs_data is False
    m = HQQ(optimize_scale=True, iters=5)
    assert method_from_json(method_to_json(m)) == m and method_to_json(HQQ()) == "hqq"


def test_unsupported_schemes():
    reason = HQQ().unsupported_reason(parse_scheme("nf4"))
    assert "nf4" in reason and "int4wo-<g>" in reason and "int8wo" in reason
    with pytest.raises(ValueError, match="nf4"):
        HQQ().quantize(parse_scheme("nf4"), W)
    for name in ASYMMETRIC + SYMMETRIC:
        assert HQQ().unsupported_reason(parse_scheme(name)) is None


def test_matches_the_hqq_library():
    """hqq's ``Quantizer.quantize(optimize=True)`` (4 bits, groups of 64 along axis 1, float
    parameters) is the oracle: fxquant's zero-point optimisation with bf16 parameters gets within
    a few percent of its weight error (and both well below RTN)."""
    hqq = pytest.importorskip("hqq.core.quantize")
    w = _student_t(128, 256, seed=3)
    w[:2] = _student_t(2, 256, seed=4)  # no degenerate rows here: hqq clamps tiny ranges its own way
    wq, meta = hqq.Quantizer.quantize(w, nbits=4, group_size=64, optimize=True, axis=1, bitpack=False,
                                      device="cpu")
    lib = hqq.Quantizer.dequantize(wq, {**meta, "compute_dtype": torch.float32})
    lib_err = ((lib - w).norm() / w.norm()).item()
    s = parse_scheme("uint4wo-64")
    err, rtn = _err(s, w, HQQ().quantize(s, w).qweight), _err(s, w, s.quantize(w))
    assert err < 1.03 * lib_err and lib_err < rtn, (err, lib_err, rtn)


def test_report_table_says_when_a_method_kept_round_to_nearest():
    import fxquant
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    qm = fxquant.compile(model, fxquant.Spec(default="int4wo-32", method=HQQ(iters=0)), (torch.randn(2, 64),))
    text = str(fxquant.report(qm))
    assert text.count("hqq kept round-to-nearest: iters=0") == 2, text
