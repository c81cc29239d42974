import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import int8


@given(n=st.integers(1, 40), k=st.integers(1, 70), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_quantize_error_bound(n, k, scale, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = int8.quantize(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (n,)
    assert q.abs().max() <= 127
    err = (int8.dequantize(q, s) - w).abs()
    # round-to-nearest against the stored scale: at most half a step (plus fp32 slack)
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-5) + 1e-30).all()
    # the stored scale never clips: the largest magnitude of each row maps into [-127, 127]
    assert (w.abs().amax(1) <= 127 * s.float() * (1 + 1e-6)).all()


def test_zero_rows_are_exact():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    q, s = int8.quantize(w)
    assert torch.equal(int8.dequantize(q, s)[0], torch.zeros(8))


def test_nbytes_matches_tensors():
    q, s = int8.quantize(torch.randn(33, 17))
    assert int8.nbytes(33, 17) == q.numel() * q.element_size() + s.numel() * s.element_size()


def test_error_matches_published_per_channel_int8():
    # docs/reference-numbers.md: int8 per-channel relative error on random normal 4096^2 is 0.0088;
    # symmetric [-127, 127] per-row rounding gives the same order on a smaller matrix.
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    q, s = int8.quantize(w)
    rel = ((int8.dequantize(q, s) - w).norm() / w.norm()).item()
    assert 0.005 < rel < 0.0095
