"""linear_aqlm and the AQLM scheme: the dequantization against the published AQLM formula re-implemented
here (and the aqlm library's own ``_dequantize_weight`` / ``dequantize_gemm`` when it is installed), the
CPU paths (table GEMV, blocked decode + GEMM, both native instruction sets and the torch fallback) against
the reference, opcheck, autograd, compile, parsing, byte counts."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.library import opcheck

import fxquant
from fxquant.formats import aqlm as fmt
from fxquant.kernels import native_aqlm, native_build, native_cpu
from fxquant.ops import aqlm as op
from fxquant.schemes import AQLM, parse_scheme, scheme_from_json, scheme_to_json
from helpers import assert_linear_close, policy_x, rel

# (num_codebooks, nbits, in_group, out_group): the published setups (1x16-g8, 2x8-g8, 1x8-g8), small codebooks,
# out groups > 1, 9..15-bit codes in int16
LAYOUTS = [(1, 16, 8, 1), (2, 8, 8, 1), (1, 8, 4, 1), (1, 8, 8, 2), (3, 4, 4, 1), (1, 12, 8, 1), (2, 5, 6, 3),
           (1, 1, 2, 1)]


def published_dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, n: int,
                         k: int) -> torch.Tensor:
    """The AQLM paper's / aqlm library's reconstruction, re-implemented plainly in float64: code ``v`` of a
    ``B``-bit codebook stored as a signed integer reads back as ``stored mod 2**B``; block ``(o, j)`` is
    ``scales[o] * sum_c codebooks[c, code[o, j, c]]`` (``[og, ig]``), blocks laid out row-major."""
    nc, e, og, ig = codebooks.shape
    o, g, _ = codes.shape
    unsigned = codes.to(torch.int64) % e
    w = torch.zeros(o * og, g * ig, dtype=torch.float64)
    for oo in range(o):
        for j in range(g):
            block = sum(codebooks[c, unsigned[oo, j, c]].double() for c in range(nc))
            w[oo * og:(oo + 1) * og, j * ig:(j + 1) * ig] = block * scales[oo, 0, 0, 0].double()
    return w[:n, :k]


def random_layer(n, k, nc, nbits, ig, og, seed=0, dtype=torch.float16):
    """Stored tensors of random codes (signed storage, as aqlm writes) and codebooks."""
    g = torch.Generator().manual_seed(seed)
    o, gg = fmt.padded(n, k, og, ig)
    u = torch.randint(0, 1 << nbits, (o, gg, nc), generator=g)
    codes = fmt.to_stored(u, nbits)
    cb = (torch.randn(nc, 1 << nbits, og, ig, generator=g) / nc).to(dtype)
    sc = (torch.rand(o, 1, 1, 1, generator=g) * 0.1 + 0.01).to(dtype)
    attrs = dict(num_codebooks=nc, nbits_per_codebook=nbits, in_group_size=ig, out_group_size=og, out_features=n,
                 in_features=k)
    return (codes, cb, sc), attrs


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("n,k", [(16, 32), (7, 13), (1, 1)])
def test_dequantization_is_the_published_formula(layout, n, k):
    nc, nbits, ig, og = layout
    args, attrs = random_layer(n, k, nc, nbits, ig, og, n + k)
    got = op.dequantize_weight(*args, **attrs)
    want = published_dequantize(*args, n, k)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    # fp32 sums of at most 3 fp16 codewords times an fp16 scale: within 2 fp32 roundings of the exact value
    assert torch.allclose(got.double(), want, rtol=3e-7, atol=1e-12)
    if nc == 1:
        assert torch.equal(got, want.float())  # one codeword times a scale: exact in fp32


def test_signed_storage_is_the_aqlm_convention():
    """Codes ``>= 2**(B-1)`` are stored minus ``2**B`` (aqlm.utils.pack_int_data) and read back by their low bits."""
    for nbits in (1, 4, 8, 9, 16):
        u = torch.arange(1 << nbits) if nbits <= 12 else torch.randint(0, 1 << nbits, (5000,))
        s = fmt.to_stored(u, nbits)
        assert s.dtype == (torch.int8 if nbits <= 8 else torch.int16)
        assert torch.equal(s.to(torch.int64), torch.where(u >= 1 << (nbits - 1), u - (1 << nbits), u))
        assert torch.equal(fmt.unsigned(s, nbits), u)


def test_the_aqlm_library_reads_the_same_weight_and_output():
    """aqlm's own reconstruction (fp32 codebooks: equal; fp16 with one codebook: our value rounded once to
    fp16) and its dequantize-then-matmul kernel on the same stored tensors."""
    utils = pytest.importorskip("aqlm.utils", reason="the aqlm package is not installed: pip install aqlm")
    from aqlm.inference_kernels.dequantization import dequantize_gemm

    for nc, nbits, ig, og in [(1, 16, 8, 1), (2, 8, 8, 1), (1, 8, 4, 2), (3, 6, 4, 1)]:
        n, k = 24 * og, 12 * ig
        (codes, cb, sc), attrs = random_layer(n, k, nc, nbits, ig, og, nbits)
        assert torch.equal(utils.pack_int_data(fmt.unsigned(codes, nbits), nbits), codes)
        ours = op.dequantize_weight(codes, cb, sc, **attrs)
        theirs = utils._dequantize_weight(utils.unpack_int_data(codes, nbits), cb.float(), sc.float())
        assert torch.equal(ours, theirs)
        if nc == 1:
            assert torch.equal(ours.half(), utils._dequantize_weight(utils.unpack_int_data(codes, nbits), cb, sc))
        x, b = torch.randn(3, k), torch.randn(n)
        y = dequantize_gemm(x, codes, cb.float(), sc.float(), b)
        assert rel(op.reference(x, codes, cb, sc, b, **attrs), y) < 1e-6


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@given(m=st.integers(1, 40), n=st.integers(1, 48), k=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), with_bias=st.booleans(),
       lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 999))
def test_op_matches_reference(layout, m, n, k, dtype, with_bias, lead, seed):
    """Any N, K (padded groups), small M (the table) and large M (blocked decode): the CPU path is the
    reference on the values the compute_dtype policy computes on."""
    nc, nbits, ig, og = layout
    args, attrs = random_layer(n, k, nc, nbits, ig, og, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = torch.ops.fxquant.linear_aqlm(x, *args, b, **attrs)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    r = op.reference(policy_x(x), *args, b, **attrs)
    w = op.dequantize_weight(*args, **attrs)
    assert_linear_close(y, r, x, w, 2**-7 if dtype != torch.float32 else 1e-5, b)


@pytest.mark.parametrize("m", [1, 3, op.LUT_MAX_ROWS, op.LUT_MAX_ROWS + 1, 70])
@pytest.mark.parametrize("layout", [(2, 8, 8, 1), (1, 8, 4, 1), (1, 16, 8, 1), (2, 6, 4, 2)], ids=str)
def test_fp32_paths_are_the_reference_in_fp32(layout, m, fp32_dense):
    """Without bf16 rounding of x every path (table, blocked decode) is the fp32 reference up to fp32 sums."""
    nc, nbits, ig, og = layout
    args, attrs = random_layer(290, 100, nc, nbits, ig, og, m)
    x = torch.randn(m, 100)
    assert rel(torch.ops.fxquant.linear_aqlm(x, *args, None, **attrs), op.reference(x, *args, None, **attrs)) < 1e-6


@pytest.mark.parametrize("isa", ["avx512", "avx2", "torch"])
@pytest.mark.parametrize("layout", [(2, 8, 8, 1), (1, 8, 4, 1), (3, 4, 4, 1), (1, 8, 8, 2), (2, 5, 6, 3),
                                    (1, 12, 8, 1)], ids=str)
def test_native_kernels_and_torch_fallback(isa, layout, monkeypatch):
    """The table GEMV and the row decoder of each instruction set, and the torch paths without the library:
    the reference's weight bit for bit (decoder, fp32 and bf16), its product up to fp32 sums (table)."""
    if isa != "torch" and isa not in native_cpu.isas():
        pytest.skip(f"native {isa} kernels do not run here ({native_cpu.status()})")
    monkeypatch.setattr(native_build, "_lib", lambda: None if isa == "torch" else native_cpu.kernels(isa))
    nc, nbits, ig, og = layout
    n, k = 61, 90
    args, attrs = random_layer(n, k, nc, nbits, ig, og, 5)
    o, g = fmt.padded(n, k, og, ig)
    w = fmt.dequantize(*args, nbits, o * og, g * ig)
    for m in (1, 5, 9):
        x = torch.randn(m, g * ig)
        got = native_aqlm.lut_gemv(x, *args, out_features=n) if isa != "torch" else \
            op.lut_linear(x, *args, nbits, n)
        assert rel(got, x @ w[:n].T) < 1e-6
        if isa != "torch":  # round_x: x rounded to bf16 in the kernel
            rounded = native_aqlm.lut_gemv(x, *args, out_features=n, round_x=True)
            assert rel(rounded, x.bfloat16().float() @ w[:n].T) < 1e-6
    decode = native_aqlm.decoder(*args)
    assert (decode is None) == (isa == "torch")
    if decode is not None:
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(o * og, g * ig, dtype=dtype)
            assert decode(0, o, out) and torch.equal(out, w.to(dtype))
            part = torch.empty(2 * og, g * ig, dtype=dtype)
            assert decode(1, 3, part) and torch.equal(part, w[og:3 * og].to(dtype))
        assert not decode(0, o, torch.empty(o * og, g * ig, dtype=torch.float16))  # the caller decodes fp16 itself
    x = torch.randn(20, k)
    y = torch.ops.fxquant.linear_aqlm(x, *args, None, **attrs, compute_dtype=torch.float32)
    assert rel(y, op.reference(x, *args, None, **attrs)) < 1e-6


def test_native_wrappers_refuse_a_foreign_layout():
    if not native_cpu.available():
        pytest.skip(native_cpu.status())
    (codes, cb, sc), _ = random_layer(8, 16, 2, 8, 8, 1)
    with pytest.raises(ValueError, match="aqlm_lut_gemv: x has 15 columns, the stored groups take 16"):
        native_aqlm.lut_gemv(torch.randn(1, 15), codes, cb, sc, out_features=8)
    with pytest.raises(ValueError, match="not one AQLM layout"):
        native_aqlm.lut_gemv(torch.randn(1, 16), codes.to(torch.int16), cb, sc, out_features=8)


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 30])
def test_compute_dtype_is_honoured(cd, m):
    args, attrs = random_layer(40, 64, 2, 8, 8, 1)
    x = torch.randn(m, 64)
    y = torch.ops.fxquant.linear_aqlm(x, *args, None, **attrs, compute_dtype=cd)
    r = op.reference(x, *args, None, **attrs, compute_dtype=cd)
    assert y.dtype == torch.float32 and rel(y, r) < (1e-6 if cd == torch.float32 else 1e-2)


@pytest.mark.parametrize("layout,dtype,with_bias", [((2, 8, 8, 1), torch.float32, True),
                                                    ((1, 16, 8, 1), torch.bfloat16, False),
                                                    ((1, 4, 4, 2), torch.float32, False)])
def test_opcheck(layout, dtype, with_bias):
    nc, nbits, ig, og = layout
    args, attrs = random_layer(24, 64, nc, nbits, ig, og)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_aqlm.default, (x, *args, b), attrs)


def test_backward_is_gradient_of_dequantized_linear():
    args, attrs = random_layer(16, 64, 2, 8, 8, 1, 5)
    w = op.dequantize_weight(*args, **attrs)
    x, b = torch.randn(3, 64, requires_grad=True), torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    torch.ops.fxquant.linear_aqlm(x, *args, b, **attrs).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4) and torch.allclose(b.grad, gy.sum(0))


def test_op_check_names_the_tensor():
    (codes, cb, sc), attrs = random_layer(8, 64, 2, 8, 8, 1)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"codes must be torch.int8 of shape \(8, 8, 2\)"):
        torch.ops.fxquant.linear_aqlm(x, codes.to(torch.int16), cb, sc, None, **attrs)
    with pytest.raises(ValueError, match=r"codebooks must be one of .* \[num_codebooks, 2\*\*nbits_per_codebook"):
        torch.ops.fxquant.linear_aqlm(x, codes, cb[:, :128], sc, None, **attrs)
    with pytest.raises(ValueError, match=r"scales must be one of .*\(8, 1, 1, 1\)"):
        torch.ops.fxquant.linear_aqlm(x, codes, cb, sc.view(8), None, **attrs)
    with pytest.raises(ValueError, match="x has 63 input features"):
        torch.ops.fxquant.linear_aqlm(x[:, :63], codes, cb, sc, None, **attrs)
    with pytest.raises(ValueError, match=r"nbits_per_codebook=17 is not supported; valid: 1..16"):
        torch.ops.fxquant.linear_aqlm(x, codes, cb, sc, None, **{**attrs, "nbits_per_codebook": 17})


# ---- the scheme ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("aqlm-1x16-g8", AQLM()), ("aqlm-2x8-g8", AQLM(num_codebooks=2, nbits_per_codebook=8)),
    ("aqlm-1x8-g4-fp16", AQLM(nbits_per_codebook=8, in_group_size=4)),
    ("AQLM-1x16-G8-o2-BF16", AQLM(out_group_size=2, param_dtype=torch.bfloat16)),
    ("aqlm-4x4-g16-o1-fp32", AQLM(num_codebooks=4, nbits_per_codebook=4, in_group_size=16, param_dtype=torch.float32))])
def test_parse(text, expected):
    assert parse_scheme(text) == expected


@pytest.mark.parametrize("nbits", [1, 8, 16])
@pytest.mark.parametrize("og", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_scheme_round_trips(nbits, og, dtype):
    s = AQLM(num_codebooks=2, nbits_per_codebook=nbits, in_group_size=8, out_group_size=og, param_dtype=dtype)
    assert parse_scheme(str(s)) == s and scheme_from_json(scheme_to_json(s)) == s
    s2 = parse_scheme(f"{s}@aqlm")
    assert s2.method is not None and parse_scheme(str(s2)) == s2


@pytest.mark.parametrize("kwargs,match", [
    ({"num_codebooks": 0}, r"AQLM.num_codebooks=0 .*valid: an integer >= 1"),
    ({"nbits_per_codebook": 17}, r"nbits_per_codebook=17 .*valid: 1..16"),
    ({"in_group_size": 2.0}, "in_group_size=2.0"), ({"out_group_size": True}, "out_group_size=True"),
    ({"param_dtype": torch.float64}, r"param_dtype=torch.float64 .*valid: torch.float16")])
def test_bad_fields_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AQLM(**kwargs)


def test_bad_strings_name_the_scheme():
    with pytest.raises(ValueError, match=r"aqlm-1x17-g8.*nbits_per_codebook=17"):
        parse_scheme("aqlm-1x17-g8")
    with pytest.raises(ValueError, match="unknown scheme 'aqlm-1-g8'"):
        parse_scheme("aqlm-1-g8")
    with pytest.raises(ValueError, match="the AQLM method fits codes and codebooks of the aqlm format"):
        parse_scheme("int4wo-64@aqlm")


@pytest.mark.parametrize("text,n,k", [("aqlm-2x8-g8", 96, 64), ("aqlm-1x16-g8", 40, 30),
                                      ("aqlm-1x4-g4-o2-fp32", 9, 10)])
def test_quantize_packs_the_layout_and_counts_every_byte(text, n, k):
    s = parse_scheme(text)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    qw = s.quantize(w)
    o, g = fmt.padded(n, k, s.out_group_size, s.in_group_size)
    t = qw.tensors
    assert t["codes"].shape == (o, g, s.num_codebooks) and t["codes"].dtype == fmt.code_dtype(s.nbits_per_codebook)
    assert t["codebooks"].shape == (s.num_codebooks, 1 << s.nbits_per_codebook, s.out_group_size, s.in_group_size)
    assert t["scales"].shape == (o, 1, 1, 1) and t["codebooks"].dtype == t["scales"].dtype == s.param_dtype
    assert qw.nbytes == s.nbytes(n, k) == sum(v.numel() * v.element_size() for v in t.values())
    assert torch.allclose(s.dequantize(qw).double(), published_dequantize(*t.values(), n, k), rtol=3e-7, atol=1e-12)
    assert s.unsupported_reason(w) is None
    assert "non-finite" in s.unsupported_reason(torch.full((2, 8), float("nan")))


def test_module_compiles_fullgraph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40, bias=False))
    fxquant.quantize_(m, fxquant.Spec(default="aqlm-2x8-g8", rules={"2": "aqlm-1x6-g4"}), (torch.randn(2, 64),))
    assert str(m[0].scheme) == "aqlm-2x8-g8" and m[2].op_name == "linear_aqlm"
    x = torch.randn(3, 64)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True)(x)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert fxquant.report(m).row("2").scheme == "aqlm-1x6-g4"
    w0 = parse_scheme("aqlm-2x8-g8").dequantize(m[0].packed())
    assert rel(m[0](x), F.linear(policy_x(x), w0, m[0].bias)) < 1e-5


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_a_failed_allocation_raises_and_computes_nothing(isa, monkeypatch):
    """The fault-injection build (``native_cpu.fault_injection_kernels``): each allocation of the table GEMV
    (rounded x, table, sums) and of the row decoder (its scratch for uncommon block sizes) fails once in turn;
    the op raises MemoryError naming the kernel, or completes only when the armed request was never reached."""
    if isa not in native_cpu.isas():
        pytest.skip(f"native {isa} kernels do not run here ({native_cpu.status()})")
    lib = native_cpu.fault_injection_kernels(isa)
    monkeypatch.setattr(native_build, "_lib", lambda: lib)
    try:
        for layout, n, m, kernel in (((2, 8, 8, 1), 300, 2, "fxq_aqlm_lut_gemv"),
                                     ((1, 5, 6, 1), 40, 9, "fxq_aqlm_decode")):
            args, attrs = random_layer(n, 48, *layout)
            x = torch.randn(m, 48)
            failures = 0
            for nth in range(1, 16):
                lib.fail_alloc(nth)
                try:
                    y = torch.ops.fxquant.linear_aqlm(x, *args, None, **attrs)
                except MemoryError as e:
                    assert kernel.replace("fxq_", "") in str(e) and "nothing was computed" in str(e), str(e)
                    assert lib.fail_alloc_pending() == 0
                    failures += 1
                    continue
                assert lib.fail_alloc_pending() > 0
                assert rel(y, op.reference(policy_x(x), *args, None, **attrs)) < 1e-5
                break
            assert failures >= 1, kernel
    finally:
        lib.fail_alloc(0)
