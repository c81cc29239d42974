"""The Triton intx kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import pytest
import torch

from fxquant.formats import intx
from fxquant.ops import intx as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("intx")  # skips the module without Triton

# Kernel and reference differ in fp32 summation order (and on a GPU in the 16-bit rounding of the
# dequantized tile): ~2 ulps of the output dtype plus a small atol near zero.  fp32: measured max
# |diff| 3e-5 at K=96 on the interpreter (outputs of magnitude ~10).
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def _case(m, n, k, bits, group_size, symmetric, axis, block_n, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    stored = intx.to_storage(torch.randn(n, k, generator=g), bits, group_size, symmetric, axis, block_n)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x2d=to(x), **{name: to(t) for name, t in stored.items()}, bias=to(bias), bits=bits,
                group_size=group_size, symmetric=symmetric, axis=axis, block_n=block_n, out_features=n, in_features=k)


# Unit roundoff of a dequantized weight rounded to the activation dtype (the kernel's per-element
# path on 16-bit activations): |y - ref| <= u * (|x| @ |W|.T) on top of TOL.
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _check_close(args: dict):
    y = kernel.intx_linear(**args)
    tensors = (args["codes_lo"], args["codes_hi"], args["scale"], args["offset"])
    scalars = (args["bits"], args["group_size"], args["symmetric"], args["axis"], args["block_n"], args["out_features"],
               args["in_features"])
    ref = op.reference(args["x2d"], *tensors, args["bias"], *scalars)
    dtype = args["x2d"].dtype
    assert y.dtype == dtype and y.shape == ref.shape
    w = op.dequantize_weight(*tensors, *scalars)
    tol = TOL[dtype]
    bound = UNIT_ROUNDOFF[dtype] * (args["x2d"].float().abs() @ w.abs().t()) + tol["atol"] + tol["rtol"] * ref.float().abs()
    excess = (y.float() - ref.float()).abs() - bound
    assert excess.max() <= 0, f"max |y - ref| exceeds the bound by {excess.max().item():.3g}"


# Every width, both axes, both flavours; (M, N, K, group, block_n) vary along the list so that one
# pass covers M = 1 / odd M, padded rows (N = 40 -> Np = 64), K not a multiple of BLOCK_K (axis 0),
# group sizes smaller than, equal to and crossing BLOCK_K, and every tile height.
SHAPES = [(1, 40, 96, 32, 32), (5, 48, 70, 3, 16), (17, 24, 64, 64, 64), (3, 72, 160, 16, 32)]
CASES = [(bits, sym, axis, *SHAPES[(bits + 2 * axis + sym) % len(SHAPES)])
         for bits in intx.BITS for sym in (False, True) for axis in (0, 1) if not (sym and bits == 1)]


def _fit(axis, n, k, group):
    """axis 1 groups K, axis 0 groups N: round the grouped dim to a multiple of the group."""
    return (n, group * max(k // group, 1)) if axis == 1 else (group * max(n // group, 1), k)


@pytest.mark.parametrize("bits,symmetric,axis,m,n,k,group,block_n", CASES, ids=lambda v: str(v))
def test_matches_reference(bits, symmetric, axis, m, n, k, group, block_n):
    """Whole groups (the shapes rounded) ..."""
    n, k = _fit(axis, n, k, group)
    dtype = torch.bfloat16 if bits % 2 else torch.float32
    _check_close(_case(m, n, k, bits, group, symmetric, axis, block_n, dtype, with_bias=bits % 3 == 0, seed=bits))


@pytest.mark.parametrize("bits,symmetric,axis,m,n,k,group,block_n", CASES, ids=lambda v: str(v))
def test_partial_groups_match_reference(bits, symmetric, axis, m, n, k, group, block_n):
    """... and the same shapes as they are: a partial last group along K (axis 1: x masked to K) or N
    (axis 0: ceil(N/g) param rows)."""
    dtype = torch.float32 if bits % 2 else torch.bfloat16
    args = _case(m, n, k, bits, group, symmetric, axis, block_n, dtype, with_bias=bits % 2 == 0, seed=bits + 1)
    _check_close(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits,axis", [(3, 1), (8, 0), (4, 1)])
def test_dtypes(bits, axis, dtype):
    _check_close(_case(7, 64, 128, bits, 32, False, axis, 32, dtype, with_bias=True))


def test_strided_activation():
    """x is read through its strides: a column-sliced view gives the same result as a copy."""
    args = _case(5, 40, 64, 5, 32, False, 1, 32, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = args["x2d"]
    args["x2d"] = wide[:, ::2]
    assert not args["x2d"].is_contiguous()
    _check_close(args)


def test_empty_batch():
    args = _case(1, 40, 32, 3, 32, True, 1, 16, torch.float32, with_bias=False)
    args["x2d"] = args["x2d"][:0]
    assert kernel.intx_linear(**args).shape == (0, 40)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "x2d": a["x2d"][:, :-32]}, r"x has 32 input features .* in_features=64"),
    (lambda a: {**a, "x2d": a["x2d"][:, :-1]}, r"x has 63 input features .* in_features=64"),
    (lambda a: {**a, "in_features": 63}, r"x has 64 input features .* in_features=63"),
    (lambda a: {**a, "x2d": a["x2d"].to(torch.int32)}, r"x2d must be a 2-D \[M, K\] tensor"),
    (lambda a: {**a, "bits": 9}, r"bits=9 is not supported; valid: 1..8"),
    (lambda a: {**a, "axis": 2}, r"axis=2 is not supported; valid: 0, 1"),
    (lambda a: {**a, "group_size": 48}, r"codes_lo must be torch.uint8 of shape \(2304,\)"),  # Kp = 96
    (lambda a: {**a, "block_n": 24}, r"block_n=24 is not supported; valid: an even divisor of 64"),
    (lambda a: {**a, "codes_hi": a["codes_lo"]}, r"codes_hi must be torch.uint8 of shape \(0,\)"),
    (lambda a: {**a, "scale": a["scale"][:1]}, r"scale must be torch.bfloat16 of shape \(2, 40\)"),
    (lambda a: {**a, "symmetric": True}, r"offset must be torch.bfloat16 of shape \(0,\) \(empty: symmetric=True\)"),
    (lambda a: {**a, "bias": torch.zeros(64, device=DEVICE)},
     r"bias must be None or a floating-point tensor of shape \(40,\)"),
], ids=["wrong_K", "K_minus_1", "in_features_minus_1", "x_int32", "bits", "axis", "group", "block_n", "codes_hi", "scale_shape", "symmetric",
        "bias"])
def test_bad_inputs_raise(mutate, match):
    args = mutate(_case(2, 40, 64, 3, 32, False, 1, 32, torch.float32, with_bias=True))
    with pytest.raises(ValueError, match=match):
        kernel.intx_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bits,axis", [(3, 1), (8, 0), (4, 1)])
def test_cuda_op_dispatches_to_kernel(dtype, bits, axis):
    """``torch.ops.fxquant.linear_intx`` on CUDA tensors (3-D x) runs the kernel and matches."""
    a = {name: t.cuda() if isinstance(t, torch.Tensor) else t
         for name, t in _case(7, 72, 256, bits, 8, False, axis, 32, dtype, with_bias=True).items()}
    x = a.pop("x2d").reshape(7, 1, 256)
    args = (x, a["codes_lo"], a["codes_hi"], a["scale"], a["offset"], a["bias"], bits, 8, False, axis, 32, 72, 256)
    y = torch.ops.fxquant.linear_intx(*args)
    assert y.is_cuda and y.shape == (7, 1, 72)
    torch.testing.assert_close(y, op.reference(*args), **TOL[dtype])
