"""The Triton GGUF kernel (every block type) against the op's reference, on the CPU interpreter (or a GPU)."""
import pytest
import torch

from fxquant.formats import gguf as fmt
from fxquant.ops import gguf as op
from helpers import triton_kernel

kernel, DEVICE, pytestmark = triton_kernel("gguf")  # skips the module without Triton

# fp32 and interpreted bf16 (fp32 dot): the reference's weight values, only the fp32 summation order
# differs; on GPU bf16 / fp16 activations meet W rounded to their dtype in the dot.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-2, rtol=4e-3)}
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
              "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    q = fmt.QTYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // q.block_size, q.type_size), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qtype]:
        v = ((torch.rand(n, k // q.block_size, generator=g) * 2 - 1) * 0.02).to(torch.float16)
        raw[:, :, off:off + 2] = v.view(torch.uint8).reshape(n, -1, 2)
    return raw.reshape(n, -1)


def _run(qtype, m, n, blocks_per_row, dtype, with_bias, seed=0):
    k = blocks_per_row * fmt.QTYPES[qtype].block_size
    blocks = random_blocks(qtype, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    ref = op.reference(x, blocks, bias, qtype, n, k)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    y = kernel.gguf_linear(to(x), to(blocks), to(bias), qtype=qtype, out_features=n, in_features=k)
    return y.cpu(), ref


@pytest.mark.parametrize("qtype", list(fmt.QTYPES))
@pytest.mark.parametrize("m,n,blocks_per_row", [(1, 40, 1), (3, 17, 2), (17, 33, 1)])
def test_matches_reference(qtype, m, n, blocks_per_row):
    """Every type; M = 1, odd M and a second M tile; N not a multiple of the tile; more than one block per row."""
    y, ref = _run(qtype, m, n, blocks_per_row, torch.float32, with_bias=n % 2 == 0)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_activations(qtype, dtype):
    y, ref = _run(qtype, 3, 24, 2 if fmt.QTYPES[qtype].block_size == 256 else 3, dtype, with_bias=True)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref, **TOL[dtype])


def test_strided_activation():
    blocks = random_blocks("q4_k", 24, 256)
    x = torch.randn(5, 512)[:, ::2]
    y = kernel.gguf_linear(x.to(DEVICE), blocks.to(DEVICE), None, qtype="q4_k", out_features=24, in_features=256)
    torch.testing.assert_close(y.cpu(), op.reference(x, blocks, None, "q4_k", 24, 256), **TOL[torch.float32])


def test_launcher_checks_arguments():
    blocks = random_blocks("q8_0", 8, 64).to(DEVICE)
    shapes = dict(qtype="q8_0", out_features=8)
    with pytest.raises(ValueError, match=r"gguf_linear: fxquant::linear_gguf: blocks must be torch.uint8 of shape "
                                         r"\(8, 34\)"):
        kernel.gguf_linear(torch.randn(2, 32, device=DEVICE), blocks, None, **shapes, in_features=32)
    with pytest.raises(ValueError, match=r"gguf_linear: x2d must be a 2-D"):
        kernel.gguf_linear(torch.randn(2, 64, device=DEVICE).to(torch.int32), blocks, None, **shapes, in_features=64)
