"""bitsandbytes NF4 / FP4 format math: published tables, packing, error bounds, and bit-for-bit
agreement with ``bitsandbytes.functional`` on CPU (skipped when bitsandbytes is not installed)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import bnb4

# NF4 values as published: QLoRA (Dettmers et al. 2023, arXiv:2305.14314), Appendix E "NormalFloat
# 4-bit data type", and bitsandbytes/functional.py get_4bit_type("nf4").
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
# FP4 as published in bitsandbytes/functional.py get_4bit_type("fp4"), in code order (bit 3 is the
# sign), before its division by the largest magnitude 12.
FP4_PUBLISHED = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

QUANT_TYPES = list(bnb4.QUANT_TYPES)


def test_nf4_table_is_the_published_one():
    assert torch.equal(bnb4.code_table("nf4"), torch.tensor(NF4_PUBLISHED, dtype=torch.float32))


def test_fp4_table_is_the_published_one():
    expected = torch.tensor(FP4_PUBLISHED, dtype=torch.float32) / 12
    table = bnb4.code_table("fp4")
    assert torch.equal(table, expected)
    assert torch.equal(torch.signbit(table), torch.signbit(expected))  # code 8 is -0.0


def test_dynamic_map_shape():
    d = bnb4.dynamic_map()
    assert d.shape == (256,) and d.dtype == torch.float32
    assert torch.all(d[1:] >= d[:-1]) and d[-1] == 1.0 and (d == 0).sum() == 1
    assert d[0] == pytest.approx(-0.99297, abs=1e-5)  # bitsandbytes' signed map stops short of -1


def test_tables_are_copies():
    bnb4.code_table("nf4").zero_()
    bnb4.dynamic_map().zero_()
    assert bnb4.code_table("nf4")[0] == -1.0 and bnb4.dynamic_map()[-1] == 1.0


@given(numel=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(numel, seed):
    q = torch.randint(0, 16, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = bnb4.pack(q)
    assert packed.shape == ((numel + 1) // 2,) and packed.dtype == torch.uint8
    assert torch.equal(bnb4.unpack(packed, numel), q)
    assert torch.equal(packed[0] >> 4, q[0])  # first code in the high nibble


def _bound(absmax_per_element: torch.Tensor, quant_type: str) -> torch.Tensor:
    """|W - Ŵ| bound: half the largest table gap times absmax, plus fp32 rounding."""
    return absmax_per_element * (bnb4.max_gap(bnb4.code_table(quant_type)) / 2 + 1e-6) + 1e-30


@given(n=st.integers(1, 40), k=st.integers(1, 150), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from(bnb4.BLOCKSIZES[:4]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_error_bound(n, k, quant_type, blocksize, scale, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    codes, absmax = bnb4.quantize_4bit(w, quant_type, blocksize)
    assert absmax.shape == (-(-n * k // blocksize),)
    back = bnb4.dequantize_4bit(codes, absmax, bnb4.code_table(quant_type), blocksize, (n, k))
    per_elem = bnb4.expand_blocks(absmax, blocksize, n * k).reshape(n, k)
    assert ((back - w).abs() <= _bound(per_elem, quant_type)).all()


@given(n=st.integers(1, 40), k=st.integers(1, 150), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from([32, 64]), seed=st.integers(0, 2**16))
def test_double_quant_error_bound(n, k, quant_type, blocksize, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    t = bnb4.to_storage(w, quant_type, blocksize, double_quant=True)
    absmax = bnb4.quantize_4bit(w, quant_type, blocksize)[1]
    absmax_dq = bnb4.block_absmax(t)
    # 8-bit dynamic map: half its largest gap, plus the CPU encoder's grid step (see module docstring)
    step = bnb4.max_gap(t["absmax_code"]) / 2 + 2 / 65535
    scale = bnb4.expand_blocks(t["absmax_scale"], bnb4.NESTED_BLOCKSIZE, absmax.numel())
    assert ((absmax_dq - absmax).abs() <= scale * step + 1e-6).all()
    back = bnb4.from_storage(t, blocksize, n, k)
    per_elem = bnb4.expand_blocks(absmax, blocksize, n * k).reshape(n, k)
    extra = bnb4.expand_blocks((absmax_dq - absmax).abs(), blocksize, n * k).reshape(n, k)
    assert ((back - w).abs() <= _bound(per_elem, quant_type) + extra + 1e-6).all()


@given(n=st.integers(1, 30), k=st.integers(1, 130), quant_type=st.sampled_from(QUANT_TYPES),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_dequantize_span_is_bit_identical(n, k, quant_type, blocksize, double_quant, seed):
    """The CPU fast path's decoder equals the reference on every block-aligned span."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    t = bnb4.to_storage(w, quant_type, blocksize, double_quant)
    ref = bnb4.from_storage(t, blocksize, n, k).reshape(-1)
    absmax = bnb4.block_absmax(t)
    workspace = {}
    for start in range(0, n * k, 2 * blocksize):
        for stop in {min(n * k, start + 2 * blocksize), min(n * k, start + blocksize + 3), n * k}:
            got = bnb4.dequantize_span(t["codes"], absmax[start // blocksize:], t["code_table"], blocksize,
                                       start, stop, workspace=workspace)
            assert torch.equal(got, ref[start:stop]), (start, stop)


def test_blocks_straddle_rows():
    """K % blocksize != 0: a block continues on the next row; the last block is the short tail."""
    w = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    codes, absmax = bnb4.quantize_4bit(w, "nf4", 32)
    assert absmax.shape == (4,)  # 120 values: 3 full blocks of 32 and a tail of 24
    flat = w.reshape(-1).abs()
    assert absmax[1] == torch.cat([w[0, 32:], w[1, :24]]).abs().max()
    assert absmax[3] == flat[96:].max()


def test_zero_weight_and_zero_blocks():
    w = torch.zeros(2, 64)
    w[1, 3] = 0.5
    for dq in (False, True):
        t = bnb4.to_storage(w, "nf4", 64, dq)
        back = bnb4.from_storage(t, 64, 2, 64)
        assert torch.isfinite(back).all() and back[0].abs().max() == 0
        assert back[1, 3] == pytest.approx(0.5, rel=1e-2)


def test_storage_nbytes_and_bytes_per_parameter():
    w = torch.randn(100, 130)
    for dq in (False, True):
        t = bnb4.to_storage(w, "fp4", 64, dq)
        assert bnb4.nbytes(100, 130, 64, dq) == sum(v.numel() * v.element_size() for v in t.values())
    # 11008 x 4096 with blocksize 64: 0.5 B codes + 4/64 B absmax (+ 64 B table) per parameter;
    # double quant: 1/64 B + 4 B per 256 blocks + offset + the 1 KB map.
    n, k = 11008, 4096
    assert bnb4.nbytes(n, k, 64, False) == n * k // 2 + n * k // 64 * 4 + 64
    assert bnb4.nbytes(n, k, 64, True) == n * k // 2 + n * k // 64 + (n * k // 64 // 256) * 4 + 4 + 1024 + 64


def test_error_matches_published_peer_measurement():
    # docs/reference-numbers.md: relative weight error on random normal 4096^2: nf4 bs64 0.0920,
    # fp4 bs64 0.1219
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for quant_type, expected in (("nf4", 0.0920), ("fp4", 0.1219)):
        t = bnb4.to_storage(w, quant_type, 64, False)
        rel = ((bnb4.from_storage(t, 64, 1024, 1024) - w).norm() / w.norm()).item()
        assert abs(rel - expected) < 0.002, (quant_type, rel)


@pytest.mark.parametrize("call,match", [
    (lambda: bnb4.quantize_4bit(torch.randn(4, 4), "nf3", 64), r"quant_type='nf3' is not supported; valid: nf4, fp4"),
    (lambda: bnb4.quantize_4bit(torch.randn(4, 4), "nf4", 48), r"blocksize=48 is not supported; valid: 32, 64"),
    (lambda: bnb4.code_table("int4"), r"quant_type='int4' is not supported"),
    (lambda: bnb4.dequantize_span(torch.zeros(8, dtype=torch.uint8), torch.ones(1), bnb4.code_table("nf4"), 64, 4, 8),
     r"start=4 must be a multiple of blocksize=64"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- bit-for-bit against bitsandbytes ------------------------------------------------------------
SHAPES = [(7, 9, 32), (64, 100, 64), (33, 77, 128), (256, 512, 64), (300, 1000, 4096), (1, 1, 64), (5, 3, 2048),
          (700, 2500, 32), (40, 96, 256), (3, 1000, 512), (9, 2000, 1024)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("n,k,blocksize", SHAPES, ids=str)
def test_bit_identical_to_bitsandbytes(n, k, blocksize, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k + blocksize))
    w[0, :min(k, 5)] = 0  # zeros inside a block
    q, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    t = bnb4.to_storage(w, quant_type, blocksize, double_quant)
    assert torch.equal(t["codes"], q.reshape(-1))
    assert torch.equal(t["code_table"], state.code)
    if double_quant:
        assert torch.equal(t["absmax_q"], state.absmax)
        assert torch.equal(t["absmax_scale"], state.state2.absmax)
        assert torch.equal(t["absmax_offset"], state.offset)
        assert torch.equal(t["absmax_code"], state.state2.code)
        assert state.state2.blocksize == bnb4.NESTED_BLOCKSIZE
    else:
        assert torch.equal(t["absmax"], state.absmax)
    # bitsandbytes' CPU dequantize torch.compiles its fallback for odd K (11 s on first use): the
    # same operations run eagerly with dynamo disabled.
    with torch._dynamo.config.patch(disable=True):
        expected = F.dequantize_4bit(q, state)
    if k % blocksize and torch.backends.cpu.get_cpu_capability() == "AVX512":
        # bitsandbytes 0.50's AVX-512 CPU dequantize is wrong when a block straddles two rows
        # (40x96 at blocksize 256: differs from its own codes x absmax); its generic path is not
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        absmax = state.absmax
        if double_quant:
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        expected = _dequantize_4bit_compute(q.reshape(-1), absmax.float(), state.code, blocksize, (n, k),
                                            torch.float32)
    assert torch.equal(bnb4.from_storage(t, blocksize, n, k), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bit_identical_to_bitsandbytes_half_weights(dtype):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    w = torch.randn(48, 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = bnb4.to_storage(w, "nf4", 64, True)
    assert torch.equal(t["codes"], q.reshape(-1)) and torch.equal(t["absmax_q"], state.absmax)


def test_tables_equal_bitsandbytes_constructions():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    assert torch.equal(bnb4.dynamic_map(), F.create_dynamic_map(signed=True))
    for quant_type in QUANT_TYPES:
        assert torch.equal(bnb4.code_table(quant_type), F.get_4bit_type(quant_type, device="cpu"))


def test_double_quant_encoder_matches_bitsandbytes_on_hard_values():
    """Values at many magnitudes (small ones hit the 65536-step grid of bitsandbytes' CPU encoder)."""
    pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    g = torch.Generator().manual_seed(0)
    code = bnb4.dynamic_map()
    v = torch.randn(256 * 41 + 13, generator=g) * 10.0 ** torch.randint(-6, 3, (256 * 41 + 13,), generator=g)
    v[256:512] = 0  # an all-zero block
    q_ref, scale_ref = torch.ops.bitsandbytes.quantize_blockwise(v, code, 256)
    q, scale = bnb4.quantize_8bit_dynamic(v, code, 256)
    assert torch.equal(q, q_ref.reshape(-1)) and torch.equal(scale, scale_ref)
