"""The Triton float8wo / float8dq kernels against the ops' references, on the CPU interpreter (or a GPU)."""
import pytest
import torch

from fxquant.formats import float8
from fxquant.ops import float8 as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("float8")  # skips the module without Triton

# Kernel and reference differ only in fp32 summation order (and, for bf16/fp16 outputs, the final
# rounding it can flip): ~2 ulps of the output dtype plus a small atol near zero.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
UB = float8.DEFAULT_ACTIVATION_SCALE_UB
# Odd sizes on purpose: M=1 (decode), M, N, K not multiples of the tiles (interpreter: 16x32x32).
SHAPES = [(1, 40, 64), (3, 16, 96), (17, 72, 33), (5, 1, 32)]


def _to(t):
    return None if t is None else t.to(DEVICE)


def _case(m, n, k, dtype, with_bias, w_dtype=torch.float8_e4m3fn, granularity="row", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = float8.quantize_weight(torch.randn(n, k, generator=g) * 0.1, w_dtype, granularity)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return _to(x), _to(q), _to(s), _to(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("w_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
def test_float8wo_matches_reference(m, n, k, w_dtype, dtype):
    x, q, s, b = _case(m, n, k, dtype, with_bias=m != 3, w_dtype=w_dtype)
    y = kernel.float8wo_linear(x, q, s, b)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, op.reference_wo(x, q, s, b), **TOL[dtype])


@pytest.mark.parametrize("dot_fp8", [True, False], ids=["fp8_dot", "fp16_dot"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
def test_float8dq_matches_reference(m, n, k, dtype, granularity, dot_fp8):
    if dot_fp8 and not kernel.fp8_dot_supported(torch.device(DEVICE)):
        pytest.skip("float8 tl.dot needs an sm89+ GPU (this one is older)")
    x, q, s, b = _case(m, n, k, dtype, with_bias=m != 3, granularity=granularity)
    x = x * torch.linspace(1, 3000, m, device=DEVICE, dtype=dtype)[:, None]  # rows above the scale bound
    y = kernel.float8dq_linear(x, q, s, b, granularity=granularity, activation_scale_ub=UB, dot_fp8=dot_fp8)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = op.reference_dq(x, q, s, b, granularity, UB)
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_strided_activation():
    x, q, s, b = _case(5, 40, 64, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = x
    xs = wide[:, ::2]
    assert not xs.is_contiguous()
    torch.testing.assert_close(kernel.float8wo_linear(xs, q, s, b), op.reference_wo(x, q, s, b), **TOL[torch.float32])


def test_empty_batch():
    x, q, s, _ = _case(1, 40, 32, torch.float32, with_bias=False)
    assert kernel.float8wo_linear(x[:0], q, s).shape == (0, 40)


@pytest.mark.parametrize("call,match", [
    (lambda x, q, s, b: kernel.float8wo_linear(x[:, :-1], q, s, b), r"x has 31 input features .* in_features=32"),
    (lambda x, q, s, b: kernel.float8wo_linear(x.to(torch.int32), q, s, b), r"x2d must be a 2-D \[M, K\] tensor of dtype"),
    (lambda x, q, s, b: kernel.float8wo_linear(x, q.view(torch.uint8), s, b), r"qweight must be a 2-D tensor of"),
    (lambda x, q, s, b: kernel.float8wo_linear(x, q, s.half(), b), r"scale must be one of torch.float32 of shape \(40,\)"),
    (lambda x, q, s, b: kernel.float8wo_linear(x, q, s, b[:3]),
     r"bias must be None or a floating-point tensor of shape \(40,\)"),
    (lambda x, q, s, b: kernel.float8dq_linear(x, q.to(torch.float8_e5m2), s, b, granularity="row",
                                               activation_scale_ub=UB), r"torch.float8_e4m3fn \[N, ...\], got torch.float8_e5m2"),
    (lambda x, q, s, b: kernel.float8dq_linear(x, q, s, b, granularity="col", activation_scale_ub=UB),
     r"granularity='col' is not supported; valid: tensor, row"),
    (lambda x, q, s, b: kernel.float8dq_linear(x, q, s, b, granularity="tensor", activation_scale_ub=UB),
     r"scale must be one of torch.float32 of shape \(1,\) .*, got torch.float32 of shape \(40,\)"),
], ids=["wrong_K", "x_int32", "qweight_uint8", "scale_fp16", "bias_shape", "dq_e5m2", "granularity", "scale_shape"])
def test_bad_inputs_raise(call, match):
    x, q, s, b = _case(2, 40, 32, torch.float32, with_bias=True)
    with pytest.raises(ValueError, match=match):
        call(x, q, s, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_ops_dispatch_to_kernels(dtype):
    x, q, s, b = (t.cuda() for t in _case(7, 72, 256, dtype, with_bias=True))
    x3 = x.reshape(7, 1, 256)
    y = torch.ops.fxquant.linear_float8wo(x3, q, s, b)
    assert y.is_cuda and y.shape == (7, 1, 72)
    torch.testing.assert_close(y, op.reference_wo(x3, q, s, b), **TOL[dtype])
    y = torch.ops.fxquant.linear_float8dq(x3, q, s, b, "row", UB)
    torch.testing.assert_close(y, op.reference_dq(x3, q, s, b, "row", UB), **TOL[dtype])
