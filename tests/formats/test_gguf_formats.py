"""GGUF block types: the type table against the gguf package's, dequantization bit for bit against
``gguf.quants.dequantize`` (random bytes with finite scales, random bytes with NaN / inf scales,
quantized data) and against llama.cpp's published ``dequantize_row_*`` loops re-implemented plainly
below (no gguf needed), quantization byte for byte against ``gguf.quants.quantize``, the packing
contract of ``pack_rows`` and the GGUF scheme."""
import dataclasses
import struct

import numpy as np
import pytest
import torch

from fxquant.formats import gguf as fmt
from fxquant.schemes import GGUF, parse_scheme, scheme_from_json, scheme_to_json

# the gguf package's numpy arithmetic on NaN / inf scales (planted on purpose) warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ALL = list(fmt.QTYPES)
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
#: byte offsets of the fp16 fields of each block (llama.cpp's block_q* structs)
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
              "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
#: llama.cpp's block sizes (QK, bytes), from ggml-common.h
PUBLISHED_SIZES = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
                   "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}


def random_blocks(qtype: str, n: int, k: int, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    """uint8 [n, row_bytes]: random codes, finite fp16 scales of either sign in [-scale, scale]."""
    q = fmt.QTYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // q.block_size, q.type_size), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qtype]:
        v = ((torch.rand(n, k // q.block_size, generator=g) * 2 - 1) * scale).to(torch.float16)
        raw[:, :, off:off + 2] = v.view(torch.uint8).reshape(n, -1, 2)
    return raw.reshape(n, -1)


def gguf_dequantize(blocks: torch.Tensor, qtype: str) -> np.ndarray:
    gguf = pytest.importorskip("gguf")
    return gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(fmt.QTYPES[qtype].ggml_type))


def assert_same_bits(ours: torch.Tensor, theirs: np.ndarray) -> None:
    """Equal bit for bit, NaN at the same positions (NaN payloads may differ)."""
    t = torch.from_numpy(np.ascontiguousarray(theirs))
    assert ours.dtype == torch.float32 and ours.shape == t.shape
    nan = torch.isnan(t)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), t[~nan].view(torch.int32))


# ---- the type table ---------------------------------------------------------------------------------
def test_types_are_gguf_and_llama_cpp_types():
    assert {k: (q.block_size, q.type_size) for k, q in fmt.QTYPES.items()} == PUBLISHED_SIZES
    gguf = pytest.importorskip("gguf")
    for name, q in fmt.QTYPES.items():
        t = gguf.GGMLQuantizationType[name.upper()]
        assert q.ggml_type == t and fmt.QTYPE_BY_GGML[t] is q and fmt.qtype(t) is q
        assert gguf.GGML_QUANT_SIZES[t] == (q.block_size, q.type_size)


def test_qtype_lookup_and_errors():
    assert fmt.qtype("Q4_K") is fmt.qtype(12) is fmt.QTYPES["q4_k"]
    assert fmt.row_bytes("q6_k", 512) == 420 and fmt.nbytes("q4_0", 3, 64) == 3 * 36
    with pytest.raises(ValueError, match=r"GGUF type 'iq2_xs' is not supported; valid: q4_0, q4_1, .*q6_k"):
        fmt.qtype("iq2_xs")
    with pytest.raises(ValueError, match=r"GGUF type 16 is not supported"):
        fmt.qtype(16)
    with pytest.raises(ValueError, match=r"GGUF q4_k: in_features=300 is not a multiple of its block size 256"):
        fmt.row_bytes("q4_k", 300)


# ---- dequantization ------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("n,k", [(1, 256), (5, 512), (3, 1024)])
def test_dequantize_is_gguf_bit_for_bit(qtype, n, k):
    blocks = random_blocks(qtype, n, k, seed=n + k)
    assert_same_bits(fmt.dequantize(blocks, qtype, k), gguf_dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_any_bytes_nan_and_inf_scales(qtype):
    """Unconstrained bytes: fp16 scales that are NaN, inf or subnormal give the package's NaN / inf."""
    q = fmt.QTYPES[qtype]
    raw = torch.randint(0, 256, (64, 2 * q.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    special = torch.tensor([0x7C00, 0xFC00, 0x7E00, 0x0001, 0x8000, 0x03FF], dtype=torch.int32)
    for i, bits in enumerate(special.tolist()):  # plant each special fp16 in every field of some blocks
        for off in F16_FIELDS[qtype]:
            raw[i, off], raw[i, off + 1] = bits & 0xFF, bits >> 8
    assert_same_bits(fmt.dequantize(raw, qtype), gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", LEGACY)
def test_dequantize_quantized_data(qtype):
    gguf = pytest.importorskip("gguf")
    w = np.random.default_rng(3).standard_normal((6, 128)).astype(np.float32)
    blocks = torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype.upper()]))
    assert_same_bits(fmt.dequantize(blocks, qtype, 128), gguf_dequantize(blocks, qtype))


# llama.cpp's dequantize_row_* (ggml-quants.c), one block at a time, plain Python on the published
# byte layout: an oracle that does not depend on the gguf package.
def _f16(b: bytes, off: int) -> float:
    return struct.unpack_from("<e", b, off)[0]


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _llama_q4_0(b):
    d = _f16(b, 0)
    qs = b[2:18]
    return [d * ((qs[j] & 15) - 8) for j in range(16)] + [d * ((qs[j] >> 4) - 8) for j in range(16)]


def _llama_q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    qh = struct.unpack_from("<I", b, 4)[0]
    qs = b[8:24]
    lo = [_f32(d * ((qs[j] & 15) | (((qh >> j) & 1) << 4)) + m) for j in range(16)]
    hi = [_f32(d * ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m) for j in range(16)]
    return lo + hi


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _llama_q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    scales, q = b[4:16], b[16:144]
    out, is_ = [], 0
    for j in range(0, 256, 64):
        sc, m = _scale_min_k4(is_, scales)
        d1, m1 = _f32(d * sc), _f32(dmin * m)
        sc, m = _scale_min_k4(is_ + 1, scales)
        d2, m2 = _f32(d * sc), _f32(dmin * m)
        qq = q[j // 2:j // 2 + 32]
        out += [_f32(d1 * (v & 0xF) - m1) for v in qq] + [_f32(d2 * (v >> 4) - m2) for v in qq]
        is_ += 2
    return out


def _llama_q3_k(b):
    hm, q, sb, d = b[0:32], b[32:96], b[96:108], _f16(b, 108)
    # the 12 scale bytes as llama.cpp unpacks them with its kmask1 / kmask2 word arithmetic
    aux = list(struct.unpack("<3I", sb))
    tmp = aux[2]
    k1, k2 = 0x03030303, 0x0F0F0F0F
    aux = [(aux[0] & k2) | (((tmp >> 0) & k1) << 4), (aux[1] & k2) | (((tmp >> 2) & k1) << 4),
           ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4), ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)]
    scales = [s - 256 if s > 127 else s for s in struct.pack("<4I", *aux)]
    out, is_, m = [], 0, 1
    for n in range(0, 256, 128):
        qq = q[n // 4:n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for half in range(2):
                dl = _f32(d * (scales[is_] - 32))
                is_ += 1
                for l in range(16 * half, 16 * half + 16):
                    out.append(_f32(dl * (((qq[l] >> shift) & 3) - (0 if hm[l] & m else 4))))
            m <<= 1
    return out


def _llama_q6_k(b):
    ql, qh, sc, d = b[0:128], b[128:192], struct.unpack("<16b", b[192:208]), _f16(b, 208)
    out = [0.0] * 256
    for n in range(2):
        l0, h0, s0 = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            is_ = l // 16
            q1 = ((l0[l] & 0xF) | (((h0[l] >> 0) & 3) << 4)) - 32
            q2 = ((l0[l + 32] & 0xF) | (((h0[l] >> 2) & 3) << 4)) - 32
            q3 = ((l0[l] >> 4) | (((h0[l] >> 4) & 3) << 4)) - 32
            q4 = ((l0[l + 32] >> 4) | (((h0[l] >> 6) & 3) << 4)) - 32
            for j, qv in ((0, q1), (32, q2), (64, q3), (96, q4)):
                out[128 * n + l + j] = _f32(_f32(d * s0[is_ + j // 16]) * qv)
    return out


@pytest.mark.parametrize("qtype,decode", [("q4_0", _llama_q4_0), ("q5_1", _llama_q5_1), ("q3_k", _llama_q3_k),
                                          ("q4_k", _llama_q4_k), ("q6_k", _llama_q6_k)])
def test_dequantize_is_llama_cpp_reference_loops(qtype, decode):
    q = fmt.QTYPES[qtype]
    blocks = random_blocks(qtype, 3, 2 * q.block_size, seed=11)
    ours = fmt.dequantize(blocks, qtype)
    want = [v for row in blocks.reshape(-1, q.type_size) for v in decode(bytes(row.tolist()))]
    assert torch.equal(ours.reshape(-1), torch.tensor(want, dtype=torch.float32))


# ---- quantization ---------------------------------------------------------------------------------------
def _weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 256, generator=g)
    w[0] = 0.0  # all-zero blocks (d = 0)
    w[1, :32] = 0.25  # a constant block
    w[2, :32] = torch.tensor([1.0, -1.0] * 16)  # ties for the largest magnitude: the first wins
    w[3] *= 1e3 if dtype == torch.float16 else 1e8  # scales past fp16's range are stored as inf, as the package does
    w[4] *= 1e-6  # fp16 subnormal scales
    w[5, 3] = 7.5  # one outlier
    return w.to(dtype)


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_is_gguf_byte_for_byte(qtype, dtype):
    gguf = pytest.importorskip("gguf")
    w = _weights(dtype)
    theirs = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType[qtype.upper()])
    ours = fmt.quantize(w, qtype)
    if dtype != torch.float16:
        assert not torch.isfinite(fmt.dequantize(ours, qtype)[3]).all()  # the inf scale is there
    assert ours.dtype == torch.uint8 and ours.shape == (8, fmt.row_bytes(qtype, 256))
    assert torch.equal(ours, torch.from_numpy(theirs))


@pytest.mark.parametrize("qtype", LEGACY)
def test_quantize_error_bound(qtype):
    """Half a step per value (``d/2``; the ``_1`` types one step where truncation meets fp16 rounding)."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    wq = fmt.dequantize(fmt.quantize(w, qtype), qtype)
    blocks = w.reshape(-1, 32)
    span = (blocks.amax(1) - blocks.amin(1)) if qtype.endswith("_1") else 2 * blocks.abs().amax(1)
    steps = {"q4_0": 16, "q4_1": 15, "q5_0": 32, "q5_1": 31, "q8_0": 254}[qtype]
    err = (wq.reshape(-1, 32) - blocks).abs().amax(1)
    assert (err <= span / steps * 1.01 + 1e-6).all()


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquants_are_load_only(qtype):
    with pytest.raises(ValueError, match=rf"GGUF {qtype} is load-only: read it from a GGUF file \(fxquant.from_gguf\)"):
        fmt.quantize(torch.randn(2, 256), qtype)


# ---- pack_rows ----------------------------------------------------------------------------------------
def test_pack_rows_views_the_file_bytes():
    raw = random_blocks("q4_k", 6, 512)
    flat = raw.reshape(-1)
    qw = fmt.pack_rows("q4_k", flat, 6, 512)
    assert qw.op == "linear_gguf" and (qw.out_features, qw.in_features) == (6, 512)
    assert qw.attrs == {"qtype": "q4_k", "out_features": 6, "in_features": 512}
    assert qw.tensors["blocks"].shape == (6, 288) and qw.tensors["blocks"].data_ptr() == flat.data_ptr()
    assert qw.nbytes == 6 * 288
    qw = fmt.pack_rows(14, random_blocks("q6_k", 2, 256), 2, 256, compute_dtype=torch.bfloat16)
    assert qw.attrs["qtype"] == "q6_k" and qw.attrs["compute_dtype"] == torch.bfloat16


@pytest.mark.parametrize("raw,n,k,match", [
    (torch.zeros(6, 287, dtype=torch.uint8), 6, 512,
     r"GGUF q4_k weight \[6, 512\] is uint8 \[6, 288\] \(2 blocks of 144 bytes per row\), "
     r"got torch.uint8 of shape \(6, 287\)"),
    (torch.zeros(6, 288, dtype=torch.int8), 6, 512, r"got torch.int8 of shape \(6, 288\)"),
    (torch.zeros(6, 288, dtype=torch.uint8), 6, 500,
     r"GGUF q4_k: in_features=500 is not a multiple of its block size 256"),
    (np.zeros((6, 288), dtype=np.uint8), 6, 512, r"got ndarray"),
])
def test_pack_rows_refuses_mismatched_bytes(raw, n, k, match):
    before = raw.clone() if isinstance(raw, torch.Tensor) else raw.copy()
    with pytest.raises(ValueError, match=match):
        fmt.pack_rows("q4_k", raw, n, k)
    assert (torch.equal(raw, before) if isinstance(raw, torch.Tensor) else (raw == before).all())


def test_pack_rows_refuses_unknown_type():
    with pytest.raises(ValueError, match=r"GGUF type 'q8_k' is not supported"):
        fmt.pack_rows("q8_k", torch.zeros(1, 292, dtype=torch.uint8), 1, 256)


# ---- the scheme ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL)
def test_scheme_strings_round_trip(qtype):
    s = parse_scheme(f"gguf-{qtype}")
    assert s == GGUF(qtype=qtype) and str(s) == f"gguf-{qtype}" and s.family == "gguf"
    assert scheme_from_json(scheme_to_json(s)) == s
    assert parse_scheme(f"GGUF-{qtype.upper()}") == s
    assert GGUF(qtype=fmt.QTYPES[qtype].ggml_type) == s  # a ggml type value is stored as the name


def test_scheme_errors():
    with pytest.raises(ValueError, match=r"GGUF.qtype='q9_9' is not supported; valid: q4_0, q4_1, q5_0"):
        GGUF(qtype="q9_9")
    with pytest.raises(ValueError, match=r"scheme 'gguf-iq4_xs'.*GGUF.qtype='iq4_xs' is not supported"):
        parse_scheme("gguf-iq4_xs")
    with pytest.raises(ValueError, match=r"compute_dtype"):
        GGUF(qtype="q8_0", compute_dtype=torch.int8)


def test_unsupported_reasons():
    assert GGUF(qtype="q4_k").unsupported_reason(torch.randn(4, 256)) == \
        "gguf-q4_k is load-only: read it from a GGUF file (fxquant.from_gguf)"
    assert "not a multiple of gguf-q8_0's block size 32" in GGUF(qtype="q8_0").unsupported_reason(torch.randn(4, 48))
    assert GGUF(qtype="q8_0").unsupported_reason(torch.randn(4, 64)) is None
    assert "2-D" in GGUF(qtype="q8_0").unsupported_reason(torch.randn(64))


@pytest.mark.parametrize("qtype", LEGACY)
def test_scheme_quantize_and_row_blocks(qtype):
    s = GGUF(qtype=qtype)
    w = torch.randn(300, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    qw = s.quantize(w)
    assert torch.equal(qw.tensors["blocks"], fmt.quantize(w, qtype))
    assert torch.equal(s.dequantize(qw), fmt.dequantize(qw.tensors["blocks"], qtype))
    blocked, err = s.quantize_in_blocks(w, max_elements=128 * 70)
    assert torch.equal(blocked.tensors["blocks"], qw.tensors["blocks"]) and blocked.attrs == qw.attrs
    assert err == pytest.approx(s.rel_error(w, qw), rel=1e-4)


def test_scheme_packed_carries_compute_dtype():
    s = dataclasses.replace(GGUF(qtype="q4_k"), compute_dtype=torch.float32)
    qw = s.packed(random_blocks("q4_k", 3, 256), 3, 256)
    assert qw.attrs == {"qtype": "q4_k", "out_features": 3, "in_features": 256, "compute_dtype": torch.float32}
