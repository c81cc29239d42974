"""The Triton NF4 / FP4 kernel against the ops' references, on the CPU interpreter (or a GPU if present)."""
import pytest
import torch

from fxquant.formats import bnb4
from fxquant.ops import bnb4 as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("bnb4")  # skips the module without Triton

# fp32 and interpreted bf16 (fp32 dot): kernel and reference differ only in fp32 summation order,
# which can flip the final rounding of an output (~2 ulps of the output dtype, plus atol near 0).
# On GPU, bf16/fp16 activations meet W rounded to their dtype in the dot: ~2^-9 relative per weight.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=4e-3),
}
# (M, N, K, blocksize): M = 1 and odd M; K below, at and above a block, K % blocksize != 0 (blocks
# straddle rows), odd N*K (padded last byte), N not a multiple of the tile, a long K loop.
SHAPES = [(1, 40, 64, 64), (3, 17, 77, 64), (1, 33, 63, 32), (5, 16, 65, 64), (17, 72, 128, 32),
          (2, 9, 33, 32), (1, 24, 300, 128), (4, 3, 1000, 4096)]


def _case(m, n, k, blocksize, quant_type, double_quant, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = bnb4.to_storage(torch.randn(n, k, generator=g) * 0.1, quant_type, blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    to = lambda v: None if v is None else v.to(DEVICE)  # noqa: E731
    return {name: to(v) for name, v in t.items()}, to(x), to(bias)


def _run(t, x, bias, blocksize, n, k):
    if "absmax" in t:
        y = kernel.bnb4_linear(x, t["codes"], t["absmax"], t["code_table"], bias, blocksize=blocksize,
                               out_features=n, in_features=k)
        ref = op.reference(x, *t.values(), bias, blocksize, n, k)
    else:
        y = kernel.bnb4_linear_dq(x, t["codes"], t["absmax_q"], t["absmax_code"], t["absmax_scale"],
                                  t["absmax_offset"], t["code_table"], bias, blocksize=blocksize,
                                  absmax_blocksize=bnb4.NESTED_BLOCKSIZE, out_features=n, in_features=k)
        ref = op.reference_dq(x, *t.values(), bias, blocksize, bnb4.NESTED_BLOCKSIZE, n, k)
    return y, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("m,n,k,blocksize", SHAPES, ids=str)
def test_matches_reference(m, n, k, blocksize, double_quant, dtype):
    quant_type = "fp4" if (m + n) % 2 else "nf4"
    t, x, bias = _case(m, n, k, blocksize, quant_type, double_quant, dtype, with_bias=(n % 2 == 0))
    y, ref = _run(t, x, bias, blocksize, n, k)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, ref, **TOL[dtype])


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_fp16(double_quant):
    t, x, bias = _case(3, 40, 96, 32, "nf4", double_quant, torch.float16, with_bias=True)
    y, ref = _run(t, x, bias, 32, 40, 96)
    torch.testing.assert_close(y, ref, **TOL[torch.float16])


def test_many_nested_blocks():
    """More than 256 absmax blocks: the nested scale index b // 256 changes inside the weight."""
    t, x, bias = _case(2, 40, 480, 32, "nf4", True, torch.float32, with_bias=False)  # 600 blocks
    assert t["absmax_scale"].numel() == 3
    y, ref = _run(t, x, bias, 32, 40, 480)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


def test_strided_activation():
    t, x, bias = _case(5, 24, 64, 64, "nf4", False, torch.float32, with_bias=True)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = x
    y, ref = _run(t, wide[:, ::2], bias, 64, 24, 64)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


def test_empty_batch():
    t, x, _ = _case(1, 24, 64, 64, "nf4", False, torch.float32, with_bias=False)
    y = kernel.bnb4_linear(x[:0], t["codes"], t["absmax"], t["code_table"], None, blocksize=64, out_features=24,
                           in_features=64)
    assert y.shape == (0, 24)


def _plain(mutate):
    t, x, bias = _case(2, 24, 64, 32, "nf4", False, torch.float32, with_bias=True)
    a = dict(x2d=x, codes=t["codes"], absmax=t["absmax"], code_table=t["code_table"], bias=bias, blocksize=32,
             out_features=24, in_features=64)
    a = mutate(a)
    names = ["x2d", "codes", "absmax", "code_table", "bias"]
    return lambda: kernel.bnb4_linear(*(a[k] for k in names), **{k: v for k, v in a.items() if k not in names})


def _dq(mutate):
    t, x, bias = _case(2, 24, 64, 32, "nf4", True, torch.float32, with_bias=False)
    a = dict(x2d=x, codes=t["codes"], absmax_q=t["absmax_q"], absmax_code=t["absmax_code"],
             absmax_scale=t["absmax_scale"], absmax_offset=t["absmax_offset"], code_table=t["code_table"],
             bias=bias, blocksize=32, absmax_blocksize=256, out_features=24, in_features=64)
    a = mutate(a)
    names = ["x2d", "codes", "absmax_q", "absmax_code", "absmax_scale", "absmax_offset", "code_table", "bias"]
    return lambda: kernel.bnb4_linear_dq(*(a[k] for k in names), **{k: v for k, v in a.items() if k not in names})


@pytest.mark.parametrize("call,match", [
    (_plain(lambda a: {**a, "x2d": a["x2d"][:, :-1]}), r"x has 63 input features .* in_features=64"),
    (_plain(lambda a: {**a, "in_features": 63}), r"codes must be torch.uint8 of shape \(756,\)"),
    (_plain(lambda a: {**a, "x2d": a["x2d"].to(torch.int32)}), r"x2d must be a 2-D \[M, K\] tensor of dtype"),
    (_plain(lambda a: {**a, "codes": a["codes"].to(torch.int8)}), r"codes must be torch.uint8 of shape \(768,\)"),
    (_plain(lambda a: {**a, "blocksize": 48}), r"blocksize=48 is not supported"),
    (_plain(lambda a: {**a, "absmax": a["absmax"][:-1]}), r"absmax must be torch.float32 of shape \(48,\)"),
    (_plain(lambda a: {**a, "code_table": a["code_table"][:8]}), r"code_table must be torch.float32 of shape \(16,\)"),
    (_plain(lambda a: {**a, "bias": a["bias"][:3]}), r"bias must be None or a floating-point tensor of shape \(24,\)"),
    (_dq(lambda a: {**a, "absmax_q": a["absmax_q"].float()}), r"absmax_q must be torch.uint8 of shape \(48,\)"),
    (_dq(lambda a: {**a, "absmax_code": a["absmax_code"][:16]}),
     r"absmax_code must be torch.float32 of shape \(256,\)"),
    (_dq(lambda a: {**a, "absmax_scale": torch.ones(2)}), r"absmax_scale must be torch.float32 of shape \(1,\)"),
    (_dq(lambda a: {**a, "absmax_offset": torch.ones(2)}), r"absmax_offset must be one of torch.float32 of shape \(\) or \(1,\)"),
    (_dq(lambda a: {**a, "absmax_blocksize": 0}), r"absmax_blocksize=0 is not supported"),
], ids=["wrong_K", "wrong_in_features", "x_int32", "codes_int8", "blocksize", "absmax_len", "table", "bias", "absmax_q", "absmax_code",
        "absmax_scale", "absmax_offset", "absmax_blocksize"])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_cuda_op_dispatches_to_kernel(dtype, double_quant):
    """``torch.ops.fxquant.linear_bnb4[_dq]`` on CUDA tensors (3-D x) runs the kernel and matches."""
    t, x, bias = _case(7, 72, 200, 64, "nf4", double_quant, dtype, with_bias=True)
    scalars = (64, bnb4.NESTED_BLOCKSIZE, 72, 200) if double_quant else (64, 72, 200)
    packet = torch.ops.fxquant.linear_bnb4_dq if double_quant else torch.ops.fxquant.linear_bnb4
    ref = op.reference_dq if double_quant else op.reference
    args = (x.reshape(7, 1, 200), *t.values(), bias, *scalars)
    y = packet(*args)
    assert y.is_cuda and y.shape == (7, 1, 72)
    torch.testing.assert_close(y, ref(*args), **TOL[dtype])
