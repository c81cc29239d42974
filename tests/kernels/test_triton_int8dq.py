"""The Triton int8dq / LLM.int8 kernels against the format and the op references, on the CPU
interpreter (or a GPU if present).  The interpreter runs the int8 ``tl.dot`` with int32
accumulation (checked bit-exact below)."""
import pytest
import torch

from fxquant.formats import int8dq as fmt
from fxquant.ops import int8dq as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("int8dq")  # skips the module without Triton
THRESHOLD = 6.0
# The integer part is exact in both; they differ only in the fp32 epilogue (the kernel computes
# acc * sx * scale + facc * scale, the reference (acc * sx) * scale + x_out @ W.T) and the summation
# order of the outlier part: ~1 ulp of fp32; bf16/fp16 outputs may flip one final rounding.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
SHAPES = [(1, 40, 72), (5, 16, 33), (17, 72, 256), (3, 24, 130)]  # M=1, odd M/N/K, K at tile edges


def _case(m, n, k, dtype, with_bias, seed=0, outlier_cols=(0, 70)):
    g = torch.Generator().manual_seed(seed)
    qweight, scale = fmt.quantize_weight(torch.randn(n, k, generator=g) * 0.1)
    x = torch.randn(m, k, generator=g)
    for c in outlier_cols:
        if c < k:
            x[m // 2, c] = 9.0
    x = x.to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(qweight), to(scale), to(bias)


def _reference(x, qweight, scale, bias, threshold):
    if threshold is None:
        return op.reference_int8dq(x, qweight, scale, bias=bias)
    return op.reference_llm_int8(x, qweight, scale, bias=bias, threshold=threshold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("threshold", [None, THRESHOLD], ids=["int8dq", "llm.int8"])
def test_activation_quant_is_bit_exact(threshold, dtype):
    x, *_ = _case(19, 8, 300, dtype, False)
    x[3] = 0  # an all-zero row
    x[5, :4] = torch.tensor([0.5, 1.5, 2.5, 127.0]).to(dtype) * (x[5].abs().max() / 127)  # near ties
    q, s, cols = kernel.quantize_activations(x, threshold)
    if threshold is None:
        q_ref, s_ref = fmt.quantize_activations(x)
        assert cols is None
    else:
        q_ref, s_ref, cols_ref = fmt.quantize_activations_llm(x, threshold)
        assert torch.equal(cols.bool(), cols_ref) and cols.any()
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref.squeeze(1))


def test_int8_dot_accumulates_exactly_in_int32():
    """Extreme codes (+-127 everywhere): sums far beyond int16 / fp16 must be exact."""
    m, n, k = 16, 64, 512
    x = torch.full((m, k), 1.0, device=DEVICE)
    x[1::2] = -1.0  # codes +-127, row scale 1/127
    qweight = torch.full((n, k), 127, dtype=torch.int8, device=DEVICE)
    qweight[::3] = -127
    scale = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    y = kernel.int8dq_linear(x, qweight, scale)
    torch.testing.assert_close(y, op.reference_int8dq(x, qweight, scale, bias=None), **TOL[torch.float32])
    assert y.abs().max().item() > 65000  # |acc| = 127 * 127 * 512: beyond int16 and fp16


@pytest.mark.parametrize("threshold", [None, THRESHOLD], ids=["int8dq", "llm.int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
def test_matches_reference(m, n, k, dtype, threshold):
    x, qweight, scale, bias = _case(m, n, k, dtype, with_bias=m % 2 == 1)
    y = kernel.int8dq_linear(x, qweight, scale, bias, threshold=threshold)
    ref = _reference(x, qweight, scale, bias, threshold)
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_matches_reference_fp16():
    x, qweight, scale, bias = _case(9, 40, 96, torch.float16, with_bias=True)
    for threshold in (None, THRESHOLD):
        y = kernel.int8dq_linear(x, qweight, scale, bias, threshold=threshold)
        torch.testing.assert_close(y, _reference(x, qweight, scale, bias, threshold), **TOL[torch.float16])


@pytest.mark.parametrize("outlier_cols", [(), (200,), (0, 1, 2, 255)], ids=["none", "one_tile", "edges"])
def test_outlier_tiles(outlier_cols):
    """Outlier columns in one K tile, at both ends, or none at all (every tile skipped)."""
    x, qweight, scale, _ = _case(6, 32, 256, torch.float32, False, outlier_cols=outlier_cols)
    y = kernel.int8dq_linear(x, qweight, scale, threshold=THRESHOLD)
    torch.testing.assert_close(y, _reference(x, qweight, scale, None, THRESHOLD), **TOL[torch.float32])


def test_strided_activation():
    """x is read through its strides: a column-sliced view gives the same result as a copy."""
    x, qweight, scale, bias = _case(5, 40, 64, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = x
    view = wide[:, ::2]
    assert not view.is_contiguous()
    for threshold in (None, THRESHOLD):
        torch.testing.assert_close(kernel.int8dq_linear(view, qweight, scale, bias, threshold=threshold),
                                   _reference(x, qweight, scale, bias, threshold), **TOL[torch.float32])


def test_empty_batch():
    x, qweight, scale, _ = _case(1, 16, 32, torch.float32, with_bias=False)
    assert kernel.int8dq_linear(x[:0], qweight, scale, threshold=THRESHOLD).shape == (0, 16)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "x2d": a["x2d"][:, :-8]}, r"x has 24 input features .* in_features=32"),
    (lambda a: {**a, "x2d": a["x2d"].double()}, r"x2d must be a 2-D \[M, K\] tensor of dtype .* got torch.float64"),
    (lambda a: {**a, "x2d": a["x2d"][0]}, r"x2d must be a 2-D \[M, K\] tensor"),
    (lambda a: {**a, "qweight": a["qweight"].float()}, r"qweight must be a 2-D tensor of torch.int8 .* got torch.float32"),
    (lambda a: {**a, "scale": a["scale"][:8]}, r"scale must be torch.bfloat16 of shape \(16,\)"),
    (lambda a: {**a, "bias": torch.zeros(15, device=DEVICE)}, r"bias must be None or a floating-point tensor"),
    (lambda a: {**a, "threshold": 0.0}, r"threshold=0.0 is not supported; valid: a float > 0"),
], ids=["wrong_K", "x_float64", "x_1d", "qweight_float", "scale_shape", "bias_shape", "threshold_zero"])
def test_bad_inputs_raise(mutate, match):
    x, qweight, scale, bias = _case(2, 16, 32, torch.float32, with_bias=True)
    args = mutate({"x2d": x, "qweight": qweight, "scale": scale, "bias": bias, "threshold": None})
    with pytest.raises(ValueError, match=match):
        kernel.int8dq_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_ops_dispatch_to_kernel(dtype):
    """The fxquant ops on CUDA tensors (3-D x) run the kernel and match their references."""
    x, qweight, scale, bias = (t.cuda() for t in _case(7, 72, 256, dtype, with_bias=True))
    x = x.reshape(7, 1, 256)
    y = torch.ops.fxquant.linear_int8dq(x, qweight, scale, bias)
    torch.testing.assert_close(y, op.reference_int8dq(x, qweight, scale, bias=bias), **TOL[dtype])
    y = torch.ops.fxquant.linear_llm_int8(x, qweight, scale, bias, THRESHOLD)
    torch.testing.assert_close(y, op.reference_llm_int8(x, qweight, scale, bias=bias, threshold=THRESHOLD),
                               **TOL[dtype])
