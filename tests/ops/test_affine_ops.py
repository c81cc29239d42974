"""linear_affine op and the Affine scheme (integer zero points): the reference against a direct
float formula on codes read bit by bit, compressed-tensors' own unpacking and dequantization, the CPU
path against the reference, opcheck, autograd, compile, parsing, the code grid."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.library import opcheck

import fxquant
from fxquant.formats import affine as fmt
from fxquant.ops import affine as op
from fxquant.schemes import Affine, parse_scheme, scheme_from_json, scheme_to_json
from helpers import assert_linear_close, policy_x, rel

SCHEMES = ["affine4-g32", "affine4-g32-sym", "affine8-ch", "affine8-g16-sym-fp16", "affine2-g8-fp32",
           "affine3-g16", "affine5-ch-sym", "affine6-g7-fp16", "affine7-g32-sym-fp32"]


def build(scheme: str, n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qw = parse_scheme(scheme).quantize(w)
    return w, qw, tuple(qw.tensors.values()), qw.attrs


def codes_bit_by_bit(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The codes of each row, read as Python integers from the 32-bit words (no tensor bit tricks)."""
    rows = []
    for row in qweight.tolist():
        stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(row))
        rows.append([(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(k)])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), k)


def direct_weight(qw) -> torch.Tensor:
    """``(q - z) * s`` in float64 from codes read bit by bit: independent of the format module."""
    t, a = qw.tensors, qw.attrs
    k, g, bits = a["in_features"], a["group_size"], a["bits"]
    q = codes_bit_by_bit(t["qweight"], bits, k)
    cols = torch.arange(k) // g
    s = t["scale"].double()[:, cols]
    z = t["zero_point"].double()[:, cols] if t["zero_point"].numel() else float(1 << (bits - 1))
    return (q - z) * s


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,k", [(1, 1), (5, 33), (24, 64), (7, 100)])
def test_dequantization_is_the_direct_formula(scheme, n, k):
    """fp32 ``(q - z) * s`` is exact for bf16 / fp16 scales, one rounding for fp32 ones."""
    _, qw, args, attrs = build(scheme, n, k, n + k)
    want = direct_weight(qw)
    got = op.dequantize_weight(*args, **attrs)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert torch.equal(got, want.float())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (2, 32), (5, 33), (8, 100)])
def test_packing_is_compressed_tensors_pack_to_int32(bits, rows, cols):
    """Rows (weight_packed) and columns (weight_zero_point, packed along N) as compressed-tensors packs
    them, and back; transposed views and size-1 dims included."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(0, 1 << bits, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    signed = (q.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    theirs = helpers.pack_to_int32(signed, bits)
    assert torch.equal(fmt.pack_rows(q, bits), theirs)
    assert torch.equal(fmt.unpack_rows(theirs, bits, cols), q)
    theirs0 = helpers.pack_to_int32(signed, bits, packed_dim=0)
    assert torch.equal(fmt.pack_rows(q.t(), bits).t(), theirs0)
    assert torch.equal(fmt.unpack_rows(theirs0.t(), bits, rows).t(), q)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reference_is_a_float_linear_on_that_weight(scheme):
    _, qw, args, attrs = build(scheme, 19, 70, 3)
    w = direct_weight(qw).float()
    x, b = torch.randn(2, 3, 70), torch.randn(19)
    assert torch.allclose(op.reference(x, *args, b, **attrs), torch.nn.functional.linear(x, w, b), atol=1e-5)


def test_compressed_tensors_reads_the_same_weight():
    """compressed-tensors' own unpacking and dequantization (in the scale dtype) of these tensors is our
    fp32 weight rounded once to the scale dtype."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    for scheme in SCHEMES:
        s = parse_scheme(scheme)
        n, k = 12, 64 if s.group_size is None or 64 % s.group_size == 0 else 7 * s.group_size
        _, qw, args, attrs = build(scheme, n, k, 1)
        t, bits, mid = qw.tensors, s.bits, 1 << (s.bits - 1)
        codes = unpack_from_int32(t["qweight"], bits, torch.Size([n, k]))  # signed, as compressed-tensors
        zero = None if s.symmetric else (t["zero_point"].to(torch.int16) - mid).to(torch.int8)
        qargs = QuantizationArgs(num_bits=bits, symmetric=s.symmetric,
                                 strategy="channel" if s.group_size is None else "group", group_size=s.group_size)
        theirs = dequantize(codes, t["scale"], zero, qargs)
        assert theirs.dtype == s.scale_dtype
        assert torch.equal(theirs, op.dequantize_weight(*args, **attrs).to(s.scale_dtype)), scheme


@pytest.mark.parametrize("scheme", SCHEMES)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 130), dtype=st.sampled_from([torch.float32,
       torch.bfloat16, torch.float16]), with_bias=st.booleans(), lead=st.sampled_from([(), (2,)]),
       seed=st.integers(0, 999))
def test_op_matches_reference(scheme, m, n, k, dtype, with_bias, lead, seed):
    """Any N, K (partial groups included): the CPU path is the reference on the values the policy computes on."""
    _, _, args, attrs = build(scheme, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = torch.ops.fxquant.linear_affine(x, *args, b, **attrs)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    r = op.reference(policy_x(x), *args, b, **attrs)
    w = op.dequantize_weight(*args, **attrs)
    assert_linear_close(y, r, x, w, 2**-7 if dtype != torch.float32 else 1e-5, b)


@pytest.mark.parametrize("scheme", ["affine4-g32", "affine8-ch-sym-fp16"])
def test_fp32_path_is_the_reference_in_fp32(scheme, fp32_dense):
    _, _, args, attrs = build(scheme, 200, 96)
    x = torch.randn(300, 96)
    assert rel(torch.ops.fxquant.linear_affine(x, *args, None, **attrs), op.reference(x, *args, None, **attrs)) < 1e-6


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(cd):
    _, _, args, attrs = build("affine4-g32", 40, 64)
    x = torch.randn(5, 64)
    y = torch.ops.fxquant.linear_affine(x, *args, None, **attrs, compute_dtype=cd)
    r = op.reference(x, *args, None, **attrs, compute_dtype=cd)
    assert y.dtype == torch.float32 and rel(y, r) < (1e-6 if cd == torch.float32 else 1e-2)


@pytest.mark.parametrize("scheme,dtype,with_bias", [("affine4-g32", torch.float32, True),
                                                     ("affine8-ch-sym", torch.bfloat16, False),
                                                     ("affine3-g16-fp16", torch.float32, False)])
def test_opcheck(scheme, dtype, with_bias):
    _, _, args, attrs = build(scheme, 24, 64)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_affine.default, (x, *args, b), attrs)


def test_backward_is_gradient_of_dequantized_linear():
    _, _, args, attrs = build("affine4-g16", 16, 64, 5)
    w = op.dequantize_weight(*args, **attrs)
    x, b = torch.randn(3, 64, requires_grad=True), torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    torch.ops.fxquant.linear_affine(x, *args, b, **attrs).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4) and torch.allclose(b.grad, gy.sum(0))


@pytest.mark.parametrize("scheme", ["affine4-g32", "affine4-g32-sym", "affine8-ch"])
def test_rtn_error_bound(scheme):
    """Round to nearest on the stored parameters: symmetric ``|W - Ŵ| <= s/2``; asymmetric ``<= s``
    (the zero point is rounded to an integer, which moves the range by up to ``s/2``); 0 is exact."""
    s = parse_scheme(scheme)
    w, qw, args, attrs = build(scheme, 33, 96, 7)
    w[0, :5] = 0
    qw = s.quantize(w)
    wd = s.dequantize(qw)
    g = attrs["group_size"]
    scale = qw.tensors["scale"].float()[:, torch.arange(96) // g]
    assert (wd[w == 0] == 0).all()
    assert ((w - wd).abs() <= scale * (0.5 if s.symmetric else 1.0) * (1 + 1e-6)).all()


def test_codes_and_zeros_are_in_range_and_all_zero_groups_are_exact():
    w = torch.zeros(4, 64)
    w[1] = torch.linspace(-3, 5, 64)
    for scheme in ["affine2-g16", "affine8-g64", "affine4-ch-sym-fp16"]:
        s = parse_scheme(scheme)
        qw = s.quantize(w)
        assert torch.equal(s.dequantize(qw)[0], torch.zeros(64))
        z = qw.tensors["zero_point"]
        assert z.numel() == 0 or int(z.max()) < 1 << s.bits


def test_module_compiles_fullgraph():
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40, bias=False))
    fxquant.quantize_(m, fxquant.Spec(default="affine4-g16", rules={"2": "affine8-ch-sym-fp16"}),
                      (torch.randn(2, 64),))
    assert str(m[0].scheme) == "affine4-g16" and m[2].op_name == "linear_affine"
    x = torch.randn(3, 64)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert fxquant.report(m).row("0").scheme == "affine4-g16"


# ---- the scheme ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("affine4-g128", Affine()), ("affine4-g128-asym", Affine()), ("affine4-g128-bf16", Affine()),
    ("affine8-ch-sym", Affine(bits=8, group_size=None, symmetric=True)),
    ("affine3-g64-fp32", Affine(bits=3, group_size=64, scale_dtype=torch.float32)),
    ("AFFINE2-G7-SYM-FP16", Affine(bits=2, group_size=7, symmetric=True, scale_dtype=torch.float16))])
def test_parse(text, expected):
    assert parse_scheme(text) == expected


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [None, 1, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_scheme_round_trips(bits, group, symmetric, dtype):
    s = Affine(bits=bits, group_size=group, symmetric=symmetric, scale_dtype=dtype)
    assert parse_scheme(str(s)) == s and scheme_from_json(scheme_to_json(s)) == s


def test_minus_one_means_per_channel():
    assert Affine(group_size=-1) == Affine(group_size=None) and str(Affine(group_size=-1)) == "affine4-ch"


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 1}, r"Affine.bits=1 .*valid: 2..8"), ({"bits": 9}, "bits=9"),
    ({"group_size": 0}, r"group_size=0 .*valid: an integer >= 1, or None / -1"),
    ({"group_size": 2.0}, "group_size=2.0"), ({"symmetric": 1}, "symmetric=1"),
    ({"scale_dtype": torch.float64}, r"scale_dtype=torch.float64 .*valid: torch.bfloat16")])
def test_bad_fields_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Affine(**kwargs)


def test_bad_strings_name_the_scheme():
    with pytest.raises(ValueError, match=r"affine9-g32.*bits=9"):
        parse_scheme("affine9-g32")
    with pytest.raises(ValueError, match="unknown scheme 'affine4-32'"):
        parse_scheme("affine4-32")


def test_op_check_names_the_tensor():
    _, qw, args, attrs = build("affine4-g32", 8, 64)
    x = torch.randn(2, 64)
    bad = dict(qw.tensors, zero_point=qw.tensors["zero_point"].to(torch.int8))
    with pytest.raises(ValueError, match="zero_point must be torch.uint8"):
        torch.ops.fxquant.linear_affine(x, *bad.values(), None, **attrs)
    with pytest.raises(ValueError, match=r"scale must be one of .* \[N, ceil\(K/g\)\]"):
        torch.ops.fxquant.linear_affine(x, args[0], args[1][:, :1], args[2], None, **attrs)
    with pytest.raises(ValueError, match="x has 63 input features"):
        torch.ops.fxquant.linear_affine(x[:, :63], *args, None, **attrs)


# ---- the code grid (GPTQ / AWQ / HQQ produce this format through it) ------------------------------
@pytest.mark.parametrize("scheme", ["affine4-g32", "affine4-g32-sym", "affine8-ch-fp32", "affine3-g16-fp16"])
@pytest.mark.parametrize("shape", [(16, 64), (5, 70)])
def test_rtn_through_the_grid_is_the_scheme_quantize(scheme, shape):
    s, (n, k) = parse_scheme(scheme), shape
    w = torch.randn(n, k) * 0.05
    w[0] = 0
    grid = s.grid(n, k)
    q, scale, offset = grid.rtn(grid.groups(w))
    got, want = s.pack_grid(q, scale, offset, n, k), s.quantize(w)
    assert got.attrs == want.attrs
    for name, t in want.tensors.items():
        assert torch.equal(got.tensors[name], t), name
    assert torch.equal(grid.ungroup(grid.decode(q, scale, offset), n, k), s.dequantize(want))


def test_gptq_produces_the_format():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32))
    calib = [torch.randn(4, 64) for _ in range(4)]
    fxquant.quantize_(m, "affine4-g32@gptq", (calib[0],), calibration=calib)
    assert m[0].op_name == "linear_affine" and fxquant.report(m).row("0").method == "gptq"
    z = m[0].zero_point
    assert z.dtype == torch.uint8 and z.shape == (32, 2)
