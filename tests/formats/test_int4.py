import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import int4
from fxquant.formats._common import round_up_to


@given(tiles=st.integers(1, 4), block_n=st.sampled_from([16, 32, 64]), half_k=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(tiles, block_n, half_k, seed):
    q = torch.randint(0, 16, (tiles * block_n, 2 * half_k), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(seed))
    packed = int4.pack(q, block_n)
    assert packed.shape == (tiles * block_n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack(packed, block_n), q)


@pytest.mark.parametrize("n,k", [(64, 64), (128, 256), (576, 128), (1536, 32)])
def test_pack_matches_native_cpu_layout(n, k):
    block_n = int4.native_cpu_block_n()
    if block_n is None:
        pytest.skip("this CPU's int4 packing is not a tiled layout fxquant can produce")
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n + k))
    native = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(int4.pack(q.to(torch.uint8), block_n), native)


@given(n=st.integers(1, 70), k=st.integers(1, 4 * 256 + 3), group=st.sampled_from(int4.GROUP_SIZES),
       scale=st.floats(1e-3, 1e2), shift=st.floats(-1, 1), seed=st.integers(0, 2**16))
def test_quantize_error_bound(n, k, group, scale, shift, seed):
    """Any K: the real columns keep the per-element bound; a partial last group's scale and zero are
    those of its real columns' min and max (the padding repeats a real value)."""
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) + shift) * scale
    q, s, z = int4.quantize(w, group)
    kp = int4.padded_k(k, group)
    assert kp % group == 0 and kp - group < k <= kp
    assert q.shape == (n, kp) and q.max() <= 15 and s.shape == z.shape == (n, kp // group)
    deq = int4.dequantize(q, s, z, group)
    err = (deq[:, :k] - w).abs()
    per_col = lambda t: t.float().repeat_interleave(group, dim=1)[:, :k]  # noqa: E731
    # half a step, plus the bf16 rounding of the zero point (<= 2^-9 relative)
    assert (err <= per_col(s) / 2 + per_col(z).abs() * 2**-8 + 1e-6 * scale).all()
    last = w[:, (kp // group - 1) * group:]  # the last group's real columns
    lo, hi = last.amin(1), last.amax(1)
    want = round_up_to(((hi - lo) / 15).clamp(min=1e-10), torch.bfloat16)
    assert torch.equal(s[:, -1], want) and torch.equal(z[:, -1], (lo + 8 * want.float()).to(torch.bfloat16))


@given(n=st.integers(1, 130), k=st.integers(1, 600), group=st.sampled_from(int4.GROUP_SIZES),
       seed=st.integers(0, 2**16))
def test_storage_roundtrip_equals_dequantize(n, k, group, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s, z = int4.quantize(w, group)
    kp = int4.padded_k(k, group)
    for block_n in (16, 32, 64):
        st_ = int4.to_storage(w, group, block_n)
        assert st_["qweight"].shape == (int4.padded_rows(n), kp // 2)
        assert st_["scales_and_zeros"].shape == (kp // group, int4.padded_rows(n), 2)
        back = int4.from_storage(**st_, group_size=group, block_n=block_n, out_features=n, in_features=k)
        assert back.shape == (n, k) and torch.equal(back, int4.dequantize(q, s, z, group)[:, :k])
        assert int4.nbytes(n, k, group) == sum(t.numel() * t.element_size() for t in st_.values())


def test_error_matches_published_minmax_int4():
    # docs/reference-numbers.md: int4 g128 min/max on random normal: relative error 0.0998; g64: 0.0897
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for group, expected in ((128, 0.0998), (64, 0.0897)):
        q, s, z = int4.quantize(w, group)
        rel = ((int4.dequantize(q, s, z, group) - w).norm() / w.norm()).item()
        assert abs(rel - expected) < 0.004, (group, rel)


def test_576_at_group_128_stores_five_groups():
    """SmolLM2's hidden size 576 = 4.5 x 128: five groups of 128 columns, the last one half padding."""
    st_ = int4.to_storage(torch.randn(64, 576), 128, 64)
    assert st_["qweight"].shape == (64, 320) and st_["scales_and_zeros"].shape == (5, 64, 2)
    assert int4.nbytes(64, 576, 128) == 64 * 320 + 5 * 64 * 4
