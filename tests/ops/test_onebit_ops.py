"""linear_onebit: CPU fast path and dispatch vs the reference, both forms of the op, opcheck,
autograd, compute_dtype, the scheme, and a compiled model mixing formats."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from torch.library import opcheck

import fxquant
from helpers import FAST_PATH_TOL, policy_x, rel
from fxquant.formats import onebit as fmt
from fxquant.ops import _cpu
from fxquant.ops import onebit as op
from fxquant.schemes import OneBit, parse_scheme, scheme_from_json, scheme_to_json

DTYPES = [torch.float32, torch.bfloat16]


def _stored(n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    s = fmt.quantize(w)
    return w, (s["sign_bits"], s["a"], s["b"])


def _x(shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
       with_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]), seed=st.integers(0, 999))
@example(m=1, n=1, k=50, dtype=torch.float32, with_bias=False, lead=(), seed=0)  # one output near 0.5: x's
def test_op_matches_reference(m, n, k, dtype, with_bias, lead, seed):  # bf16 rounding moves it 2.5%
    _, t = _stored(n, k, seed)
    x = _x((*lead, m, k), dtype, seed + 1)
    b = _x((n,), dtype, seed + 2) if with_bias else None
    y, r = torch.ops.fxquant.linear_onebit(x, *t, b), op.reference(policy_x(x), *t, b)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert rel(y, r) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("k", [1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 130, 136, 4095])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_k_at_byte_edges(k, m):
    _, t = _stored(24, k, k)
    x = _x((m, k))
    assert rel(op._cpu_fast(x, *t), op.reference(policy_x(x), *t, None)) < FAST_PATH_TOL[torch.float32]


def test_non_negative_inputs_do_not_cancel():
    """S = 2B - 1 splits y into two large terms for x >= 0; the fast path subtracts them in fp32."""
    _, t = _stored(64, 1000, 3)
    x = _x((3, 1000)).abs() + 5.0
    assert rel(torch.ops.fxquant.linear_onebit(x, *t, None), op.reference(x, *t, None)) < 4e-3


@pytest.mark.parametrize("chunk_bytes", [1, 100, 3000])
def test_chunking_is_exact(chunk_bytes, monkeypatch):
    """Row chunks (1 row, a few rows, a ragged last chunk) give bit-identical output."""
    op.clear_workspace()
    _, t = _stored(37, 200, 4)
    x = _x((3, 200))
    whole = op._cpu_fast(x, *t)
    monkeypatch.setattr(op, "CHUNK_BYTES", chunk_bytes)
    assert torch.equal(op._cpu_fast(x, *t), whole)


def test_workspace_reused_across_layouts():
    """The per-thread plane workspace is shared by layers of different K: its correction columns
    are rewritten whenever the layout changes, so alternating layers stay exact."""
    ks = (64, 100, 9, 32, 40)  # 32 and 40: 4 and 5 packed columns, both padded to width 48
    layers = [_stored(40, k, k) for k in ks]
    xs = [_x((2, k)) for k in ks]
    op.clear_workspace()
    first = [op._cpu_fast(x, *t) for x, (_, t) in zip(xs, layers)]
    for _ in range(2):
        for x, (_, t), y in zip(xs, layers, first):
            assert torch.equal(op._cpu_fast(x, *t), y)
            assert rel(y, op.reference(policy_x(x), *t, None)) < FAST_PATH_TOL[torch.float32]
    op.clear_workspace()
    assert torch.equal(op._cpu_fast(xs[1], *layers[1][1]), first[1])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_large_m_path_matches_reference(dtype, monkeypatch):
    """Large M: the planes on the native int8 GEMM where it runs (x ⊙ b split into exact bf16 parts:
    the reference on the policy's x up to fp32 sums), else the reference itself (x rounded first
    where the compute_dtype policy says)."""
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    _, t = _stored(48, 97, 0)
    x, b = _x((2, 9, 97), dtype), _x((48,), dtype, 2)
    y = torch.ops.fxquant.linear_onebit(x, *t, b)
    xr = _cpu.numerics(dtype, None).rounded(x).to(dtype)
    if not op._native_gemm():
        assert torch.equal(y, op.reference(xr, *t, b))  # large M *is* the reference
    else:
        r = op.reference(xr.float(), *t, b.float())
        assert y.dtype == dtype and rel(y.float(), r) < (1e-6 if dtype == torch.float32 else 2**-8)


def test_empty_batch():
    _, t = _stored(10, 20)
    assert torch.ops.fxquant.linear_onebit(torch.zeros(0, 20), *t, None).shape == (0, 10)


# ---- the paper's form and the dequantized form ---------------------------------------------------
@pytest.mark.parametrize("n,k", [(1, 1), (33, 70), (64, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_equals_dequantized_linear(n, k, with_bias):
    """((x ⊙ b) · Sᵀ) ⊙ a == x @ (S ⊙ a bᵀ)ᵀ: equal in fp32 up to summation order; in a 16-bit
    compute dtype both are within that dtype's rounding of the fp32 value."""
    _, t = _stored(n, k, n + k)
    x = _x((5, k))
    bias = _x((n,), seed=3) if with_bias else None
    w = fmt.dequantize(*t)
    assert w.dtype == torch.float32 and w.shape == (n, k)
    dense = F.linear(x, w, bias)
    assert rel(op.reference(x, *t, bias), dense) < 1e-6
    for cd, tol in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        assert rel(op.reference(x, *t, bias, compute_dtype=cd), dense) < tol
        assert rel(F.linear(x.to(cd), w.to(cd), None if bias is None else bias.to(cd)), dense) < tol
    assert torch.equal(op.OP.dequantized(dict(zip(op.OP.tensors, t)), {"compute_dtype": None}), w)


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(cd):
    _, t = _stored(24, 64, 7)
    x = _x((3, 64))
    y = torch.ops.fxquant.linear_onebit(x, *t, None, compute_dtype=cd)
    r32 = op.reference(x, *t, None)
    assert rel(y, op.reference(x, *t, None, compute_dtype=cd)) < (1e-6 if cd == torch.float32 else 1e-2)
    assert rel(y, r32) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[cd]


# ---- registration, autograd --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(dtype, with_bias):
    _, t = _stored(24, 41)
    x = torch.randn(2, 5, 41, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_onebit.default, (x, *t, b))


def test_schema_is_explicit():
    schema = str(torch.ops.fxquant.linear_onebit.default._schema)
    assert schema.startswith("fxquant::linear_onebit(Tensor x, Tensor sign_bits, Tensor a, Tensor b, Tensor? bias")


def test_backward_is_gradient_of_dequantized_linear():
    _, t = _stored(16, 50, 5)
    w = fmt.dequantize(*t)
    x = torch.randn(3, 50, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    torch.ops.fxquant.linear_onebit(x, *t, b).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


# ---- the scheme -----------------------------------------------------------------------------------------
def test_scheme_strings_and_json():
    assert parse_scheme("onebit") == OneBit() and parse_scheme(" OneBit ") == OneBit()
    assert str(OneBit()) == "onebit" and "onebit" in fxquant.schemes.valid_scheme_names()
    for s in (OneBit(), OneBit(compute_dtype=torch.bfloat16), OneBit(compute_dtype=torch.float16)):
        assert scheme_from_json(scheme_to_json(s)) == s
    assert scheme_to_json(OneBit(compute_dtype=torch.bfloat16)) == {"scheme": "onebit", "compute_dtype": "bfloat16",
                                                                  "method": None}
    with pytest.raises(ValueError, match=r"OneBit.compute_dtype=torch.int8 is not supported; valid: None"):
        OneBit(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown scheme 'onebit-2'"):
        parse_scheme("onebit-2")


def test_scheme_quantize():
    w, t = _stored(30, 45, 9)
    s = OneBit(compute_dtype=torch.bfloat16)
    qw = s.quantize(w)
    assert qw.op == "linear_onebit" and list(qw.tensors) == ["sign_bits", "a", "b"]
    assert qw.attrs == {"compute_dtype": torch.bfloat16} and OneBit().quantize(w).attrs == {}
    assert qw.nbytes == fmt.nbytes(30, 45) == 30 * 6 + 2 * 75
    assert all(torch.equal(x, y) for x, y in zip(qw.tensors.values(), t))
    assert torch.equal(s.dequantize(qw), fmt.dequantize(*t))
    assert s.unsupported_reason(w) is None
    assert "2-D" in s.unsupported_reason(torch.randn(3))
    assert "non-finite" in s.unsupported_reason(torch.tensor([[1.0, float("inf")]]))
    assert "no elements" in s.unsupported_reason(torch.zeros(0, 4))


class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(3))
        for lin in self.layers:
            lin.weight.data = torch.randn(64, 64, generator=g) / 8
        self.head = torch.nn.Linear(64, 24, bias=False)

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu(lin(x)) + x
        return self.head(x)


def test_compile_fullgraph_mixing_formats():
    torch._dynamo.reset()
    m = _Mixed().eval()
    spec = fxquant.Spec(default="onebit", rules={"layers.1": "int8wo", "head": OneBit(compute_dtype=torch.bfloat16)})
    qm = fxquant.compile(m, spec, (torch.randn(2, 5, 64),))
    rows = {r.fqn: r for r in fxquant.report(qm).rows}
    assert rows["layers.0"].scheme == "onebit" and rows["layers.1"].scheme == "int8wo"
    assert rows["layers.0"].bytes_after == fmt.nbytes(64, 64) == 64 * 8 + 2 * 128
    assert 0.5 < rows["layers.0"].rel_error < 0.7  # sqrt(1 - 2/pi) for Gaussian weights
    cm = torch.compile(qm, fullgraph=True)
    for shape in [(2, 5, 64), (1, 1, 64), (3, 7, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(cm(x), qm(x), rtol=1e-4, atol=1e-4)
