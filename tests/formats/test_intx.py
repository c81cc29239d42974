"""intx format math: bit packing, tile order, quantize error bounds, storage, and HQQ / torchao oracles."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import int4, intx
from fxquant.formats._common import round_up_to

CONFIGS = [(b, sym) for b in intx.BITS for sym in (False, True) if not (sym and b == 1)]


def naive_plane(codes: list[int], bits: int) -> torch.Tensor:
    """The shard layout written out bit by bit: code i (nibble i % 2 of pair j = i // 2) puts bit
    a + t (t < w) of its value at bit 4 * (i % 2) + w * (j // C) + t of byte j % C of shard w."""
    out, half = [], len(codes) // 2
    a = 0
    for w in intx.SHARDS[bits]:
        chunk = half * w // 4
        shard = [0] * chunk
        for i, c in enumerate(codes):
            j = i // 2
            for t in range(w):
                shard[j % chunk] |= ((c >> (a + t)) & 1) << (4 * (i % 2) + w * (j // chunk) + t)
        out += shard
        a += w
    return torch.tensor(out, dtype=torch.uint8)


@given(bits=st.sampled_from(intx.BITS), length=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(bits, length, seed):
    codes = torch.randint(0, 1 << bits, (length,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    packed = intx.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == intx.packed_len(length, bits) == -(-length // 8) * bits
    assert torch.equal(intx.unpack(packed, bits, length), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [8, 16, 40])
def test_plane_layout_is_the_documented_shards(bits, length):
    codes = torch.randint(0, 1 << bits, (length,), generator=torch.Generator().manual_seed(bits * 100 + length))
    assert torch.equal(intx.pack_plane(codes.to(torch.uint8), bits), naive_plane(codes.tolist(), bits))


def test_eight_3bit_codes_fill_three_bytes():
    # pairs (1,2) (3,4) (5,6) (7,0); 2-bit shard: chunks [0x21, 0x03] and [0x21, 0x03] folded at bits 0 / 2;
    # 1-bit shard: bit 2 of each code, pairs [0x00] [0x10] [0x11] [0x01] folded at bits 0..3
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert intx.pack(codes, 3).tolist() == [0xA5, 0x0F, 0x6C]


@given(bits=st.sampled_from([1, 2, 3, 4]), blocks=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_plane_nibbles_inverts_pack_plane(bits, blocks, seed):
    v = torch.randint(0, 1 << bits, (8 * blocks,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = intx.pack_plane(v, bits)
    assert packed.numel() == blocks * bits  # 8 codes in `bits` bytes
    assert torch.equal(intx.plane_nibbles(packed, bits, v.numel()), intx.nibble_pairs(v))


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="10 3-bit codes pack into 6 bytes, got 3"):
        intx.unpack(torch.zeros(3, dtype=torch.uint8), 3, 10)
    with pytest.raises(ValueError, match="a plane of 16 2-bit codes has 4 bytes"):
        intx.plane_nibbles(torch.zeros(3, dtype=torch.uint8), 2, 16)
    with pytest.raises(ValueError, match="bits=9 is not supported"):
        intx.pack(torch.zeros(3, dtype=torch.uint8), 9)


@given(tiles=st.integers(1, 3), block_n=st.sampled_from([16, 32, 64]), k=st.integers(1, 20), seed=st.integers(0, 99))
def test_tile_order_roundtrip_and_is_int4_layout(tiles, block_n, k, seed):
    q = torch.randint(0, 16, (tiles * block_n, 2 * k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    nib = intx.nibble_pairs(intx.tile_order(q, block_n))
    assert torch.equal(intx.untile_nibbles(nib, *q.shape, block_n), q)
    assert torch.equal(nib.view(q.shape[0], k), int4.pack(q, block_n))


def test_4bit_plane_is_native_cpu_int4pack():
    block_n = int4.native_cpu_block_n()
    if block_n is None:
        pytest.skip("this CPU's int4 packing is not a tiled layout fxquant can produce")
    q = torch.randint(0, 16, (128, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    native = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(intx.pack_plane(intx.tile_order(q.to(torch.uint8), block_n), 4).view(128, 128), native)


def _per_element(p: torch.Tensor, axis: int, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Stored params ``[Kp/g, N]`` / ``[ceil(N/g), K]`` -> the value each element of ``[N, K]`` uses."""
    n, k = shape
    if axis == 1:
        return p.float().t().repeat_interleave(group_size, dim=1)[:, :k]
    return p.float()[torch.arange(n) % p.shape[0]]


def _group_stats(w: torch.Tensor, group_size: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over each group's real members, in the stored params' layout, computed apart from
    the format: axis 1 pads K with -inf / +inf, axis 0 gathers rows n % R."""
    n, k = w.shape
    if axis == 1:
        kp = -(-k // group_size) * group_size
        pad = lambda v: torch.nn.functional.pad(w, (0, kp - k), value=v).view(n, -1, group_size)  # noqa: E731
        return pad(float("inf")).amin(-1).t(), pad(float("-inf")).amax(-1).t()
    r = -(-n // group_size)
    member = (torch.arange(n)[None, :] % r) == torch.arange(r)[:, None]  # [R, N]
    big = torch.where(member[:, :, None], w[None], float("nan"))
    return big.nan_to_num(float("inf")).amin(1), big.nan_to_num(float("-inf")).amax(1)


@given(cfg=st.sampled_from(CONFIGS), axis=st.sampled_from(intx.AXES), groups=st.integers(1, 3),
       group=st.sampled_from([1, 3, 8, 32, 64]), short=st.integers(0, 63), other=st.integers(1, 40),
       scale=st.floats(1e-3, 1e2), shift=st.floats(-1, 1), seed=st.integers(0, 2**16))
def test_quantize_error_bound(cfg, axis, groups, group, short, other, scale, shift, seed):
    """Any shape: the grouped dim is ``groups * group - short`` (a partial last group when short > 0);
    every element within half a step (plus the offset's bf16 rounding), and every group's statistics
    are those of its real members only."""
    bits, symmetric = cfg
    size = max(1, groups * group - short % group)
    shape = (other, size) if axis == 1 else (size, other)
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + shift) * scale
    q, s, o = intx.quantize(w, bits, group, symmetric, axis)
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits and s.dtype == torch.bfloat16
    assert s.shape == intx.param_shape(*shape, group, axis) == ((-(-size // group), other))
    assert (o is None) == symmetric
    assert q.shape == (other, intx.stored_in_features(size, group, axis)) if axis == 1 else q.shape == shape
    err = (intx.dequantize(q, s, o, bits, group, axis)[:, :shape[1]] - w).abs()
    bound = _per_element(s, axis, group, shape) / 2
    if o is not None:
        bound = bound + _per_element(o, axis, group, shape).abs() * 2**-8
    assert (err <= bound + 1e-6 * scale).all()
    lo, hi = _group_stats(w, group, axis)
    qmax = 2**bits - 1
    want = (torch.maximum(hi, -lo) / (qmax / 2) if symmetric else (hi - lo) / qmax).clamp(min=intx.MIN_SCALE)
    assert torch.equal(s, round_up_to(want, torch.bfloat16))


@given(cfg=st.sampled_from(CONFIGS), axis=st.sampled_from(intx.AXES), n=st.integers(1, 70),
       block_n=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_storage_roundtrip_and_nbytes(cfg, axis, n, block_n, seed):
    """K = 45 at g16 on axis 1 (48 columns stored), any N at g3 on axis 0: the buffers give back the
    quantized weight's real columns, and their bytes are what ``nbytes`` counts."""
    bits, symmetric = cfg
    group, k = (16, 45) if axis == 1 else (3, 48)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    stored = intx.to_storage(w, bits, group, symmetric, axis, block_n)
    back = intx.from_storage(**stored, bits=bits, group_size=group, axis=axis, block_n=block_n, out_features=n,
                             in_features=k)
    deq = intx.dequantize(*intx.quantize(w, bits, group, symmetric, axis), bits, group, axis)
    assert back.shape == (n, k) and torch.equal(back, deq[:, :k])
    counted = sum(t.untyped_storage().nbytes() for t in stored.values())
    assert counted == intx.nbytes(n, k, bits, group, symmetric, axis)
    rows = int4.padded_rows(n)
    assert stored["codes_lo"].numel() * 8 == rows * 48 * min(bits, 4)  # truly bits per code, no slack
    assert stored["codes_hi"].numel() * 8 == rows * 48 * max(bits - 4, 0)


def test_nbytes_of_a_llama_mlp_weight():
    # 11008 x 4096, 3-bit codes (8 in 3 bytes), g128, scale + offset bf16 per group
    assert intx.nbytes(11008, 4096, 3, 128, False) == 11008 * 4096 * 3 // 8 + 11008 * 32 * 4
    assert intx.nbytes(11008, 4096, 8, 128, True) == 11008 * 4096 + 11008 * 32 * 2


def test_uint4_axis1_is_int4wo_math():
    w = torch.randn(72, 256, generator=torch.Generator().manual_seed(1))
    q, s, o = intx.quantize(w, 4, 64, False, 1)
    q4, s4, z4 = int4.quantize(w, 64)
    assert torch.equal(q, q4) and torch.equal(s, s4.t()) and torch.equal(o, z4.t())


def test_int4_kernel_params_reconstruct_the_weight():
    """sum over planes of (nibble - 8) * scale + zero == the reference dequantization (b=4 exactly)."""
    block_n = int4.native_cpu_block_n() or 32
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    rows = int4.padded_rows(40)
    for bits, symmetric in CONFIGS:
        stored = intx.to_storage(w, bits, 32, symmetric, 1, block_n)
        ref = intx.from_storage(**stored, bits=bits, group_size=32, axis=1, block_n=block_n, out_features=40,
                                in_features=128)
        planes = [(stored["codes_lo"], min(bits, 4)), (stored["codes_hi"], bits - 4)]
        total = torch.zeros(rows, 128)
        params, residual = intx.int4_kernel_params(stored["scale"], stored["offset"], bits, 0, rows, torch.bfloat16)
        if residual is not None:
            total += residual.t().repeat_interleave(32, dim=1)
        for (codes, p), sz in zip(planes, params):
            assert sz.shape == (4, rows, 2)
            nib = int4.unpack(intx.plane_nibbles(codes, p, rows * 128).view(rows, 64), block_n).float() - 8
            s, z = sz[..., 0], sz[..., 1]
            total += (nib.reshape(rows, 4, 32) * s.t()[..., None] + z.t()[..., None]).reshape(rows, 128)
        torch.testing.assert_close(total[:40], ref, atol=0 if bits in (4, 8) else 1e-6, rtol=1e-6)


@given(bits=st.sampled_from([1, 2, 3, 4]), blocks=st.integers(1, 20), data=st.data())
def test_plane_nibbles_of_a_range(bits, blocks, data):
    """Any [start, stop) of the nibble-pair bytes, across chunk boundaries, written into a buffer."""
    v = torch.randint(0, 1 << bits, (8 * blocks,), dtype=torch.uint8, generator=torch.Generator().manual_seed(blocks))
    start = data.draw(st.integers(0, 4 * blocks - 1))
    stop = data.draw(st.integers(start + 1, 4 * blocks))
    buf = torch.full((stop - start + 3,), 0xAA, dtype=torch.uint8)
    got = intx.plane_nibbles(intx.pack_plane(v, bits), bits, v.numel(), start, stop,
                             out=buf[:stop - start] if bits != 4 else None)
    assert torch.equal(got, intx.nibble_pairs(v)[start:stop])


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_grouping_and_codes_match_hqq(axis, bits):
    """HQQ's Quantizer (optimize=False) is the oracle for uint<b>: same groups, same scale up to the
    bf16 round-up, same codes except where that rounding moves a boundary."""
    hqq = pytest.importorskip("hqq.core.quantize")
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(bits))
    wq, meta = hqq.Quantizer.quantize(w, nbits=bits, group_size=64, optimize=False, axis=axis, bitpack=False,
                                      device="cpu", compute_dtype=torch.float32)
    q, s, o = intx.quantize(w, bits, 64, False, axis)
    hqq_scale = meta["scale"].reshape(128, 4).t() if axis == 1 else meta["scale"].reshape(2, 256)
    torch.testing.assert_close(s.float(), hqq_scale, rtol=2**-7, atol=0)
    assert (s.float() >= hqq_scale * (1 - 1e-6)).all()  # rounded up
    agree = (wq.reshape(128, 256).to(torch.uint8) == q).float().mean().item()
    assert agree > {1: 0.99, 2: 0.99, 3: 0.98, 4: 0.96, 8: 0.5}[bits]
    hqq_deq = hqq.Quantizer.dequantize(wq, {**meta, "compute_dtype": torch.float32})
    ours = intx.dequantize(q, s, o, bits, 64, axis)
    assert (ours - w).norm() / (hqq_deq - w).norm() < 1.03


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_symmetric_matches_torchao(bits):
    """torchao's MappingType.SYMMETRIC int<b> (fp32 scale) is the oracle for int<b>."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zp = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, (1, 128), torch.int8, lo, hi)
    ao = qp.quantize_affine(w, (1, 128), scale, zp, torch.int8, lo, hi)
    q, s, _ = intx.quantize(w, bits, 128, True, 1)
    torch.testing.assert_close(s.float().t(), scale.reshape(64, 2), rtol=2**-7, atol=0)
    agree = ((q.to(torch.int16) - 2 ** (bits - 1)) == ao).float().mean().item()
    assert agree > {2: 0.99, 3: 0.98, 4: 0.97, 5: 0.93, 8: 0.5}[bits]


def test_published_error_int4_g128():
    # docs/reference-numbers.md: int4 g128 min/max on random normal: relative error 0.0998; g64: 0.0897
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for group, expected in ((128, 0.0998), (64, 0.0897)):
        deq = intx.dequantize(*intx.quantize(w, 4, group, False, 1), 4, group, 1)
        assert abs(((deq - w).norm() / w.norm()).item() - expected) < 0.004


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="group_size=0 is not supported"):
        intx.quantize(torch.randn(4, 96), 4, 0, False, 1)
    with pytest.raises(ValueError, match="symmetric 1-bit"):
        intx.quantize(torch.randn(4, 64), 1, 64, True, 1)
