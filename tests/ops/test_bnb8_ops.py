"""linear_bnb8 (bitsandbytes' Linear8bitLt layout: int8 codes + fp32 row absmax): the format against
bitsandbytes' own quantizer and dequantizer, the CPU paths against the reference, opcheck, the scheme,
torch.export / torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import fxquant
from helpers import FAST_PATH_TOL, rel
from fxquant.formats import bnb8 as fmt
from fxquant.formats import int8dq
from fxquant.ops import _cpu
from fxquant.ops import bnb8 as op
from fxquant.schemes import Bnb8, parse_scheme, scheme_from_json, scheme_to_json

THRESHOLDS = [0.0, 6.0]


def weight(n, k, seed=0, dtype=torch.float32):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def activations(*shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x.reshape(-1, shape[-1])[0, :: max(1, shape[-1] // 3)] = 25.0  # outlier columns for threshold 6
    return x


def run(x, q, s, b, t, **kw):
    return torch.ops.fxquant.linear_bnb8(x, q, s, b, t, **kw)


# -- the format against bitsandbytes --------------------------------------------------------------
def test_quantize_and_dequantize_equal_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    w = weight(33, 70, seed=3, dtype=torch.float16)  # bitsandbytes quantizes fp16 weights
    cb, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant(w)
    q, s = fmt.quantize_weight(w)
    assert torch.equal(q, cb) and torch.equal(s, scb)
    assert torch.equal(fmt.dequantize_weight(cb, scb), torch.ops.bitsandbytes.int8_vectorwise_dequant(cb, scb))


def test_two_roundings_are_needed():
    """No single fp32 step per row reproduces bitsandbytes' weight: (q * scb) * fl(1/127) differs from
    q * (scb * fl(1/127)) in the last bit for some codes (why the format keeps scb)."""
    q, s = fmt.quantize_weight(weight(256, 256))
    one_step = q.float() * fmt.row_scale(s)[:, None]
    two_step = fmt.dequantize_weight(q, s)
    assert not torch.equal(one_step, two_step)
    assert ((one_step - two_step).abs() <= two_step.abs() * 2**-22).all()  # one ulp apart at most


def test_error_bound_and_zero_rows():
    w = weight(20, 64)
    w[3] = 0
    q, s = fmt.quantize_weight(w)
    assert s[3] == 0 and (q[3] == 0).all() and torch.equal(s, w.abs().amax(1))
    assert ((fmt.dequantize_weight(q, s) - w).abs() <= s[:, None] / 254 * (1 + 1e-5)).all()
    assert fmt.nbytes(20, 64) == 20 * 64 + 4 * 20


# -- the op -----------------------------------------------------------------------------------------
@given(m=st.integers(1, 40), n=st.integers(1, 48), k=st.sampled_from([1, 8, 33, 130, 1025]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), threshold=st.sampled_from(THRESHOLDS),
       with_bias=st.booleans(), seed=st.integers(0, 99))
def test_op_matches_reference(m, n, k, dtype, threshold, with_bias, seed):
    q, s = fmt.quantize_weight(weight(n, k, seed))
    x = activations(m, k, seed=seed + 1).to(dtype)
    b = torch.randn(n).to(dtype) if with_bias else None
    y, r = run(x, q, s, b, threshold), op.reference(x, q, s, bias=b, threshold=threshold)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel(y, r) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("m", [1, 7, 16, 40])
def test_fp32_result_is_the_reference_up_to_summation_order(threshold, m, monkeypatch):
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    q, s = fmt.quantize_weight(weight(48, 96))
    x, b = activations(2, m, 96, seed=m), torch.randn(48)
    assert rel(run(x, q, s, b, threshold), op.reference(x, q, s, bias=b, threshold=threshold)) < 1e-6


def test_threshold_zero_is_int8dq_and_outliers_are_exact():
    q, s = fmt.quantize_weight(weight(32, 64))
    x = activations(5, 64)
    w = fmt.dequantize_weight(q, s)
    exact = F.linear(x, w)
    e0, e6 = rel(run(x, q, s, None, 0.0), exact), rel(run(x, q, s, None, 6.0), exact)
    assert e6 < e0 / 4  # the outlier columns are what LLM.int8 fixes
    qx, sx = int8dq.quantize_activations(x)  # threshold 0: plain per-token int8 (no column is an outlier)
    assert rel(run(x, q, s, None, 0.0), (qx.float() @ q.float().T) * sx * fmt.row_scale(s)) < 1e-6


def test_compute_dtype_fp16_and_bf16():
    q, s = fmt.quantize_weight(weight(16, 64))
    x = activations(3, 64)
    r = op.reference(x, q, s, bias=None, threshold=6.0)
    for cd in (torch.float16, torch.bfloat16):
        assert rel(run(x, q, s, None, 6.0, compute_dtype=cd), r) < 1e-2


def test_opcheck_and_argument_errors():
    q, s = fmt.quantize_weight(weight(16, 32))
    x = activations(3, 32)
    opcheck(torch.ops.fxquant.linear_bnb8.default, (x, q, s, torch.randn(16), 6.0))
    opcheck(torch.ops.fxquant.linear_bnb8.default, (x, q, s, None, 0.0))
    with pytest.raises(ValueError, match=r"linear_bnb8: scb must be torch.float32 of shape \(16,\)"):
        run(x, q, s.half(), None, 6.0)
    with pytest.raises(ValueError, match=r"linear_bnb8: threshold=-1.0 is not supported; valid: a float >= 0"):
        run(x, q, s, None, -1.0)
    with pytest.raises(ValueError, match=r"x has 31 input features"):
        run(x[:, :31], q, s, None, 6.0)


def test_gradients_flow_to_x_and_bias():
    q, s = fmt.quantize_weight(weight(8, 16))
    x = activations(3, 16).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    run(x, q, s, b, 6.0).sum().backward()
    assert torch.allclose(x.grad, fmt.dequantize_weight(q, s).sum(0).expand(3, 16))
    assert torch.equal(b.grad, torch.full((8,), 3.0))


# -- the scheme and the module ----------------------------------------------------------------------
@pytest.mark.parametrize("text,scheme", [("bnb8", Bnb8()), ("bnb8-0", Bnb8(threshold=0)),
                                         ("bnb8-4.5", Bnb8(threshold=4.5))], ids=str)
def test_scheme_strings(text, scheme):
    assert parse_scheme(text) == scheme and parse_scheme(str(scheme)) == scheme
    assert scheme_from_json(scheme_to_json(scheme)) == scheme


@pytest.mark.parametrize("bad,match", [("bnb8-x", "Bnb8.threshold='x' is not a number"),
                                       ("bnb8--1", "Bnb8.threshold=-1.0 is not supported; valid: a finite number >= 0"),
                                       ("bnb8-nan", "Bnb8.threshold=nan is not supported")])
def test_scheme_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_scheme(bad)


def test_quantize_module_compile_and_export():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    x = activations(4, 64)
    qm = fxquant.quantize_(model, "bnb8-0", (x,))
    assert qm[0].scheme == "bnb8-0.0" and set(qm[0].tensor_names) == {"qweight", "scb"}
    q, s = fmt.quantize_weight(qm[0].dequantize())  # re-quantizing the decoded weight gives the same codes
    assert torch.equal(q, qm[0].qweight)
    eager = qm(x)
    assert torch.equal(eager, torch.ops.fxquant.linear_bnb8(torch.relu(run(x, qm[0].qweight, qm[0].scb, qm[0].bias,
                                                                            0.0)), qm[2].qweight, qm[2].scb,
                                                             qm[2].bias, 0.0))
    compiled = torch.compile(qm, fullgraph=True)
    assert rel(compiled(x), eager) < 1e-6
    ep = torch.export.export(qm, (x,))
    assert sum(n.target == torch.ops.fxquant.linear_bnb8.default for n in ep.graph.nodes) == 2
    assert torch.equal(ep.module()(x), eager)
