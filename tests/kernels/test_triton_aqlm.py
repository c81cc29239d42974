"""The Triton AQLM kernel against the op's reference, on the CPU interpreter (or a GPU if present)."""
import pytest
import torch

from fxquant.formats import aqlm as fmt
from fxquant.ops import aqlm as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("aqlm")  # skips the module without Triton

# fp32 and interpreted bf16 (fp32 dot): kernel and reference differ only in fp32 summation order, which can
# flip the final rounding of an output (~2 ulps of the output dtype, plus atol near 0).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=4e-3),
}
# (M, N, K, codebooks, bits, in group, out group): M = 1 and odd M; the published 1x16-g8 / 2x8-g8 / 1x8-g4;
# K and N not multiples of the groups (padded storage); out groups > 1; a long K loop; int8 codes of < 8 bits
SHAPES = [(1, 40, 64, 1, 16, 8, 1), (3, 17, 64, 2, 8, 8, 1), (5, 33, 70, 1, 8, 4, 1), (2, 24, 40, 1, 8, 8, 2),
          (4, 9, 29, 3, 4, 4, 3), (1, 16, 300, 2, 6, 8, 1), (17, 20, 48, 1, 12, 16, 1)]


def _case(m, n, k, nc, nbits, ig, og, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    o, gg = fmt.padded(n, k, og, ig)
    codes = fmt.to_stored(torch.randint(0, 1 << nbits, (o, gg, nc), generator=g), nbits)
    cb = torch.randn(nc, 1 << nbits, og, ig, generator=g).half()
    sc = (torch.rand(o, 1, 1, 1, generator=g) * 0.1 + 0.01).half()
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    attrs = dict(num_codebooks=nc, nbits_per_codebook=nbits, in_group_size=ig, out_group_size=og, out_features=n,
                 in_features=k)
    to = lambda v: None if v is None else v.to(DEVICE)  # noqa: E731
    return (to(codes), to(cb), to(sc)), to(x), to(bias), attrs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    m, n, k, nc, nbits, ig, og = shape
    args, x, bias, attrs = _case(m, n, k, nc, nbits, ig, og, dtype, with_bias=n % 2 == 0)
    y = kernel.aqlm_linear(x, *args, bias, **attrs)
    ref = op.reference(x, *args, bias, **attrs)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_fp16_and_strided_activation():
    args, x, bias, attrs = _case(3, 40, 64, 2, 8, 8, 1, torch.float16, with_bias=True)
    torch.testing.assert_close(kernel.aqlm_linear(x, *args, bias, **attrs), op.reference(x, *args, bias, **attrs),
                               **TOL[torch.float16])
    args, x, bias, attrs = _case(5, 24, 64, 1, 8, 4, 1, torch.float32, with_bias=False)
    wide = torch.randn(5, 128, device=DEVICE)
    wide[:, ::2] = x
    torch.testing.assert_close(kernel.aqlm_linear(wide[:, ::2], *args, None, **attrs),
                               op.reference(x, *args, None, **attrs), **TOL[torch.float32])


def test_launcher_names_the_bad_argument():
    args, x, _, attrs = _case(2, 16, 64, 2, 8, 8, 1, torch.float32, with_bias=False)
    with pytest.raises(ValueError, match=r"aqlm_linear: fxquant::linear_aqlm: codes must be torch.int8"):
        kernel.aqlm_linear(x, args[0].to(torch.int16), *args[1:], None, **attrs)
    with pytest.raises(ValueError, match="aqlm_linear: x2d must be a 2-D"):
        kernel.aqlm_linear(x[None], *args, None, **attrs)
