"""The Triton OneBit kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import pytest
import torch

from fxquant.formats import onebit
from fxquant.ops import onebit as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("onebit")  # skips the module without Triton

# Kernel and reference differ in fp32 summation order and, for 16-bit x, in rounding x ⊙ b to
# x's dtype before the dot (the reference forms it in fp32): a relative error of about one ulp
# of x per term, i.e. ~eps * ||y|| overall.  Relative Frobenius bounds (as helpers.rel):
# fp32 measured <= 4e-7 on the interpreter, bf16 0 (routed through fp32), fp16 ~4e-4.
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
MS = (1, 3, 17)
NS = (1, 16, 40, 33)
KS = (1, 7, 8, 9, 31, 32, 33, 100)  # K at and around byte and BLOCK_K (32 interpreted) edges


def _case(m, n, k, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    stored = onebit.quantize(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x2d=to(x), sign_bits=to(stored["sign_bits"]), a=to(stored["a"]), b=to(stored["b"]), bias=to(bias))


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _check_close(args):
    y = kernel.onebit_linear(**args)
    ref = op.reference(args["x2d"], args["sign_bits"], args["a"], args["b"], args["bias"])
    assert y.dtype == args["x2d"].dtype and y.shape == ref.shape
    assert _rel(y, ref) <= TOL[args["x2d"].dtype]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_k_edges(k, dtype):
    i = KS.index(k)
    _check_close(_case(MS[i % 3], NS[i % 4], k, dtype, with_bias=i % 2 == 0, seed=k))


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", NS)
def test_shapes(m, n):
    _check_close(_case(m, n, 77, torch.float32, with_bias=True, seed=m * n))


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (17, 33, 77)])
def test_fp16(m, n, k):
    _check_close(_case(m, n, k, torch.float16, with_bias=True))


def test_agrees_with_dequantized_linear():
    """Both forms of the op: the kernel also matches x @ (S ⊙ a bᵀ)ᵀ + bias."""
    args = _case(5, 24, 50, torch.float32, with_bias=True)
    y = kernel.onebit_linear(**args)
    w = onebit.dequantize(args["sign_bits"], args["a"], args["b"])
    assert _rel(y, torch.nn.functional.linear(args["x2d"], w, args["bias"])) < 1e-5


def test_strided_activation():
    args = _case(5, 40, 64, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = args["x2d"]
    args["x2d"] = wide[:, ::2]
    assert not args["x2d"].is_contiguous()
    _check_close(args)


def test_empty_batch():
    args = _case(1, 40, 32, torch.float32, with_bias=False)
    args["x2d"] = args["x2d"][:0]
    assert kernel.onebit_linear(**args).shape == (0, 40)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "x2d": a["x2d"][:, :-9]}, r"x has 31 input features .* in_features=40"),
    (lambda a: {**a, "x2d": a["x2d"].to(torch.int32)}, r"x2d must be a 2-D \[M, K\] tensor of dtype"),
    (lambda a: {**a, "x2d": a["x2d"][0]}, r"x2d must be a 2-D \[M, K\] tensor"),
    (lambda a: {**a, "sign_bits": a["sign_bits"].to(torch.int8)}, r"sign_bits must be torch.uint8 of shape \(40, 5\)"),
    (lambda a: {**a, "sign_bits": a["sign_bits"][:, :-1]}, r"sign_bits must be torch.uint8 of shape \(40, 5\) .* got torch.uint8 of shape \(40, 4\)"),
    (lambda a: {**a, "a": a["a"][:-1]}, r"sign_bits must be torch.uint8 of shape \(39, 5\)"),
    (lambda a: {**a, "bias": torch.zeros(41, device=DEVICE)},
     r"bias must be None or a floating-point tensor of shape \(40,\)"),
], ids=["wrong_K", "x_int32", "x_1d", "bits_int8", "bits_cols", "a_shape", "bias_shape"])
def test_bad_inputs_raise(mutate, match):
    args = mutate(_case(2, 40, 40, torch.float32, with_bias=True))
    with pytest.raises(ValueError, match=match):
        kernel.onebit_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_op_dispatches_to_kernel(dtype):
    """``torch.ops.fxquant.linear_onebit`` on CUDA tensors (3-D x) runs the kernel and matches."""
    a = _case(7, 72, 100, dtype, with_bias=True)
    a = {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in a.items()}
    x = a["x2d"].reshape(7, 1, 100)
    args = (x, a["sign_bits"], a["a"], a["b"], a["bias"])
    y = torch.ops.fxquant.linear_onebit(*args)
    assert y.is_cuda and y.shape == (7, 1, 72)
    assert _rel(y, op.reference(*args)) <= TOL[dtype]
