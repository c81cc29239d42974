"""linear_fpx op: CPU paths vs the plain-torch reference, opcheck, autograd; schemes; a model mixing
float8 and fpx formats through fxquant.compile, torch.compile(fullgraph=True) and save / load."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from helpers import FAST_PATH_TOL, err_vs_magnitude, rel
from fxquant.formats import fpx
from fxquant.ops import _cpu, _dequant_gemm
from fxquant.ops import fpx as op
from fxquant.schemes import FPx, Float8DynamicActivation, Float8WeightOnly, parse_scheme, scheme_from_json, \
    scheme_to_json

DTYPES = [torch.float32, torch.bfloat16]
# fp16-bit decode (ebits <= 4) and table decode (ebits >= 5), every plane split (4, 2+1, 4+1, 4+2, 4+2+1)
FORMATS = ["fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1", "fp3_e1m1", "fp7_e4m2", "fp6_e5m0", "fp7_e6m0"]


def make(name: str, n: int, k: int, seed: int):
    e, m = fpx.parse_format(name)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    st_ = fpx.to_storage(w, e, m)
    args = (st_["qweight"], st_["scale"])
    return (lambda x, b, **kw: torch.ops.fxquant.linear_fpx(x, *args, b, e, m, k, **kw),
            lambda x, b, **kw: op.reference(x, *args, b, e, m, k, **kw),
            fpx.from_storage(*args, e, m, k), (*args, e, m, k))



@pytest.mark.parametrize("name", FORMATS)
@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.sampled_from([1, 7, 8, 9, 31, 64, 130]),
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]),
       seed=st.integers(0, 999))
def test_op_matches_reference(name, m, n, k, dtype, with_bias, lead, seed):
    fn, ref, w, _ = make(name, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y, r = fn(x, b), ref(x, b)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert err_vs_magnitude(y, r, x, w, b) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("name", FORMATS)
def test_fast_path_is_the_reference_to_fp32_rounding(name, monkeypatch, fp32_dense):
    """Blocks of 16 rows over N=50 (a ragged last block), K=41 (padded to 48 codes)."""
    monkeypatch.setattr(_dequant_gemm, "BLOCK_BYTES", 16 * 41 * 4)
    fn, ref, _, _ = make(name, 50, 41, 3)
    x = torch.randn(5, 41)
    assert rel(fn(x, None), ref(x, None)) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_large_m_path_matches_reference(dtype, monkeypatch):
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    fn, ref, _, _ = make("fp6_e3m2", 48, 96, 0)
    x = torch.randn(2, 9, 96).to(dtype)
    b = torch.randn(48).to(dtype)
    assert rel(fn(x, b), ref(x, b)) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("name", ["fp6_e3m2", "fp3_e1m1", "fp7_e6m0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(name, dtype, with_bias):
    *_, args = make(name, 24, 40, 0)
    x = torch.randn(2, 5, 40, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_fpx.default, (x, args[0], args[1], b, *args[2:]))


def test_backward_is_gradient_of_dequantized_linear():
    fn, _, w, _ = make("fp5_e2m2", 16, 64, 5)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    fn(x, b).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(cd):
    fn, ref, _, _ = make("fp6_e3m2", 24, 64, 7)
    x = torch.randn(3, 64)
    y = fn(x, None, compute_dtype=cd)
    assert rel(y, ref(x, None, compute_dtype=cd)) < (1e-6 if cd == torch.float32 else 1e-2)
    assert rel(y, ref(x, None)) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[cd]


# ---- schemes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,obj", [
    ("fp6_e3m2", FPx()), ("fp4_e2m1", FPx(exponent_bits=2, mantissa_bits=1)),
    ("float8wo", Float8WeightOnly()), ("float8wo-e5m2", Float8WeightOnly(dtype=torch.float8_e5m2)),
    ("float8dq", Float8DynamicActivation()), ("float8dq-row", Float8DynamicActivation(granularity="row")),
    ("float8dq-row-ub600.0", Float8DynamicActivation(granularity="row", activation_scale_ub=600)),
])
def test_scheme_strings_and_objects_round_trip(text, obj):
    assert parse_scheme(text) == obj and str(obj) == text
    assert scheme_from_json(scheme_to_json(obj)) == obj
    with_cd = type(obj)(**{**obj.__dict__, "compute_dtype": torch.bfloat16})
    assert scheme_from_json(scheme_to_json(with_cd)) == with_cd


@pytest.mark.parametrize("make_bad,match", [
    (lambda: FPx(exponent_bits=4, mantissa_bits=3), r"FPx: e4m3 has 1 \+ 4 \+ 3 = 8 bits.*valid formats: fp3_e1m1"),
    (lambda: FPx(exponent_bits=0, mantissa_bits=3), r"exponent_bits=0 must be an int >= 1"),
    (lambda: Float8WeightOnly(dtype=torch.float16), r"Float8WeightOnly.dtype=torch.float16 is not supported"),
    (lambda: Float8DynamicActivation(granularity="col"), r"granularity='col' is not supported; valid: 'tensor'"),
    (lambda: Float8DynamicActivation(activation_scale_ub=-1.0), r"activation_scale_ub=-1.0 must be a positive"),
    (lambda: parse_scheme("fp6_e2m2"), r"X=6 but 1 \+ A \+ B = 5"),
    (lambda: parse_scheme("float8wo-e4m3"), r"float8 dtype 'e4m3' is not supported; valid: e4m3fn, e5m2"),
])
def test_bad_scheme_options_raise(make_bad, match):
    with pytest.raises(ValueError, match=match):
        make_bad()


@pytest.mark.parametrize("text", ["fp6_e3m2", "fp3_e1m1", "float8wo", "float8wo-e5m2", "float8dq", "float8dq-row"])
def test_scheme_nbytes_are_exact(text):
    from fxquant.formats import float8

    scheme = parse_scheme(text)
    qw = scheme.quantize(torch.randn(30, 50))
    if isinstance(scheme, FPx):
        want = fpx.nbytes(30, 50, scheme.exponent_bits, scheme.mantissa_bits)  # 56 codes per row stored
        assert want == 30 * 56 * scheme.bits // 8 + 30 * 2
    else:
        want = float8.nbytes(30, 50, getattr(scheme, "granularity", "row"))
    assert qw.nbytes == want
    assert scheme.rel_error(torch.zeros(30, 50), qw) == 0.0


# ---- end to end --------------------------------------------------------------------------------------
def test_model_mixing_float8_and_fpx_compiles_fullgraph_and_saves(tiny_llama_model, tmp_path):
    import fxquant

    torch._dynamo.reset()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = fxquant.Spec(default="fp6_e3m2", skip=["lm_head"],
                        rules={r"re:.*self_attn\.[qk]_proj": "float8dq-row", r"re:.*self_attn\..*": "float8wo",
                               "layers.0.mlp.*": "fp4_e2m1", "layers.1.mlp.down_proj": "float8dq"})
    qm = fxquant.compile(tiny_llama_model, spec, (ids,))
    rows = {r.fqn: r for r in fxquant.report(qm).quantized}
    assert rows["model.layers.0.self_attn.q_proj"].scheme == "float8dq-row"
    assert rows["model.layers.0.self_attn.o_proj"].scheme == "float8wo"
    assert rows["model.layers.0.mlp.up_proj"].scheme == "fp4_e2m1"
    assert rows["model.layers.1.mlp.up_proj"].scheme == "fp6_e3m2"
    assert rows["model.layers.1.mlp.up_proj"].bytes_after == fpx.nbytes(512, 256, 3, 2)
    assert rows["model.layers.1.mlp.down_proj"].scheme == "float8dq"
    assert rel(qm(ids), tiny_llama_model(ids)) < 0.2
    cm = torch.compile(qm, fullgraph=True)
    for shape in [(1, 1), (2, 16)]:  # one decode token (M = 1), then a prefill
        x = torch.randint(0, 512, shape)
        torch.testing.assert_close(cm(x), qm(x), rtol=2e-2, atol=2e-2)
    fxquant.save(qm, tmp_path / "m.safetensors")
    assert torch.equal(fxquant.load(tmp_path / "m.safetensors")(ids), qm(ids))
