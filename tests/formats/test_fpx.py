"""fp<X>_e<A>m<B>: exhaustive decode table, round-to-nearest-even oracles, packing, error bound."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.formats import fpx

FORMATS = [fpx.parse_format(name) for name in fpx.valid_formats()]
IDS = list(fpx.valid_formats())


def test_valid_formats_are_every_split_of_3_to_7_bits():
    assert len(FORMATS) == sum(x - 1 for x in range(3, 8)) == 20
    assert {"fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1", "fp3_e1m1", "fp7_e4m2", "fp4_e3m0"} <= set(IDS)


@pytest.mark.parametrize("ebits,mbits", FORMATS, ids=IDS)
def test_decode_table_is_the_format(ebits, mbits):
    """Every code decodes to a distinct value (but ±0); positives increase with the code; the ends
    are the published constants: max_normal, min subnormal 2^(1-bias-B), min normal 2^(1-bias)."""
    bits, bias = 1 + ebits + mbits, 2 ** (ebits - 1) - 1
    tab = fpx.decode_table(ebits, mbits)
    half = 2 ** (bits - 1)
    pos, neg = tab[:half], tab[half:]
    assert torch.equal(neg, -pos)  # sign-magnitude
    assert pos[0] == 0 and math.copysign(1, neg[0].item()) == -1  # +0 and -0
    assert (pos[1:] > pos[:-1]).all()
    assert pos[-1] == fpx.max_normal(ebits, mbits)
    assert pos[1] == 2.0 ** (1 - bias - mbits)
    assert pos[2**mbits] == 2.0 ** (1 - bias)  # exponent field 1, mantissa 0


@pytest.mark.parametrize("ebits,mbits", FORMATS, ids=IDS)
def test_every_code_round_trips(ebits, mbits):
    """encode(decode(c)) == c for every code (-0.0 keeps its sign bit, so even it round trips)."""
    codes = torch.arange(2 ** (1 + ebits + mbits), dtype=torch.uint8)
    assert torch.equal(fpx.encode(fpx.decode(codes, ebits, mbits), ebits, mbits), codes)


def _nearest_even_oracle(x: torch.Tensor, ebits: int, mbits: int) -> torch.Tensor:
    """Brute force: the code of the nearest table value, ties to the even code, saturating."""
    bits = 1 + ebits + mbits
    pos = fpx.decode_table(ebits, mbits)[: 2 ** (bits - 1)].double()
    a = x.double().abs()
    dist = (a[:, None] - pos[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    codes = torch.arange(pos.numel())
    even = ties & (codes % 2 == 0)
    pick = torch.where(even.any(dim=1), even.double().argmax(dim=1), ties.double().argmax(dim=1))
    sign = (x.view(torch.int32) < 0).long() << (bits - 1)
    return (pick | sign).to(torch.uint8)


def _probe_values(ebits: int, mbits: int) -> torch.Tensor:
    """Midpoints between neighbours and their fp32 neighbours, both signs, plus random values."""
    bits = 1 + ebits + mbits
    pos = fpx.decode_table(ebits, mbits)[: 2 ** (bits - 1)]
    mids = (pos[1:] + pos[:-1]) / 2
    mx = fpx.max_normal(ebits, mbits)
    edge = torch.cat([mids, torch.nextafter(mids, torch.zeros(1)), torch.nextafter(mids, torch.full((1,), 1e30)),
                      pos, torch.tensor([mx * 1.01, mx * 4, 1e-40, 0.0])])
    rnd = (torch.rand(4000, generator=torch.Generator().manual_seed(bits * 8 + ebits)) * 2 - 1) * mx * 1.1
    both = torch.cat([edge, rnd])
    return torch.cat([both, -both])


@pytest.mark.parametrize("ebits,mbits", FORMATS, ids=IDS)
def test_encode_is_round_to_nearest_even(ebits, mbits):
    x = _probe_values(ebits, mbits)
    assert torch.equal(fpx.encode(x, ebits, mbits), _nearest_even_oracle(x, ebits, mbits))


@pytest.mark.parametrize("ebits,mbits", FORMATS, ids=IDS)
def test_encode_matches_torchao(ebits, mbits):
    """Peer oracle: torchao's ``_f32_to_floatx_unpacked`` (the MX / FP6-LLM encoder)."""
    utils = pytest.importorskip("torchao.prototype.custom_fp_utils")
    x = _probe_values(ebits, mbits)
    assert torch.equal(fpx.encode(x, ebits, mbits), utils._f32_to_floatx_unpacked(x, ebits, mbits))
    codes = torch.arange(2 ** (1 + ebits + mbits), dtype=torch.uint8)
    assert torch.equal(fpx.decode(codes, ebits, mbits), utils._floatx_unpacked_to_f32(codes, ebits, mbits))


@pytest.mark.parametrize("ebits,mbits", [(4, 3), (5, 2)], ids=["e4m3", "e5m2"])
def test_encode_matches_torch_float8_in_range(ebits, mbits):
    """Two independent RNE implementations agree: torch's float8 cast on its finite range (e4m3
    here has no NaN code, so the ranges differ only above the float8 maximum)."""
    dtype = torch.float8_e4m3fn if ebits == 4 else torch.float8_e5m2
    mx = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    x = torch.cat([(torch.rand(20000, generator=g) * 2 - 1) * mx, torch.randn(20000, generator=g) * 2.0**-8])
    x = torch.cat([x, torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()])
    x = x[x.isfinite() & (x.abs() <= mx)]
    # fpx codes are 7-bit magnitudes + sign at bit 7: the same bit layout as torch's float8
    assert torch.equal(fpx.encode(x, ebits, mbits), x.to(dtype).view(torch.uint8))


@given(bits=st.integers(3, 7), rows=st.integers(1, 5), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(bits, rows, k, seed):
    codes = torch.randint(0, 2**bits, (rows, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = fpx.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, fpx.packed_cols(k, bits))
    assert torch.equal(fpx.unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", range(3, 8))
def test_pack_layout_element_by_element(bits):
    """The documented plane layout, checked bit by bit in plain Python: in the plane of width p
    (high code bits first, widths 4/2/1 from the binary expansion of X), byte j of the row holds
    in bits [i*p, (i+1)*p) that plane's bits of code i * cols + j."""
    k = 19
    codes = torch.randint(0, 2**bits, (2, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = fpx.pack(codes, bits)
    kp = fpx.padded_k(k)
    assert kp == 24 and packed.shape == (2, kp * bits // 8)
    widths = [w for w in (4, 2, 1) if bits & w]
    for row in range(2):
        got, col, shift = [0] * kp, 0, bits
        for width in widths:
            shift -= width
            cols = kp * width // 8
            for j in range(cols):
                byte = int(packed[row, col + j])
                for i in range(8 // width):
                    got[i * cols + j] |= ((byte >> (i * width)) & (2**width - 1)) << shift
            col += cols
        assert got == codes[row].tolist() + [0] * (kp - k)  # padding codes are zero


@pytest.mark.parametrize("ebits,mbits", FORMATS, ids=IDS)
@given(n=st.integers(1, 6), k=st.integers(1, 40), mag=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_quantize_error_bound(ebits, mbits, n, k, mag, seed):
    """|W - Ŵ| <= half the code spacing at |W| / scale, times scale (no saturation: scale >= amax/max)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * mag
    codes, scale = fpx.quantize(w, ebits, mbits)
    assert scale.dtype == torch.bfloat16 and codes.shape == (n, k) and int(codes.max()) < 2 ** (1 + ebits + mbits)
    s = scale.float()[:, None]
    assert (w.abs() / s <= fpx.max_normal(ebits, mbits)).all()
    emin = 1 - (2 ** (ebits - 1) - 1)
    e = torch.floor(torch.log2((w.abs() / s).clamp(min=1e-38))).clamp(min=emin)
    bound = s * torch.exp2(e - mbits - 1)
    err = (fpx.dequantize_codes(codes, scale, ebits, mbits) - w).abs()
    assert (err <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("ebits,mbits", [(3, 2), (2, 3), (2, 2), (2, 1), (1, 1), (6, 0)])
@given(n=st.integers(1, 9), k=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_storage_roundtrip_and_nbytes(ebits, mbits, n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    codes, scale = fpx.quantize(w, ebits, mbits)
    stored = fpx.to_storage(w, ebits, mbits)
    back = fpx.from_storage(stored["qweight"], stored["scale"], ebits, mbits, k)
    assert torch.equal(back, fpx.dequantize_codes(codes, scale, ebits, mbits))
    assert fpx.nbytes(n, k, ebits, mbits) == sum(t.numel() * t.element_size() for t in stored.values())


def test_codes_match_torchao_fpx_weight_only_for_the_same_scale():
    """torchao's ``_quantize_affine_floatx`` (what ``fpx_weight_only`` stored) gives our codes."""
    qp = pytest.importorskip("torchao.quantization.quant_primitives")
    if not hasattr(qp, "_quantize_affine_floatx"):
        pytest.skip("this torchao has no _quantize_affine_floatx")
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    codes, scale = fpx.quantize(w, 3, 2)
    assert torch.equal(qp._quantize_affine_floatx(w, scale.float(), 3, 2), codes)
    # torchao's own scale (amax / max_normal, unrounded) differs from ours by < 1 bf16 ulp
    ao_scale = qp._choose_qparams_affine_floatx(w, 3, 2)
    assert ((scale.float() - ao_scale) / ao_scale).abs().max() < 2**-7


def test_error_on_random_normal_weights():
    """Relative error on N(0, 1) rows (K = 4096): the fp6 formats sit between int4 and int8
    (docs/reference-numbers.md: int8 per channel 0.0088, int4 g128 0.0998), e3m2 worse than e2m3 on
    Gaussians."""
    w = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0))
    err = {}
    for name in ("fp6_e3m2", "fp6_e2m3", "fp5_e2m2", "fp4_e2m1"):
        e, m = fpx.parse_format(name)
        codes, scale = fpx.quantize(w, e, m)
        err[name] = ((fpx.dequantize_codes(codes, scale, e, m) - w).norm() / w.norm()).item()
    assert 0.0088 < err["fp6_e2m3"] < err["fp6_e3m2"] < err["fp5_e2m2"] < err["fp4_e2m1"]
    assert err["fp6_e3m2"] < 0.0998 / 1.5, err


@pytest.mark.parametrize("text,match", [
    ("fp6_e2m2", r"X=6 but 1 \+ A \+ B = 5"),
    ("fp8_e4m3", r"8 bits; X = 1 \+ exponent_bits \+ mantissa_bits must be in 3..7"),
    ("fp2_e1m0", r"2 bits"),
    ("fp6_e0m5", r"exponent_bits=0 must be an int >= 1"),
])
def test_bad_formats_raise_listing_valid_ones(text, match):
    with pytest.raises(ValueError, match=match) as info:
        fpx.parse_format(text)
    assert "fp6_e3m2" in str(info.value) and "fp4_e2m1" in str(info.value)


def test_not_a_format_name_is_none():
    assert fpx.parse_format("fp6") is None and fpx.parse_format("int4wo") is None


@pytest.mark.parametrize("ebits,mbits", [f for f in FORMATS if f[0] <= 4], ids=[i for i, f in zip(IDS, FORMATS)
                                                                                    if f[0] <= 4])
def test_fp16_bit_decode_is_exact(ebits, mbits):
    """The CPU fast path's decoder: unpack top-aligned, move bits into float16, times 2^(15-bias)
    equals the table for every code, bit for bit (signed zeros and subnormals included)."""
    bits = 1 + ebits + mbits
    codes = torch.arange(2**bits, dtype=torch.uint8).repeat(3, 1)
    top = fpx.unpack(fpx.pack(codes, bits), bits, 2**bits, top_aligned=True,
                     out=torch.empty(3, fpx.padded_k(2**bits), dtype=torch.uint8))
    assert torch.equal(top, codes << (8 - bits))
    got = fpx.fp16_scaled(top, ebits).float() * 2.0 ** fpx.fp16_exponent_offset(ebits)
    assert torch.equal(got.view(torch.int32), fpx.decode(codes, ebits, mbits).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_in_other_dtypes_is_exact(dtype):
    for ebits, mbits in FORMATS:
        if dtype == torch.float16 and ebits >= 5:
            continue  # e5m*, e6m0 exceed fp16's range (documented)
        codes = torch.arange(2 ** (1 + ebits + mbits), dtype=torch.uint8)
        assert torch.equal(fpx.decode(codes, ebits, mbits, dtype).float(), fpx.decode(codes, ebits, mbits))
