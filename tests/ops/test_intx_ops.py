"""linear_intx op and IntX scheme: CPU paths vs the reference, opcheck, autograd, parsing, end to end."""
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import fxquant
from fxquant.formats import int4, intx as fmt
from fxquant.ops import _cpu
from fxquant.ops import intx as op
from fxquant.schemes import Int4WeightOnly, Int8WeightOnly, IntX, parse_scheme, scheme_from_json, scheme_to_json
from helpers import FAST_PATH_TOL, intx_code_part, rel

DTYPES = [torch.float32, torch.bfloat16]
NATIVE = int4.native_cpu_block_n()
# int4-kernel fast path (b = 4, 8 with axis 1 and a kernel group size) and dequantize path (the rest)
SCHEMES = ["uint4wo-32", "int4wo-64-axis1", "int8wo-32", "uint8wo-64", "uint3wo-32", "int2wo-16",
           "uint5wo-32", "int7wo-8", "uint1wo-32", "uint2wo-4-axis0", "int6wo-3-axis0", "uint4wo-32-axis0"]


def build(scheme: str, n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qw = parse_scheme(scheme).quantize(w)
    args = tuple(qw.tensors.values())
    attrs = qw.attrs
    return (lambda x, b, **kw: torch.ops.fxquant.linear_intx(x, *args, b, **attrs, **kw),
            lambda x, b, **kw: op.reference(x, *args, b, **attrs, **kw), args, attrs)


def assert_close_to_reference(y: torch.Tensor, r: torch.Tensor, x: torch.Tensor, args, attrs):
    """The fast paths run bf16 activations (and bf16 kernel outputs): elementwise
    ``|y - r| <= 2^-6 * (|x| @ |W|.T) + 2^-7 * |r|`` (a few bf16 roundings of every product and of
    the result), which, unlike a norm ratio, also holds when the sum cancels to a small output.
    Axis-0 weights: |W| + |(q - mid) * scale|, as the axis-0 kernel's bf16 form rounds A = scale * x,
    which meets the code part of the weight even where the group's offset cancels it in W (hypothesis
    found uint2wo-4-axis0, K = 2, over the W-only bound; docs/formats/intx.md)."""
    kw = {k: v for k, v in attrs.items() if k != "compute_dtype"}
    w = op.dequantize_weight(*args, **kw).abs()
    if kw["axis"] == 0 and not kw["symmetric"]:
        w = w + intx_code_part(dict(zip(op.OP.tensors, args)), kw).abs()
    x2, y2, r2 = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, w.shape[0]), r.float().reshape(-1, w.shape[0])
    bound = 2**-6 * (x2.abs() @ w.t()) + 2**-7 * r2.abs() + 1e-5
    excess = ((y2 - r2).abs() - bound).max().item()
    assert excess <= 0, f"|y - reference| exceeds the bf16 bound by {excess:.3g}"


def fit(scheme: str, n: int, k: int) -> tuple[int, int]:
    """Round (n, k) to the nearest shape the scheme's grouping divides (for the path functions called
    directly, which take x already padded to whole groups; the op pads it: any shape below)."""
    s = parse_scheme(scheme)
    if s.axis == 1:
        return n, s.group_size * max(k // s.group_size, 1)
    return s.group_size * max(n // s.group_size, 1), k


@pytest.mark.parametrize("scheme", SCHEMES)
@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
       with_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]), seed=st.integers(0, 999))
def test_op_matches_reference(scheme, m, n, k, dtype, with_bias, lead, seed):
    """Any N and K: partial groups are padded (axis 1: K, axis 0: N)."""
    fn, ref, args, attrs = build(scheme, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y, r = fn(x, b), ref(x, b)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert_close_to_reference(y, r, x, args, attrs)


@pytest.mark.parametrize("scheme", ["uint4wo-32", "int8wo-64", "uint3wo-32", "int5wo-4-axis0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 64), (7, 64), (1, 256), (17, 192), (3, 32), (1, 100), (9, 33), (2, 255)])
def test_shapes_at_group_edges(scheme, dtype, m, k):
    """M = 1 and odd M; K = one group, a few groups, group edges of the kernel sizes, partial groups."""
    n = 72 if parse_scheme(scheme).axis == 1 else 70
    fn, ref, args, attrs = build(scheme, n, k, m + k)
    x = torch.randn(m, k).to(dtype)
    assert rel(fn(x, None), ref(x, None)) < FAST_PATH_TOL[dtype]
    assert_close_to_reference(fn(x, None), ref(x, None), x, args, attrs)


@pytest.mark.parametrize("scheme", ["uint4wo-32", "int8wo-32", "uint3wo-32", "uint2wo-4-axis0"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_large_m_path_matches_reference(scheme, dtype, monkeypatch):
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    fn, ref, _, _ = build(scheme, 48, 96)
    x = torch.randn(2, 9, 96).to(dtype)
    b = torch.randn(48).to(dtype)
    assert rel(fn(x, b), ref(x, b)) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("scheme", ["uint4wo-32", "int3wo-16", "uint2wo-4-axis0", "int6wo-64", "uint8wo-8-axis0",
                                    "uint1wo-3"])
@pytest.mark.parametrize("m", [1, 5, 70])
def test_tiled_path_is_the_reference_in_fp32(scheme, m):
    """Tile-order dequantization + batched GEMM, rows padded to 64 (N=40 -> 64; N=72 -> 128)."""
    n, k = fit(scheme, 72 if m == 5 else 40, 96)
    _, ref, args, attrs = build(scheme, n, k, m)
    x = torch.randn(m, k)
    y = op.tiled_dequant_linear(x, *args, attrs["bits"], attrs["group_size"], attrs["axis"], attrs["block_n"], n)
    assert y.shape == (m, int4.padded_rows(n)) and y.dtype == torch.float32
    assert rel(y[:, :n], ref(x, None)) < 1e-5


@pytest.mark.parametrize("scheme", ["uint4wo-32", "int3wo-16", "uint2wo-4-axis0", "uint8wo-8-axis0", "uint1wo-3"])
def test_rows_path_is_the_reference_in_fp32(scheme):
    n, k = fit(scheme, 72, 96)
    _, ref, args, attrs = build(scheme, n, k, 1)
    x = torch.randn(5, k)
    y = op.rows_dequant_linear(x, *args, attrs["bits"], attrs["group_size"], attrs["axis"], attrs["block_n"], n)
    assert y.shape == (5, n) and rel(y, ref(x, None)) < 1e-6


@pytest.mark.parametrize("scheme", ["uint3wo-32", "uint4wo-32-axis0"])
def test_large_m_uses_the_blocked_paths(scheme, fp32_dense):
    """Every M goes through the format's own CPU paths (cpu_fast_any_m); M=300 takes the row blocks."""
    n, k = fit(scheme, 40, 64)
    fn, ref, _, _ = build(scheme, n, k, 2)
    x = torch.randn(300, k)
    assert rel(fn(x, None), ref(x, None)) < 1e-6


@pytest.mark.skipif(NATIVE is None, reason="no int4 CPU kernel layout on this CPU")
@pytest.mark.parametrize("cfg", [(b, s) for b in range(1, 9) for s in (False, True) if not (s and b == 1)])
def test_int4_kernel_path_every_width(cfg):
    """Every width through the int4 kernel, several pieces of rows; zeros' rounding added back."""
    bits, symmetric = cfg
    w = torch.randn(200, 128, generator=torch.Generator().manual_seed(bits)) + (0 if symmetric else 3.0)
    qw = IntX(bits=bits, group_size=32, symmetric=symmetric).quantize(w)
    x = torch.randn(3, 128) + 1.0  # non-zero group sums: the zeros matter
    y = op.int4_kernel_linear(x, *qw.tensors.values(), bits, 32, NATIVE, 200, piece_bytes=64 * 64)
    r = op.reference(x, *qw.tensors.values(), None, **qw.attrs)
    assert y.shape == (3, 256) and rel(y[:, :200], r) < 4e-3  # bf16 activations and outputs: ~2^-9


@pytest.mark.skipif(NATIVE is None, reason="no int4 CPU kernel layout on this CPU")
def test_uint4_axis1_equals_int4wo_op():
    """uint4wo-g stores int4wo-g's codes and params: on the fast path the same kernel, bit for bit."""
    w = torch.randn(72, 256, generator=torch.Generator().manual_seed(3))
    qa, qb = IntX(bits=4, group_size=64).quantize(w), Int4WeightOnly(group_size=64).quantize(w)
    assert qa.nbytes < qb.nbytes  # int4wo pads params to 128 rows and stores them as [K/g, Np, 2]
    assert op.int4_kernel_applies(4, 64, 1, qa.attrs["block_n"])
    x = torch.randn(5, 256)
    ya = torch.ops.fxquant.linear_intx(x, *qa.tensors.values(), None, **qa.attrs)
    yb = torch.ops.fxquant.linear_int4wo(x, *qb.tensors.values(), None, **qb.attrs)
    assert torch.equal(ya, yb)


@pytest.mark.skipif(NATIVE is None, reason="no int4 CPU kernel layout on this CPU")
def test_foreign_block_n_uses_dequant_path(monkeypatch, fp32_dense):
    """Between the native GEMV's rows and the int4 kernel's limit, bf16 activations (the int4
    kernel's bf16 output allowed) of weights packed for another tile height take the dequantize path
    with a warning; fp32 ones never take the int4 kernel (compute_dtype policy), so no warning."""
    monkeypatch.setattr(op, "_warned_layout", False)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    stored = fmt.to_storage(w, 2, 32, False, 1, 64 if NATIVE != 64 else 32)
    attrs = dict(bits=2, group_size=32, symmetric=False, axis=1, block_n=64 if NATIVE != 64 else 32, out_features=40,
                 in_features=64)
    x = torch.randn(op.NATIVE_MAX_ROWS + 1, 64)  # above the native GEMV, which reads any tile height
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.ops.fxquant.linear_intx(x, *stored.values(), None, **attrs)
    assert rel(y, op.reference(x, *stored.values(), None, **attrs)) < 1e-5
    xb = x.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="block_n"):
        y = torch.ops.fxquant.linear_intx(xb, *stored.values(), None, **attrs)
    assert rel(y, op.reference(xb, *stored.values(), None, **attrs)) < 2**-8


@pytest.mark.parametrize("scheme,dtype,with_bias", [
    ("uint4wo-32", torch.float32, True), ("int8wo-32", torch.bfloat16, False),
    ("int3wo-16", torch.float32, False), ("uint2wo-8-axis0", torch.bfloat16, True)])
def test_opcheck(scheme, dtype, with_bias):
    _, _, args, attrs = build(scheme, 24, 64)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_intx.default, (x, *args, b), attrs)


@pytest.mark.parametrize("scheme", ["uint4wo-32", "int3wo-16-axis0"])
def test_backward_is_gradient_of_dequantized_linear(scheme):
    fn, _, args, attrs = build(scheme, 16, 64, 5)
    w = op.dequantize_weight(*args, **attrs)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    fn(x, b).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


@pytest.mark.parametrize("scheme", ["uint4wo-32", "int8wo-32", "uint3wo-32"])
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(scheme, cd):
    fn, ref, _, _ = build(scheme, 24, 64, 7)
    x = torch.randn(3, 64)
    y = fn(x, None, compute_dtype=cd)
    assert rel(y, ref(x, None, compute_dtype=cd)) < (1e-6 if cd == torch.float32 else 1e-2)
    assert rel(y, ref(x, None)) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[cd]


def test_symmetric_flag_must_match_offset():
    _, _, (lo, hi, s, o), attrs = build("uint3wo-32", 8, 64)
    with pytest.raises(ValueError, match="symmetric=True but offset has 16 elements"):
        op.dequantize_weight(lo, hi, s, o, **{**attrs, "symmetric": True})


# ---- the scheme ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("uint4wo-64", IntX(bits=4, group_size=64)),
    ("int3wo-128", IntX(bits=3, group_size=128, symmetric=True)),
    ("uint2wo-32-axis0", IntX(bits=2, group_size=32, axis=0)),
    ("int8wo-128", IntX(bits=8, group_size=128, symmetric=True)),
    ("uint1wo-64", IntX(bits=1, group_size=64)),
    ("int4wo-128-axis1", IntX(bits=4, group_size=128, symmetric=True)),
    ("int4wo-64-axis0", IntX(bits=4, group_size=64, symmetric=True, axis=0)),
    ("int4wo-128-sym", IntX(bits=4, group_size=128, symmetric=True)),
    ("int4wo-32-asym", IntX(bits=4, group_size=32, symmetric=False)),
    ("int3wo-16-asym-axis0", IntX(bits=3, group_size=16, axis=0)),
    ("int4wo-64-sym-axis0", IntX(bits=4, group_size=64, symmetric=True, axis=0)),
    ("uint8wo-7-axis1", IntX(bits=8, group_size=7)),
    ("int8wo", Int8WeightOnly()), ("int4wo-64", Int4WeightOnly(group_size=64)), ("int4wo", Int4WeightOnly()),
])
def test_parse_and_round_trip(text, expected):
    s = parse_scheme(text)
    assert s == expected and type(s) is type(expected)
    assert parse_scheme(str(s)) == s and scheme_from_json(scheme_to_json(s)) == s


def test_names_say_symmetry():
    """``int4wo-<g>`` is the asymmetric tiled format; every symmetric IntX string says so."""
    assert str(IntX(bits=4, group_size=128, symmetric=True)) == "int4wo-128-sym"
    assert type(parse_scheme("int4wo-128")) is Int4WeightOnly
    assert scheme_to_json(parse_scheme("int4wo-128-axis1")) == scheme_to_json(parse_scheme("int4wo-128-sym"))
    with pytest.raises(ValueError, match="uint"):
        parse_scheme("uint4wo-128-sym")


@given(bits=st.integers(1, 8), group=st.integers(1, 512), symmetric=st.booleans(), axis=st.sampled_from([0, 1]))
def test_every_scheme_round_trips_through_its_string(bits, group, symmetric, axis):
    if symmetric and bits == 1:
        return
    s = IntX(bits=bits, group_size=group, symmetric=symmetric, axis=axis)
    assert parse_scheme(str(s)) == s


def test_compute_dtype_round_trips_through_spec():
    spec = fxquant.Spec(default=IntX(bits=3, group_size=64, compute_dtype=torch.bfloat16),
                        rules={"re:.*q_proj": "uint2wo-32-axis0", "x": IntX(bits=4, symmetric=True)})
    assert fxquant.Spec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=9), r"IntX.bits=9 is not supported; valid: 1..8"),
    (dict(bits=0), r"IntX.bits=0"),
    (dict(bits=True), r"IntX.bits=True"),
    (dict(group_size=0), r"IntX.group_size=0 is not supported; valid: an integer >= 1"),
    (dict(axis=2), r"IntX.axis=2 is not supported; valid: 0, 1"),
    (dict(symmetric="yes"), r"IntX.symmetric='yes'"),
    (dict(bits=1, symmetric=True), r"symmetric 1-bit code has only the levels"),
    (dict(compute_dtype=torch.int8), r"IntX.compute_dtype=torch.int8"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IntX(**kwargs)


def test_bad_strings_name_the_field():
    with pytest.raises(ValueError, match=r"'uint9wo-64': IntX.bits=9"):
        parse_scheme("uint9wo-64")
    with pytest.raises(ValueError, match=r"'int1wo-64': IntX.bits=1 with symmetric=True"):
        parse_scheme("int1wo-64")


def test_every_shape_is_supported():
    """Partial groups are padded, so no layer is left in float for its shape (only for no elements)."""
    for scheme, shape in ((IntX(group_size=64), (10, 96)), (IntX(group_size=5, axis=0), (12, 7)),
                          (IntX(group_size=128), (3, 1))):
        assert scheme.unsupported_reason(torch.randn(shape)) is None
    assert "no elements" in IntX(group_size=64).unsupported_reason(torch.randn(10, 0))


def test_report_bytes_are_exact():
    """Exact stored bytes, padding included: K = 250 stores 256 columns at g64, N = 100 at g4 axis 0
    stores 25 param rows."""
    for w in (torch.randn(100, 256), torch.randn(100, 250), torch.randn(98, 250)):
        for text in ["uint3wo-64", "int8wo-32", "uint2wo-4-axis0", "uint5wo-48-axis0"]:
            s = parse_scheme(text)
            qw = s.quantize(w)
            assert qw.nbytes == fmt.nbytes(*w.shape, s.bits, s.group_size, s.symmetric, s.axis)
    assert fmt.nbytes(100, 250, 3, 64, False) == 128 * 256 * 3 // 8 + 4 * 100 * 4
    assert fmt.nbytes(98, 250, 2, 4, False, axis=0) == 128 * 250 * 2 // 8 + 25 * 250 * 4


# ---- end to end --------------------------------------------------------------------------------------------
class Mixed(torch.nn.Module):
    """Five linears, one per scheme of MIXED."""

    def __init__(self):
        super().__init__()
        dims = [64, 128, 96, 128, 64, 32]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.silu(layer(x))
        return x


MIXED = fxquant.Spec(default="uint4wo-32", rules={"layers.0": "int3wo-32", "layers.1": "uint2wo-32-axis0",
                                                   "layers.2": "int8wo-32", "layers.3": "int4wo-64"})


def test_mixed_formats_compile_fullgraph():
    torch._dynamo.reset()
    m = Mixed().eval()
    qm = fxquant.compile(m, MIXED, (torch.randn(2, 5, 64),))
    rep = fxquant.report(qm)
    assert [r.scheme for r in rep.rows] == ["int3wo-32", "uint2wo-32-axis0", "int8wo-32", "int4wo-64", "uint4wo-32"]
    assert all(r.status == "quantized" and r.bytes_after < r.bytes_before / 3 for r in rep.rows)
    cm = torch.compile(qm, fullgraph=True)
    for shape in [(2, 5, 64), (3, 7, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(cm(x), qm(x), rtol=1e-4, atol=1e-5)
        assert rel(qm(x), m(x)) < 0.5  # 2- and 3-bit layers: a sanity bound
