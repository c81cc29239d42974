import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import int4


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


@given(n=st.integers(1, 70), groups=st.integers(1, 4), group=st.sampled_from(int4.GROUP_SIZES),
       scale=st.floats(1e-3, 1e2), shift=st.floats(-1, 1), seed=st.integers(0, 2**16))
def test_quantize_error_bound(n, groups, group, scale, shift, seed):
    k = groups * group
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) + shift) * scale
    q, s, z = int4.quantize(w, group)
    assert q.max() <= 15 and s.shape == z.shape == (n, groups)
    err = (int4.dequantize(q, s, z, group) - w).abs().reshape(n, groups, group)
    # half a step, plus the bf16 rounding of the zero point (<= 2^-9 relative)
    bound = s.float()[..., None] / 2 + z.float().abs()[..., None] * 2**-8 + 1e-6 * scale
    assert (err <= bound).all()


@given(n=st.integers(1, 130), group=st.sampled_from(int4.GROUP_SIZES), seed=st.integers(0, 2**16))
def test_storage_roundtrip_equals_dequantize(n, group, seed):
    w = torch.randn(n, 2 * group, generator=torch.Generator().manual_seed(seed))
    q, s, z = int4.quantize(w, group)
    for block_n in (16, 32, 64):
        st_ = int4.to_storage(w, group, block_n)
        assert st_["qweight"].shape == (int4.padded_rows(n), group)
        assert st_["scales_and_zeros"].shape == (2, int4.padded_rows(n), 2)
        back = int4.from_storage(**st_, group_size=group, block_n=block_n, out_features=n)
        assert torch.equal(back, int4.dequantize(q, s, z, group))
        assert int4.nbytes(n, 2 * group, group) == sum(t.numel() * t.element_size() for t in st_.values())


def test_error_matches_published_minmax_int4():
    # docs/reference-numbers.md: int4 g128 min/max on random normal: relative error 0.0998; g64: 0.0897
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for group, expected in ((128, 0.0998), (64, 0.0897)):
        q, s, z = int4.quantize(w, group)
        rel = ((int4.dequantize(q, s, z, group) - w).norm() / w.norm()).item()
        assert abs(rel - expected) < 0.004, (group, rel)


def test_indivisible_k_raises():
    with pytest.raises(ValueError, match="not divisible by group_size 64"):
        int4.quantize(torch.randn(4, 96), 64)
