"""int8dq / LLM.int8 format math: activation quantization, the exact int8 product, and the
bitsandbytes oracle for the LLM.int8 split."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant import Spec, schemes
from fxquant.formats import int8, int8dq
from fxquant.schemes import Int8DynamicActivation, LLMInt8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def within_half_step(q, s, x) -> bool:
    """``|q * s - x| <= s / 2`` up to the rounding of the fp32 division ``x / s`` (in float64)."""
    q, s, x = q.double(), s.double(), x.double()
    return bool(((q * s - x).abs() <= s / 2 + x.abs() * 2.0**-23).all())


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@given(m=st.integers(1, 20), k=st.integers(1, 150), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES))
def test_activation_quant_error_bound(m, k, scale, seed, dtype):
    x = randn(m, k, seed=seed, scale=scale).to(dtype)
    q, s = int8dq.quantize_activations(x)
    assert q.dtype == torch.int8 and q.shape == (m, k) and s.dtype == torch.float32 and s.shape == (m, 1)
    assert q.abs().max() <= 127
    # round to nearest against the row scale: at most half a step, plus the ulp of the fp32 x / s
    assert within_half_step(q, s, x)
    # the row maximum maps to +-127: nothing is clipped, no code is wasted
    assert torch.equal(q.abs().amax(1), torch.full((m,), 127, dtype=torch.int8))


def test_activation_quant_rounds_half_to_even_and_handles_zero_rows():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5], [0.0] * 8])
    q, s = int8dq.quantize_activations(x)
    assert s[0].item() == 1.0  # 127 / 127
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]
    assert torch.isfinite(s).all() and not q[1].any()


def test_bf16_input_is_widened_exactly():
    x = randn(4, 96, seed=1).to(torch.bfloat16)
    q, s = int8dq.quantize_activations(x)
    q32, s32 = int8dq.quantize_activations(x.float())
    assert torch.equal(q, q32) and torch.equal(s, s32)


@given(m=st.integers(1, 9), n=st.integers(1, 9), k=st.sampled_from([1, 7, 1023, 1024, 1025, 2049]),
       extreme=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_matmul_is_exact(m, n, k, extreme, seed):
    g = torch.Generator().manual_seed(seed)
    if extreme:  # worst case for fp32 partial sums: every product is +-128^2 or 127^2
        a = torch.where(torch.rand(m, k, generator=g) < 0.5, -128, 127).to(torch.int8)
        b = torch.full((n, k), -128, dtype=torch.int8)
    else:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    exact = (a.long() @ b.long().t()).int()
    assert torch.equal(int8dq.int8_matmul(a, b), exact)


def test_int8_matmul_equals_int_mm():
    """torch._int_mm is the literal int8 x int8 -> int32 kernel: bit-equal results."""
    a = torch.randint(-127, 128, (32, 2056), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    b = torch.randint(-127, 128, (24, 2056), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(int8dq.int8_matmul(a, b), torch._int_mm(a, b.t()))


def test_int8_matmul_rejects_float():
    with pytest.raises(ValueError, match="expected int8"):
        int8dq.int8_matmul(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8))


def test_weights_are_the_int8_format():
    w = randn(33, 70)
    q, s = int8dq.quantize_weight(w)
    q8, s8 = int8.quantize(w)
    assert torch.equal(q, q8) and torch.equal(s, s8) and s.dtype == torch.bfloat16
    assert int8dq.nbytes(33, 70) == q.numel() + 2 * s.numel()


@given(m=st.integers(1, 12), k=st.integers(1, 80), threshold=st.floats(0.5, 8), seed=st.integers(0, 2**16))
def test_llm_split_partitions_every_element(m, k, threshold, seed):
    x = randn(m, k, seed=seed, scale=3.0)
    q, s, cols = int8dq.quantize_activations_llm(x, threshold)
    assert cols.shape == (k,) and cols.dtype == torch.bool
    assert torch.equal(cols, (x.abs() >= threshold).any(0))
    assert not q[:, cols].any()  # outlier columns go through the float path only
    # the int8 part reproduces the inlier columns within half a step of the row scale
    assert within_half_step(q[:, ~cols], s, x[:, ~cols])
    # bitsandbytes' row scale: absmax over elements below the threshold (all columns)
    amax = torch.where(x.abs() >= threshold, 0, x.abs()).amax(1, keepdim=True)
    assert torch.equal(s, int8dq.activation_scale(amax))


def test_llm_split_matches_bitsandbytes():
    """Oracle: bitsandbytes' int8_vectorwise_quant (the op MatMul8bitLt uses) on the same fp16 input."""
    pytest.importorskip("bitsandbytes")
    x = randn(6, 256, seed=3, scale=2.0).half()
    x[1, 10], x[4, 200], x[2, 10] = 9.0, -7.5, 5.5  # 5.5 sits in an outlier column, below threshold
    codes, stats, cols = torch.ops.bitsandbytes.int8_vectorwise_quant.default(x.clone(), 6.0)
    q, s, mask = int8dq.quantize_activations_llm(x, 6.0)
    assert torch.equal(mask.nonzero().squeeze(1), cols.to(torch.int64))
    assert torch.allclose(s.squeeze(1) * 127, stats, rtol=1e-6)
    # bitsandbytes computes round(x * (127 / absmax)), fxquant round(x / (absmax / 127)): the two
    # may differ by one code where x / scale lands within an ulp of a tie
    diff = (q.int() - codes.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999


def test_activation_scale_floor():
    assert int8dq.activation_scale(torch.tensor([0.0])).item() == torch.finfo(torch.float32).tiny


# -- schemes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,scheme", [
    ("int8dq", Int8DynamicActivation()),
    ("llm.int8", LLMInt8()),
    ("llm.int8-4.5", LLMInt8(threshold=4.5)),
    ("LLM.int8-6", LLMInt8()),
    ("llm.int8-1e-05", LLMInt8(threshold=1e-5)),
], ids=str)
def test_scheme_strings_and_objects_are_interchangeable(text, scheme):
    assert schemes.parse_scheme(text) == scheme
    assert schemes.parse_scheme(str(scheme)) == scheme
    assert schemes.scheme_from_json(schemes.scheme_to_json(scheme)) == scheme


def test_spec_round_trip_with_compute_dtype():
    spec = Spec(default="int8dq", rules={"mlp.*": LLMInt8(threshold=4.5, compute_dtype=torch.bfloat16)})
    d = spec.to_dict()
    assert d["default"] == {"scheme": "int8dq", "compute_dtype": None, "method": None}
    assert d["rules"]["mlp.*"] == {"scheme": "llm.int8", "compute_dtype": "bfloat16", "threshold": 4.5, "method": None}
    assert Spec.from_dict(d) == spec


@pytest.mark.parametrize("bad,match", [
    ("llm.int8-abc", r"LLMInt8.threshold='abc' is not a number"),
    ("llm.int8-0", r"LLMInt8.threshold=0.0 is not supported; valid: a finite number > 0"),
    ("llm.int8-inf", r"LLMInt8.threshold=inf is not supported"),
    ("llm.int8--2", r"LLMInt8.threshold=-2.0 is not supported"),
])
def test_bad_threshold_names_field_value_and_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        schemes.parse_scheme(bad)


def test_scheme_quantize_is_the_op_call():
    w = randn(24, 40)
    for scheme, op, attrs in [(Int8DynamicActivation(), "linear_int8dq", {}),
                              (LLMInt8(threshold=3.0), "linear_llm_int8", {"threshold": 3.0}),
                              (LLMInt8(compute_dtype=torch.float16), "linear_llm_int8",
                               {"threshold": 6.0, "compute_dtype": torch.float16})]:
        qw = scheme.quantize(w)
        assert qw.op == op and qw.attrs == attrs and (qw.out_features, qw.in_features) == (24, 40)
        assert qw.nbytes == int8dq.nbytes(24, 40) == 24 * 40 + 2 * 24
        assert torch.equal(scheme.dequantize(qw), int8.dequantize(*int8.quantize(w)))
        x = randn(3, 40, seed=1)
        y = getattr(torch.ops.fxquant, op)(x, *qw.tensors.values(), None, **qw.attrs)
        assert y.shape == (3, 24)
