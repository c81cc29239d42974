"""linear_affine_perm (the affine weight on permuted input columns: GPTQ act-order layers): the reference
against ``F.linear`` on the weight with its columns put back (independent of the op: ``Ws[:, invperm]``),
the CPU path against the reference over shapes and dtypes, opcheck, autograd, compile, and refusals."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.library import opcheck

from fxquant.modules import QuantizedLinear
from fxquant.ops import affine as affine_op
from fxquant.ops import affine_perm as op
from fxquant.schemes import parse_scheme
from helpers import assert_linear_close, policy_x, rel

SCHEMES = ["affine4-g32-fp16", "affine4-g16-sym", "affine8-ch-fp16", "affine3-g32", "affine2-g8-sym-fp32"]


def build(scheme: str, n: int, k: int, seed: int = 0):
    """A random affine layer and a random permutation -> (args, attrs, stored weight Ws [N, K], perm)."""
    g = torch.Generator().manual_seed(seed)
    qw = parse_scheme(scheme).quantize(torch.randn(n, k, generator=g))
    perm = torch.randperm(k, generator=g).to(torch.int32)
    t, a = qw.tensors, qw.attrs
    pq = op.packed(t["qweight"], t["scale"], t["zero_point"] if t["zero_point"].numel() else None, perm,
                   bits=a["bits"], group_size=a["group_size"], symmetric=a["symmetric"], n=n, k=k)
    ws = affine_op.dequantize_weight(*t.values(), **a)
    return tuple(pq.tensors.values()), pq.attrs, ws, perm


def unpermuted(ws: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``W`` with ``W[:, perm[i]] = Ws[:, i]``: ``Ws`` indexed by the inverse permutation."""
    return ws[:, torch.argsort(perm.long())]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantized_weight_is_the_stored_weight_unpermuted(scheme):
    args, attrs, ws, perm = build(scheme, 24, 96, 1)
    w = op.dequantize_weight(*args, **attrs)
    assert torch.equal(w, unpermuted(ws, perm))
    x = torch.randn(3, 96)
    assert torch.allclose(x @ w.T, x[:, perm.long()] @ ws.T, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reference_is_a_float_linear_on_that_weight(scheme):
    args, attrs, ws, perm = build(scheme, 19, 64, 2)
    x, b = torch.randn(2, 3, 64), torch.randn(19)
    assert torch.allclose(op.reference(x, *args, b, **attrs), F.linear(x, unpermuted(ws, perm), b), atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
@given(m=st.integers(1, 40), n=st.integers(1, 50), groups=st.integers(1, 4), dtype=st.sampled_from(
       [torch.float32, torch.bfloat16, torch.float16]), with_bias=st.booleans(), seed=st.integers(0, 999))
def test_op_matches_reference(scheme, m, n, groups, dtype, with_bias, seed):
    k = 32 * groups
    args, attrs, ws, perm = build(scheme, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = torch.ops.fxquant.linear_affine_perm(x, *args, b, **attrs)
    assert y.shape == (m, n) and y.dtype == dtype
    r = op.reference(policy_x(x), *args, b, **attrs)
    assert_linear_close(y, r, x, unpermuted(ws, perm), 2**-7 if dtype != torch.float32 else 1e-5, b)


def test_fp32_path_is_the_reference_in_fp32(fp32_dense):
    args, attrs, _, _ = build("affine4-g32-fp16", 200, 128)
    for m in (1, 7, 300):
        x = torch.randn(m, 128)
        y = torch.ops.fxquant.linear_affine_perm(x, *args, None, **attrs)
        assert rel(y, op.reference(x, *args, None, **attrs)) < 1e-6


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(cd):
    args, attrs, _, _ = build("affine4-g32-fp16", 40, 64)
    x = torch.randn(5, 64)
    y = torch.ops.fxquant.linear_affine_perm(x, *args, None, **attrs, compute_dtype=cd)
    r = op.reference(x, *args, None, **attrs, compute_dtype=cd)
    assert y.dtype == torch.float32 and rel(y, r) < (1e-6 if cd == torch.float32 else 1e-2)


@pytest.mark.parametrize("scheme,dtype,with_bias", [("affine4-g32-fp16", torch.float32, True),
                                                     ("affine8-ch-fp16", torch.bfloat16, False)])
def test_opcheck(scheme, dtype, with_bias):
    args, attrs, _, _ = build(scheme, 24, 64)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_affine_perm.default, (x, *args, b), attrs)


def test_backward_is_gradient_of_the_unpermuted_weight():
    args, attrs, ws, perm = build("affine4-g16-sym", 16, 64, 5)
    w = unpermuted(ws, perm)
    x, b = torch.randn(3, 64, requires_grad=True), torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    torch.ops.fxquant.linear_affine_perm(x, *args, b, **attrs).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4) and torch.allclose(b.grad, gy.sum(0))


def test_module_compiles_fullgraph_and_matches_the_op():
    from fxquant.schemes import QuantizedWeight

    args, attrs, _, _ = build("affine4-g32-fp16", 48, 64, 6)
    qw = QuantizedWeight(op.OP_NAME, dict(zip(op.TENSORS, args)), attrs, 48, 64)
    m = nn.Sequential(QuantizedLinear(qw, torch.randn(48), "affine4-g32-fp16+perm"), nn.ReLU())
    x = torch.randn(3, 64)
    eager = m(x)
    assert torch.equal(eager, torch.relu(torch.ops.fxquant.linear_affine_perm(x, *args, m[0].bias, **attrs)))
    assert torch.allclose(torch.compile(m, fullgraph=True)(x), eager, atol=1e-5)


def test_bad_tensors_are_refused_by_name():
    args, attrs, _, perm = build("affine4-g32-fp16", 8, 64)
    x = torch.randn(2, 64)
    qweight, scale, zero, _ = args
    with pytest.raises(ValueError, match=r"perm must be torch.int32 of shape \(64,\)"):
        torch.ops.fxquant.linear_affine_perm(x, qweight, scale, zero, perm.long(), None, **attrs)
    with pytest.raises(ValueError, match=r"perm must be torch.int32 of shape \(64,\)"):
        torch.ops.fxquant.linear_affine_perm(x, qweight, scale, zero, perm[:-1], None, **attrs)
    with pytest.raises(ValueError, match="zero_point must be torch.uint8"):
        torch.ops.fxquant.linear_affine_perm(x, qweight, scale, zero.to(torch.int8), perm, None, **attrs)
    kw = {k: attrs[k] for k in ("bits", "group_size", "symmetric")}
    with pytest.raises(ValueError, match=r"perm is not a permutation of 0..63"):
        op.packed(qweight, scale, zero, torch.zeros(64, dtype=torch.int32), **kw, n=8, k=64)
    with pytest.raises(ValueError, match="qweight has 8 rows, the layer 9 out_features"):
        op.packed(qweight, scale, zero, perm, **kw, n=9, k=64)
