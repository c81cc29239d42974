"""The Triton int4wo kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import itertools

import pytest
import torch

from fxquant.formats import int4
from fxquant.ops import int4wo as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("int4wo")  # skips the module without Triton

# Kernel and reference differ only in fp32 summation order, which can flip the final rounding of
# an output: allow ~2 ulps of the output dtype (bf16 eps 2^-7, fp16 eps 2^-10) plus a small atol
# for outputs near zero.  fp32: measured max |diff| 3e-6 at K=256 on the interpreter.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}
MS, NS = (1, 3, 17), (16, 40, 72)  # N=72 is stored as Np=128: padded rows must not leak out
# (K, group_size) with K % group_size == 0: one group, several groups, groups crossing BLOCK_K.
K_GROUPS = [(32, 32), (64, 32), (64, 64), (96, 32), (256, 32), (256, 64), (256, 128)]
BLOCK_NS = (16, 32, 64)
# Layout cases: every (K, group) x block_n, in both dtypes, with and without bias; (M, N) cycles
# through all 9 pairs along the 21 layouts.  The full product (756 cases) would take ~50 s
# interpreted; test_shapes covers the full M x N grid at one layout.
MN = list(itertools.product(MS, NS))
LAYOUTS = [(k, g, bn, *MN[i % len(MN)]) for i, ((k, g), bn) in enumerate(itertools.product(K_GROUPS, BLOCK_NS))]


def _case(m: int, n: int, k: int, group_size: int, block_n: int, dtype: torch.dtype, with_bias: bool,
          seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    stored = int4.to_storage(torch.randn(n, k, generator=g) * 0.1, group_size, block_n)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x2d=to(x), qweight=to(stored["qweight"]), scales_and_zeros=to(stored["scales_and_zeros"]),
                bias=to(bias), group_size=group_size, block_n=block_n, out_features=n, in_features=k)


def _check_close(args: dict):
    y = kernel.int4wo_linear(**args)
    ref = op.reference(args["x2d"], args["qweight"], args["scales_and_zeros"], args["bias"],
                       args["group_size"], args["block_n"], args["out_features"], args["in_features"])
    assert y.dtype == args["x2d"].dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, **TOL[args["x2d"].dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("k,group_size,block_n,m,n", LAYOUTS, ids=lambda v: str(v))
def test_layouts(k, group_size, block_n, m, n, with_bias, dtype):
    _check_close(_case(m, n, k, group_size, block_n, dtype, with_bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n", MN, ids=lambda v: str(v))
def test_shapes(m, n, with_bias, dtype):
    _check_close(_case(m, n, 256, 64, 32, dtype, with_bias))


@pytest.mark.parametrize("m,n,k,group_size,block_n", [(1, 40, 128, 128, 16), (17, 72, 256, 64, 64)])
def test_matches_reference_fp16(m, n, k, group_size, block_n):
    _check_close(_case(m, n, k, group_size, block_n, torch.float16, with_bias=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k,group_size,block_n", [(1, 40, 100, 32, 32), (3, 24, 33, 32, 64), (2, 72, 70, 64, 16),
                                                      (1, 16, 160, 128, 32)])
def test_partial_last_group(m, n, k, group_size, block_n, dtype):
    """K not a multiple of the group: the stored Kp columns are read, x masked to its K (a one-column
    last group, a half group, a group smaller than a K step)."""
    args = _case(m, n, k, group_size, block_n, dtype, with_bias=True)
    assert args["qweight"].shape[1] * 2 == -(-k // group_size) * group_size > k
    _check_close(args)


def test_group_256():
    _check_close(_case(3, 40, 512, 256, 32, torch.bfloat16, with_bias=False))


def test_strided_activation():
    """x is read through its strides: a column-sliced view gives the same result as a copy."""
    args = _case(5, 40, 64, 32, 32, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = args["x2d"]
    args["x2d"] = wide[:, ::2]
    assert not args["x2d"].is_contiguous()
    _check_close(args)


def test_empty_batch():
    args = _case(1, 40, 32, 32, 16, torch.float32, with_bias=False)
    args["x2d"] = args["x2d"][:0]
    assert kernel.int4wo_linear(**args).shape == (0, 40)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: {**a, "x2d": a["x2d"][:, :-32]}, r"x has 32 input features .* in_features=64"),
    (lambda a: {**a, "x2d": a["x2d"][:, :-1]}, r"x has 63 input features .* in_features=64"),
    (lambda a: {**a, "in_features": 63}, r"x has 64 input features .* in_features=63"),  # storage fits 63 too
    (lambda a: {**a, "x2d": a["x2d"].to(torch.int32)}, r"x2d must be a 2-D \[M, K\] tensor of dtype"),
    (lambda a: {**a, "qweight": a["qweight"].to(torch.int8)}, r"qweight must be torch.uint8 of shape .* got torch.int8"),
    (lambda a: {**a, "group_size": 48}, r"group_size=48 is not supported; valid: 32, 64, 128, 256"),
    (lambda a: {**a, "group_size": 128}, r"qweight must be torch.uint8 of shape \(64, 64\) \[Np, Kp/2\], got .*\(64, 32\)"),
    (lambda a: {**a, "block_n": 24}, r"block_n=24 is not supported; valid: an even divisor of 64"),
    (lambda a: {**a, "out_features": 65}, r"qweight must be torch.uint8 of shape \(128, 32\)"),
    (lambda a: {**a, "scales_and_zeros": a["scales_and_zeros"][:1]},
     r"scales_and_zeros must be torch.bfloat16 of shape \(2, 64, 2\)"),
    (lambda a: {**a, "bias": torch.zeros(64, device=DEVICE)},
     r"bias must be None or a floating-point tensor of shape \(40,\)"),
], ids=["wrong_K", "K_minus_1", "in_features_minus_1", "x_int32", "qweight_int8", "group_48", "group_128", "block_n",
        "out_features", "scales_shape", "bias_shape"])
def test_bad_inputs_raise(mutate, match):
    args = mutate(_case(2, 40, 64, 32, 32, torch.float32, with_bias=True))
    with pytest.raises(ValueError, match=match):
        kernel.int4wo_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_n", BLOCK_NS)
def test_cuda_op_dispatches_to_kernel(dtype, block_n):
    """``torch.ops.fxquant.linear_int4wo`` on CUDA tensors (3-D x) runs the kernel and matches."""
    a = {name: t.cuda() if isinstance(t, torch.Tensor) else t
         for name, t in _case(7, 72, 256, 64, block_n, dtype, with_bias=True).items()}
    x = a["x2d"].reshape(7, 1, 256)
    args = (x, a["qweight"], a["scales_and_zeros"], a["bias"], a["group_size"], a["block_n"], a["out_features"],
            a["in_features"])
    y = torch.ops.fxquant.linear_int4wo(*args)
    assert y.is_cuda and y.shape == (7, 1, 72)
    torch.testing.assert_close(y, op.reference(*args), **TOL[dtype])
