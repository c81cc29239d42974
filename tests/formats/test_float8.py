"""float8 weights and dynamic activations: decode table, torchao / fbgemm conventions, error bound."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import float8

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
MBITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
EMIN = {torch.float8_e4m3fn: -6, torch.float8_e5m2: -14}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_is_torch_cast_for_every_code(dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    assert torch.equal(float8.decode(codes).isnan(), codes.float().isnan())
    finite = ~codes.float().isnan()
    got, want = float8.decode(codes)[finite], codes.float()[finite]
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, -0.0 included
    w = torch.randn(7, 33).to(dtype)
    assert torch.equal(float8.decode(w), w.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp16_bit_decode_is_exact(dtype):
    """The CPU fast path's decoder equals torch's cast for every non-NaN code, bit for bit; the
    e4m3fn NaN codes (never produced by quantize) come out as ±480."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    t, e = float8.decode_fp16_scaled(codes)
    got, want = t.float() * 2.0**e, codes.float()
    ok = ~want.isnan()
    assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32))
    if dtype == torch.float8_e4m3fn:
        assert got[~ok].abs().tolist() == [480.0, 480.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", float8.GRANULARITIES)
def test_weight_matches_torchao_float8_tensor(dtype, granularity):
    """Peer oracle: torchao ``Float8Tensor.from_hp`` (Float8WeightOnlyConfig / float8dq weights)."""
    mod = pytest.importorskip("torchao.quantization.quantize_.workflows.float8.float8_tensor")
    gran = pytest.importorskip("torchao.quantization.granularity")
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * 0.05
    q, scale = float8.quantize_weight(w, dtype, granularity)
    ao = mod.Float8Tensor.from_hp(w, float8_dtype=dtype,
                                  granularity=gran.PerRow() if granularity == "row" else gran.PerTensor())
    assert q.dtype == dtype and scale.dtype == torch.float32
    assert scale.shape == ((48,) if granularity == "row" else (1,))
    torch.testing.assert_close(scale, ao.scale.reshape(-1), rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), ao.qdata.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(n=st.integers(1, 8), k=st.integers(1, 64), mag=st.floats(1e-3, 1e4), seed=st.integers(0, 2**16),
       granularity=st.sampled_from(float8.GRANULARITIES))
def test_weight_error_bound(dtype, n, k, mag, seed, granularity):
    """|W - Ŵ| <= scale * 2^(max(floor(log2 |W|/scale), emin) - mbits - 1): half a float8 step."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * mag
    q, scale = float8.quantize_weight(w, dtype, granularity)
    s = scale[:, None]
    e = torch.floor(torch.log2((w.abs() / s).clamp(min=1e-38))).clamp(min=EMIN[dtype])
    bound = s * torch.exp2(e - MBITS[dtype] - 1)
    err = (float8.dequantize_weight(q, scale) - w).abs()
    assert (err <= bound * (1 + 1e-6)).all()
    assert float8.nbytes(n, k, granularity) == q.numel() * q.element_size() + scale.numel() * 4


def test_all_zero_row_is_exact():
    w = torch.zeros(3, 16)
    w[1] = torch.randn(16)
    q, scale = float8.quantize_weight(w)
    assert (scale > 0).all() and torch.equal(float8.dequantize_weight(q, scale)[0], torch.zeros(16))


def _fbgemm_quantize_fp8_row(x: torch.Tensor, scale_ub: float):
    """fbgemm ``triton_quantize_fp8_row`` semantics written out: clamp the row max to
    [1e-12, scale_ub], a_scale = MAX / max, q = fp8(clamp(x * a_scale, ±MAX)), return 1 / a_scale."""
    mx = torch.finfo(torch.float8_e4m3fn).max
    cur = x.abs().amax(dim=1).clamp(min=1e-12, max=scale_ub)
    a_scale = mx / cur
    q = (x * a_scale[:, None]).clamp(-mx, mx).to(torch.float8_e4m3fn)
    return q, 1.0 / a_scale


@given(m=st.integers(1, 6), k=st.integers(1, 50), mag=st.floats(1e-3, 1e4), seed=st.integers(0, 2**16),
       ub=st.sampled_from([1200.0, 30.0, math.inf]))
def test_activation_row_matches_fbgemm_semantics(m, k, mag, seed, ub):
    """Per-row activation quantization with ``activation_scale_ub`` equals fbgemm's (as transformers'
    FbgemmFp8Linear calls it) up to one ulp of the scale (fbgemm stores 1 / (MAX / amax))."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * mag
    q, scale = float8.quantize_activation(x, torch.float8_e4m3fn, "row", ub)
    fq, fscale = _fbgemm_quantize_fp8_row(x, ub)
    assert scale.shape == (m, 1)
    torch.testing.assert_close(scale[:, 0], fscale, rtol=2**-22, atol=0)
    mismatch = (q.float() != fq.float())
    # a one-ulp scale difference may move a value sitting exactly on a rounding midpoint
    assert mismatch.float().mean() < 0.01


def test_activation_scale_ub_saturates_outliers():
    x = torch.tensor([[5000.0, 1.0, -3000.0], [0.5, -0.25, 0.0]])
    q, scale = float8.quantize_activation(x, torch.float8_e4m3fn, "row", 1200.0)
    assert scale[0, 0] == pytest.approx(1200.0 / 448)  # clamped amax
    assert scale[1, 0] == pytest.approx(0.5 / 448)  # below the bound: untouched
    deq = float8.decode(q) * scale
    assert deq[0, 0] == pytest.approx(1200.0) and deq[0, 2] == pytest.approx(-1200.0)


def test_activation_tensor_granularity_uses_one_scale():
    x = torch.randn(5, 12) * torch.arange(1, 6)[:, None]
    q, scale = float8.quantize_activation(x, torch.float8_e4m3fn, "tensor", 1200.0)
    assert scale.shape == (1, 1) and scale.item() == pytest.approx(x.abs().max().item() / 448)
    assert torch.allclose(float8.fake_quantize_activation(x, torch.float8_e4m3fn, "tensor", 1200.0), x,
                          rtol=2**-4, atol=scale.item() * 2**-10)


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"granularity='col' is not supported; valid: tensor, row"):
        float8.quantize_weight(torch.randn(2, 2), granularity="col")
    with pytest.raises(ValueError, match=r"dtype=torch.float16 is not a supported float8 dtype"):
        float8.quantize_weight(torch.randn(2, 2), torch.float16)
