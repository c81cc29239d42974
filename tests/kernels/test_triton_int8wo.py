"""The Triton int8wo kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import itertools

import pytest
import torch

from fxquant.formats import int8
from fxquant.ops import int8wo as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("int8wo")  # skips the module without Triton

# Kernel and reference differ only in fp32 summation order, which can flip the final rounding of
# an output: allow ~2 ulps of the output dtype (bf16 eps 2^-7, fp16 eps 2^-10) plus a small atol
# for outputs near zero.  fp32: measured max |diff| 3e-6 at K=256 on the interpreter.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
# Odd sizes on purpose: M=1 (decode) and M, N, K that are not multiples of the tiles.
MS, NS, KS = (1, 3, 17), (16, 40, 72), (32, 64, 96, 256)


def _case(m: int, n: int, k: int, dtype: torch.dtype, with_bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qweight, scale = int8.quantize(torch.randn(n, k, generator=g) * 0.1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(qweight), to(scale), to(bias)


def _check_close(x, qweight, scale, bias):
    y = kernel.int8wo_linear(x, qweight, scale, bias)
    ref = op.reference(x, qweight, scale, bias)
    assert y.dtype == x.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n,k", list(itertools.product(MS, NS, KS)), ids=lambda v: str(v))
def test_matches_reference(m, n, k, with_bias, dtype):
    _check_close(*_case(m, n, k, dtype, with_bias))


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (17, 72, 256)])
def test_matches_reference_fp16(m, n, k):
    _check_close(*_case(m, n, k, torch.float16, with_bias=True))


def test_strided_activation():
    """x is read through its strides: a column-sliced view gives the same result as a copy."""
    x, qweight, scale, bias = _case(5, 40, 64, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = x
    view = wide[:, ::2]
    assert not view.is_contiguous()
    _check_close(view, qweight, scale, bias)


def test_empty_batch():
    x, qweight, scale, _ = _case(1, 16, 32, torch.float32, with_bias=False)
    assert kernel.int8wo_linear(x[:0], qweight, scale).shape == (0, 16)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "x2d": a["x2d"][:, :-8]}, r"x has 24 input features .* in_features=32"),
    (lambda a: {**a, "x2d": a["x2d"].double()}, r"x2d must be a 2-D \[M, K\] tensor of dtype .* got torch.float64"),
    (lambda a: {**a, "x2d": a["x2d"][0]}, r"x2d must be a 2-D \[M, K\] tensor"),
    (lambda a: {**a, "qweight": a["qweight"].float()}, r"qweight must be a 2-D tensor of torch.int8 .* got torch.float32"),
    (lambda a: {**a, "scale": a["scale"][:8]}, r"scale must be torch.bfloat16 of shape \(16,\)"),
    (lambda a: {**a, "bias": torch.zeros(15, device=DEVICE)},
     r"bias must be None or a floating-point tensor of shape \(16,\)"),
], ids=["wrong_K", "x_float64", "x_1d", "qweight_float", "scale_shape", "bias_shape"])
def test_bad_inputs_raise(mutate, match):
    x, qweight, scale, bias = _case(2, 16, 32, torch.float32, with_bias=True)
    args = mutate({"x2d": x, "qweight": qweight, "scale": scale, "bias": bias})
    with pytest.raises(ValueError, match=match):
        kernel.int8wo_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_op_dispatches_to_kernel(dtype):
    """``torch.ops.fxquant.linear_int8wo`` on CUDA tensors (3-D x) runs the kernel and matches."""
    x, qweight, scale, bias = (t.cuda() for t in _case(7, 72, 256, dtype, with_bias=True))
    x = x.reshape(7, 1, 256)
    y = torch.ops.fxquant.linear_int8wo(x, qweight, scale, bias)
    assert y.is_cuda and y.shape == (7, 1, 72)
    torch.testing.assert_close(y, op.reference(x, qweight, scale, bias), **TOL[dtype])
