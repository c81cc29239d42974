"""float8wo / float8dq ops: CPU paths vs the plain-torch reference, opcheck, autograd, peers."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from helpers import FAST_PATH_TOL, err_vs_magnitude, rel
from fxquant.formats import float8
from fxquant.ops import _cpu, _dequant_gemm
from fxquant.ops import float8 as op

DTYPES = [torch.float32, torch.bfloat16]
UB = float8.DEFAULT_ACTIVATION_SCALE_UB
# (op name, float8 dtype, granularity or None for weight-only)
KINDS = {"float8wo": (torch.float8_e4m3fn, None), "float8wo-e5m2": (torch.float8_e5m2, None),
         "float8dq": (torch.float8_e4m3fn, "tensor"), "float8dq-row": (torch.float8_e4m3fn, "row")}


def make(kind: str, n: int, k: int, seed: int):
    """-> (op(x, bias, **kw), reference(x, bias, **kw), dequantized weight fp32 [N, K])."""
    dtype, gran = KINDS[kind]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1
    q, s = float8.quantize_weight(w, dtype, gran or "row")
    if gran is None:
        return (lambda x, b, **kw: torch.ops.fxquant.linear_float8wo(x, q, s, b, **kw),
                lambda x, b, **kw: op.reference_wo(x, q, s, b, **kw), float8.dequantize_weight(q, s))
    return (lambda x, b, **kw: torch.ops.fxquant.linear_float8dq(x, q, s, b, gran, UB, **kw),
            lambda x, b, **kw: op.reference_dq(x, q, s, b, gran, UB, **kw), float8.dequantize_weight(q, s))



@pytest.mark.parametrize("kind", KINDS)
@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.sampled_from([1, 7, 8, 9, 31, 64, 130]),
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]),
       seed=st.integers(0, 999))
def test_op_matches_reference(kind, m, n, k, dtype, with_bias, lead, seed):
    fn, ref, w = make(kind, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y, r = fn(x, b), ref(x, b)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert err_vs_magnitude(y, r, x, w, b) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_large_m_path_matches_reference(kind, dtype, monkeypatch):
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    fn, ref, _ = make(kind, 48, 96, 0)
    x = torch.randn(2, 9, 96).to(dtype)
    b = torch.randn(48).to(dtype)
    assert rel(fn(x, b), ref(x, b)) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_is_the_reference_to_fp32_rounding(kind, monkeypatch, fp32_dense):
    """Blocks of 16 rows over N=50 (a ragged last block): still the reference up to summation order."""
    monkeypatch.setattr(_dequant_gemm, "BLOCK_BYTES", 16 * 40 * 4)
    fn, ref, _ = make(kind, 50, 40, 3)
    x = torch.randn(5, 40)
    assert rel(fn(x, None), ref(x, None)) < 1e-6


# opcheck's test_schema runs the op under SchemaCheckMode, which compares every input before and
# after with torch.allclose: not implemented for float8 tensors on the CPU ("mul_cpu_reduced_float"
# not implemented for 'Float8_e4m3fn', torch 2.13).  The other three checks run, and
# test_inputs_are_not_mutated checks what test_schema would (the schema declares no mutation).
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _op_args(kind, dtype, with_bias):
    dt, gran = KINDS[kind]
    q, s = float8.quantize_weight(torch.randn(24, 40), dt, gran or "row")
    x = torch.randn(2, 5, 40, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    if gran is None:
        return torch.ops.fxquant.linear_float8wo.default, (x, q, s, b)
    return torch.ops.fxquant.linear_float8dq.default, (x, q, s, b, gran, UB)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(kind, dtype, with_bias):
    opcheck(*_op_args(kind, dtype, with_bias), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_not_mutated(kind):
    fn, args = _op_args(kind, torch.float32, True)
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    fn(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.detach().view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_backward_is_gradient_of_dequantized_linear(kind):
    """dx = dy @ Ŵ (straight through the activation quantization for float8dq); db = sum dy."""
    fn, _, w = make(kind, 16, 64, 5)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    fn(x, b).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(kind, cd):
    fn, ref, _ = make(kind, 24, 64, 7)
    x = torch.randn(3, 64)
    y = fn(x, None, compute_dtype=cd)
    assert rel(y, ref(x, None, compute_dtype=cd)) < (1e-6 if cd == torch.float32 else 1e-2)
    assert rel(y, ref(x, None)) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[cd]


@pytest.mark.parametrize("gran", ["tensor", "row"])
def test_dq_reference_is_the_written_out_formula(gran, fp32_dense):
    """linear_float8dq == F.linear(dequant(quant(x)), dequant(Wq)) with fbgemm-style activation scales."""
    q, s = float8.quantize_weight(torch.randn(24, 40), torch.float8_e4m3fn, gran)
    x = torch.randn(6, 40) * torch.tensor([1, 1, 1, 1, 1, 3000.0])[:, None]  # an outlier row above the bound
    mx = 448.0
    amax = x.abs().amax(1, keepdim=True) if gran == "row" else x.abs().amax().reshape(1, 1)
    xs = amax.clamp(1e-12, UB) / mx
    xh = (x / xs).clamp(-mx, mx).to(torch.float8_e4m3fn).float() * xs
    want = xh @ (q.float() * s[:, None]).T
    torch.testing.assert_close(torch.ops.fxquant.linear_float8dq(x, q, s, None, gran, UB), want,
                               rtol=1e-4, atol=1e-4)  # fp32 summation order (scale applied to the output)


def test_activation_scale_ub_changes_the_result_only_above_the_bound():
    q, s = float8.quantize_weight(torch.randn(8, 16), torch.float8_e4m3fn, "row")
    small = torch.randn(2, 16)
    big = small * 1000
    for x in (small, big):
        y_ub = torch.ops.fxquant.linear_float8dq(x, q, s, None, "row", 100.0)
        y_inf = torch.ops.fxquant.linear_float8dq(x, q, s, None, "row", float("inf"))
        assert torch.equal(y_ub, y_inf) == (x is small)


def test_bad_granularity_raises():
    q, s = float8.quantize_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"granularity='col' is not supported; valid: tensor, row"):
        op.reference_dq(torch.randn(2, 16), q, s, None, "col", UB)


@pytest.mark.parametrize("gran", ["tensor", "row"])
def test_dq_matches_torchao_float8tensor(gran, fp32_dense):
    """Peer: torchao's Float8Tensor with dynamic float8 activations (built directly: its config
    refuses the CPU), fp32 weight and activations, no activation bound: the same codes and scales
    on both sides, so only the GEMM's summation order differs (measured 2.4e-7)."""
    f8 = pytest.importorskip("torchao.quantization.quantize_.workflows.float8.float8_tensor")
    granularity = pytest.importorskip("torchao.quantization.granularity")
    inference = pytest.importorskip("torchao.float8.inference")
    g = granularity.PerRow() if gran == "row" else granularity.PerTensor()
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    t = f8.Float8Tensor.from_hp(w, granularity=g, act_quant_kwargs=f8.QuantizeTensorToFloat8Kwargs(
        torch.float8_e4m3fn, g), mm_config=inference.Float8MMConfig(use_fast_accum=True))
    q, s = float8.quantize_weight(w, torch.float8_e4m3fn, gran)
    y = torch.ops.fxquant.linear_float8dq(x, q, s, None, gran, float("inf"))
    assert rel(y, torch.nn.functional.linear(x, t)) < 1e-5


def test_wo_close_to_torchao_float8_weight_only(fp32_dense):
    tq = pytest.importorskip("torchao.quantization")
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    lin = torch.nn.Linear(96, 64, bias=False)
    lin.weight.data.copy_(w)
    tq.quantize_(lin, tq.Float8WeightOnlyConfig())
    x = torch.randn(5, 96)
    q, s = float8.quantize_weight(w)
    assert rel(torch.ops.fxquant.linear_float8wo(x, q, s, None), lin(x)) < 1e-5
