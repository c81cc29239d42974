"""The Triton fpx kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import pytest
import torch

from fxquant.formats import fpx
from fxquant.ops import fpx as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("fpx")  # skips the module without Triton

# Kernel and reference differ only in fp32 summation order (and the final rounding it can flip).
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
# every plane split (2+1, 4, 4+1, 4+2, 4+2+1), both decoders (fp16 bits: ebits <= 4; table: 5, 6)
FORMATS = ["fp3_e1m1", "fp3_e2m0", "fp4_e2m1", "fp5_e2m2", "fp6_e3m2", "fp6_e2m3", "fp7_e4m2", "fp6_e5m0", "fp7_e6m0"]
# Odd sizes on purpose: M=1, K not a multiple of 8 (padded codes) nor of the 32-wide K tile.
SHAPES = [(1, 40, 64), (3, 16, 41), (17, 72, 96)]


def _case(name, m, n, k, dtype, with_bias, seed=0):
    e, mb = fpx.parse_format(name)
    g = torch.Generator().manual_seed(seed)
    st = fpx.to_storage(torch.randn(n, k, generator=g) * 0.1, e, mb)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x2d=to(x), qweight=to(st["qweight"]), scale=to(st["scale"]), bias=to(b), ebits=e, mbits=mb,
                in_features=k)


def _check_close(args, **kw):
    y = kernel.fpx_linear(**args, **kw)
    ref = op.reference(args["x2d"], args["qweight"], args["scale"], args["bias"], args["ebits"], args["mbits"],
                       args["in_features"])
    assert y.dtype == args["x2d"].dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[args["x2d"].dtype])


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
def test_matches_reference_fp32(name, m, n, k):
    _check_close(_case(name, m, n, k, torch.float32, with_bias=m != 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["fp6_e3m2", "fp4_e2m1", "fp6_e5m0", "fp7_e6m0"])
def test_matches_reference_16bit(name, dtype):
    _check_close(_case(name, 5, 40, 72, dtype, with_bias=True))


@pytest.mark.parametrize("name", ["fp6_e3m2", "fp5_e2m2", "fp3_e1m1"])
def test_table_decoder_matches_bit_decoder(name):
    """Both decoders on the same inputs: the table (any format) and fp16 bit moves (ebits <= 4)."""
    args = _case(name, 3, 40, 41, torch.float32, with_bias=True)
    torch.testing.assert_close(kernel.fpx_linear(**args, fp16_bits=False), kernel.fpx_linear(**args, fp16_bits=True),
                               **TOL[torch.float32])


def test_strided_activation():
    args = _case("fp6_e3m2", 5, 40, 64, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = args["x2d"]
    args["x2d"] = wide[:, ::2]
    assert not args["x2d"].is_contiguous()
    _check_close(args)


def test_empty_batch():
    args = _case("fp6_e3m2", 1, 40, 32, torch.float32, with_bias=False)
    args["x2d"] = args["x2d"][:0]
    assert kernel.fpx_linear(**args).shape == (0, 40)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "x2d": a["x2d"][:, :-1]}, r"x has 31 input features .* in_features=32"),
    (lambda a: {**a, "x2d": a["x2d"][:, :-8], "in_features": 24}, r"qweight must be torch.uint8 of shape \(40, 18\)"),
    (lambda a: {**a, "x2d": a["x2d"].to(torch.int32)}, r"x2d must be a 2-D \[M, K\] tensor of dtype"),
    (lambda a: {**a, "qweight": a["qweight"].to(torch.int8)}, r"qweight must be a 2-D tensor of torch.uint8"),
    (lambda a: {**a, "scale": a["scale"][:3]}, r"scale must be torch.bfloat16 of shape \(40,\)"),
    (lambda a: {**a, "bias": torch.zeros(3, device=DEVICE)},
     r"bias must be None or a floating-point tensor of shape \(40,\)"),
    (lambda a: {**a, "ebits": 5, "mbits": 3}, r"fpx_linear: fxquant::linear_fpx: ebits=5, mbits=3 is not supported"),
    (lambda a: {**a, "ebits": 5, "mbits": 0, "fp16_bits": True}, r"fp16_bits=True needs ebits <= 4 .* got ebits=5"),
], ids=["wrong_K", "wrong_in_features", "x_int32", "qweight_int8", "scale_shape", "bias_shape", "bad_format", "fp16_bits_e5"])
def test_bad_inputs_raise(mutate, match):
    args = mutate(_case("fp6_e3m2", 2, 40, 32, torch.float32, with_bias=True))
    with pytest.raises(ValueError, match=match):
        kernel.fpx_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["fp6_e3m2", "fp4_e2m1", "fp7_e6m0"])
def test_cuda_op_dispatches_to_kernel(name, dtype):
    a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _case(name, 7, 72, 256, dtype, True).items()}
    x = a["x2d"].reshape(7, 1, 256)
    args = (x, a["qweight"], a["scale"], a["bias"], a["ebits"], a["mbits"], 256)
    y = torch.ops.fxquant.linear_fpx(*args)
    assert y.is_cuda and y.shape == (7, 1, 72)
    torch.testing.assert_close(y, op.reference(*args), **TOL[dtype])
