"""linear_vptq op and the VPTQ scheme: the stored layout against a plain re-implementation of the VPTQ
library's packing and dequantization (vptq/utils/pack.py ``pack_index``, vptq/ops/quant_gemm.py ``dequant``,
written here with Python integers and explicit loops), every CPU path against the reference, opcheck,
autograd, torch.compile, parsing and argument errors."""
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import fxquant
from fxquant.formats import vptq as fmt
from fxquant.kernels import native_build, native_cpu, native_vptq
from fxquant.ops import vptq as op
from fxquant.schemes import VPTQ, parse_scheme, scheme_from_json, scheme_to_json
from helpers import assert_linear_close, policy_x, rel

SCHEMES = ["vptq-v8-c16", "vptq-v4-c8-r4", "vptq-v3-c16-r8-o6-ov2-oc4-g3-norm-perm", "vptq-v8-c32-r16-norm",
           "vptq-v5-c4-o3-perm-fp16", "vptq-v2-c8-r2-fp32", "vptq-v16-c4-g2"]


# ---- the published layout, re-implemented plainly ----------------------------------------------------------
def published_pack(merged: list[int], bits: int) -> list[int]:
    """VPTQ's ``pack_index`` for one row: bit t of element c is bit c*bits + t of the stream; each 32 bits summed
    as ``bit << position`` into a uint32, viewed as int32."""
    stream = []
    for value in merged:
        stream += [(value >> t) & 1 for t in range(bits)]
    stream += [0] * ((32 - len(stream) % 32) % 32)
    words = []
    for w in range(len(stream) // 32):
        u = sum(stream[w * 32 + i] << i for i in range(32))
        words.append(u - (1 << 32) if u >= 1 << 31 else u)
    return words


def published_unpack(row: list[int], bits: int, count: int) -> list[int]:
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(row))
    return [(stream >> (c * bits)) & ((1 << bits) - 1) for c in range(count)]


def published_dequant(t: dict, lay: fmt.Layout, dtype=torch.float32) -> torch.Tensor:
    """VPTQ's ``dequant`` (vector_quant_dim="out") in ``dtype``: codebook vectors along the output rows, residual
    added, padding rows dropped, outlier columns first, columns put back by ``argsort(perm)``, then
    ``* weight_scale + weight_bias``; loops over the indices, no fxquant code."""
    n, k, v, g_num = lay.out_features, lay.in_features, lay.vector_len, lay.group_num
    o, vo = lay.outlier_size, lay.outlier_vector_len
    gs = (k - o) // g_num
    ib = int(math.log2(lay.num_centroids))
    rb = int(math.log2(lay.num_res_centroids)) if lay.num_res_centroids else 0
    rows = -(-n // v)
    cent = t["centroids"].to(dtype).reshape(g_num, -1, v)
    res = t["res_centroids"].to(dtype).reshape(g_num, -1, v) if rb else None
    main = torch.zeros(rows * v, g_num * gs, dtype=dtype)
    for g in range(g_num):
        for r in range(rows):
            for c, m in enumerate(published_unpack(t["indices"][g, r].tolist(), ib + rb, gs)):
                vec = cent[g, m & ((1 << ib) - 1)]
                if res is not None:
                    vec = vec + res[g, m >> ib]
                main[r * v:(r + 1) * v, g * gs + c] = vec
    w = main[:n]
    if o:
        oc = t["outlier_centroids"].to(dtype).reshape(-1, vo)
        oi = t["outlier_indices"][0].tolist()
        out = torch.zeros(len(oi) * vo, o, dtype=dtype)
        for r, row in enumerate(oi):
            for c, e in enumerate(row):
                out[r * vo:(r + 1) * vo, c] = oc[e & 0xFFFF]
        w = torch.cat([out[:n], w], 1)
    if lay.enable_perm:
        perm = torch.tensor([p & 0xFFFF for p in t["perm"].tolist()])
        w = w[:, torch.argsort(perm)]
    if lay.enable_norm:
        w = w * t["weight_scale"].to(dtype) + t["weight_bias"].to(dtype)
    return w


def build(scheme: str, n: int, k: int, seed: int = 0):
    """Random indices and codebooks in the scheme's layout (no k-means: the op, not the quantizer, is tested)."""
    s = parse_scheme(scheme)
    lay = s.layout(n, k)
    g = torch.Generator().manual_seed(seed)
    dt = s.codebook_dtype
    idx = torch.randint(0, lay.num_centroids, (lay.group_num, lay.rows, lay.group_size), generator=g)
    res = torch.randint(0, lay.num_res_centroids, idx.shape, generator=g) if lay.num_res_centroids else None
    t = {"indices": fmt.pack_indices(fmt.merge(idx, res, lay.index_bits), lay.total_bits),
         "centroids": torch.randn(lay.group_num, lay.num_centroids * lay.vector_len, generator=g).to(dt)}
    if res is not None:
        t["res_centroids"] = (torch.randn(lay.group_num, lay.num_res_centroids * lay.vector_len, generator=g) / 4).to(dt)
    if lay.outlier_size:
        oi = torch.randint(0, lay.num_outlier_centroids, (1, lay.outlier_rows, lay.outlier_size), generator=g)
        t["outlier_indices"] = fmt.to_uint16_bits(oi)
        t["outlier_centroids"] = (3 * torch.randn(1, lay.num_outlier_centroids * lay.outlier_vector_len,
                                                  generator=g)).to(dt)
    if lay.enable_perm:
        t["perm"] = fmt.to_uint16_bits(torch.randperm(k, generator=g))
    if lay.enable_norm:
        t["weight_scale"] = (torch.rand(k, generator=g) + 0.5).to(dt)
        t["weight_bias"] = (torch.randn(k, generator=g) / 10).to(dt)
    qw = s.packed(t, n, k)
    return s, qw, tuple(qw.tensors.values()), qw.attrs


# ---- layout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 3, 8, 12, 16, 17, 24, 31, 32])
@pytest.mark.parametrize("count", [1, 5, 32, 33, 100])
def test_packing_is_vptq_pack_index(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 1 << min(bits, 62), (3, count), generator=g, dtype=torch.int64) & ((1 << bits) - 1)
    packed = fmt.pack_indices(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-count * bits // 32))
    for r in range(3):
        assert packed[r].tolist() == published_pack(codes[r].tolist(), bits)
    assert torch.equal(fmt.unpack_indices(packed, bits, count), codes)


def test_merged_index_splits_as_vptq_does():
    idx, res = torch.tensor([[5, 0, 255]]), torch.tensor([[3, 1, 0]])
    merged = fmt.merge(idx, res, 8)
    assert merged.tolist() == [[(3 << 8) | 5, 1 << 8, 255]]
    packed = fmt.pack_indices(merged, 8 + 2)
    assert published_unpack(packed[0].tolist(), 10, 3) == merged[0].tolist()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n,k", [(1, 12), (13, 24), (40, 36)])
def test_dequantization_is_the_published_one(scheme, n, k):
    s = parse_scheme(scheme)
    if s._layout_problem(n, k):
        pytest.skip(s._layout_problem(n, k))
    _, qw, args, attrs = build(scheme, n, k, n + k)
    got = op.dequantize_weight(*args, **attrs)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert torch.equal(got, published_dequant(qw.tensors, op.layout_of(attrs)))


def test_vptq_own_half_precision_dequant_within_its_rounding():
    """VPTQ's torch path adds, scales and shifts in the codebook dtype (fp16): our fp32 weight rounded to fp16 is
    within two fp16 steps of it, and equal without residual and norm (a gather is exact)."""
    s, qw, args, attrs = build("vptq-v4-c16-r8-norm-perm-fp16", 24, 32)
    lay = op.layout_of(attrs)
    ours = op.dequantize_weight(*args, **attrs)
    theirs = published_dequant(qw.tensors, lay, torch.float16).float()
    unscaled = published_dequant(qw.tensors, dataclasses.replace(lay, enable_norm=False))
    # three fp16 roundings (sum, product, sum) and ours rounded once: each at most half a step of its value
    step = torch.finfo(torch.float16).eps
    bound = step * (unscaled.abs() * qw.tensors["weight_scale"].float() * 1.5 + ours.abs() * 1.5) + 2 ** -24
    assert ((ours.half().float() - theirs).abs() <= bound).all()
    _, qw, args, attrs = build("vptq-v4-c16-o3-perm-fp16", 24, 32)
    assert torch.equal(op.dequantize_weight(*args, **attrs).half().float(),
                       published_dequant(qw.tensors, op.layout_of(attrs), torch.float16).float())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nbytes_counts_every_stored_tensor(scheme):
    s, qw, _, attrs = build(scheme, 40, 36)
    lay = op.layout_of(attrs)
    assert qw.nbytes == fmt.nbytes(lay, s.codebook_dtype)
    assert qw.nbytes == sum(t.numel() * t.element_size() for t in qw.tensors.values())


# ---- the op's paths ----------------------------------------------------------------------------------------
def _paths(monkeypatch, path):
    """Force one CPU path: "native" (GEMV / native decoder), "table" (centroid table), "torch" (blocked torch
    decode at every M)."""
    if path == "native" and not native_vptq.available():
        pytest.skip("native kernels unavailable")
    if path != "native":
        monkeypatch.setattr(native_vptq, "gemv", lambda *a, **k: None)
        monkeypatch.setattr(native_vptq, "decoder", lambda *a, **k: None)
        monkeypatch.setattr(native_vptq, "available", lambda: False)
    if path == "torch":
        monkeypatch.setattr(op, "LUT_MAX_ELEMENTS", 0)
    if path == "table":
        monkeypatch.setattr(op, "LUT_MAX_ELEMENTS", 1 << 30)
        monkeypatch.setattr(op, "LUT_MAX_CENTROIDS", 1 << 16)


@pytest.mark.parametrize("path", ["native", "table", "torch"])
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.sampled_from([1, 2, 5, 9, 40]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       with_bias=st.booleans(), lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 99))
def test_op_matches_reference(monkeypatch, path, scheme, m, dtype, with_bias, lead, seed):
    """Every path computes the reference on the values the compute_dtype policy computes on."""
    with monkeypatch.context() as mp:
        _paths(mp, path)
        _, _, args, attrs = build(scheme, 24, 36, seed)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(*lead, m, 36, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype) if with_bias else None
        y = torch.ops.fxquant.linear_vptq(x, *args, b, **attrs)
        assert y.shape == (*lead, m, 24) and y.dtype == dtype
        r = op.reference(policy_x(x), *args, b, **attrs)
        w = op.dequantize_weight(*args, **attrs)
        assert_linear_close(y, r, x, w, 2 ** -7 if dtype != torch.float32 else 1e-5, b)


@pytest.mark.parametrize("path", ["native", "table", "torch"])
def test_fp32_paths_are_the_reference_in_fp32(monkeypatch, fp32_dense, path):
    _paths(monkeypatch, path)
    _, _, args, attrs = build("vptq-v4-c16-r8-o4-norm-perm", 200, 68)
    for m in (1, 7, 300):
        x = torch.randn(m, 68)
        assert rel(torch.ops.fxquant.linear_vptq(x, *args, None, **attrs), op.reference(x, *args, None, **attrs)) < 1e-6


def test_large_codebook_takes_no_table(monkeypatch):
    """65536 centroids: the table would be N/v x 65536 per row of x; the decode paths run instead."""
    _paths(monkeypatch, "table")
    monkeypatch.setattr(op, "LUT_MAX_CENTROIDS", 1024)
    _, _, args, attrs = build("vptq-v8-c65536", 16, 24)
    assert not op.table_applies(1, op.layout_of(attrs))
    x = torch.randn(3, 24)
    assert rel(torch.ops.fxquant.linear_vptq(x, *args, None, **attrs), op.reference(policy_x(x), *args, None, **attrs)) < 1e-5


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(cd):
    _, _, args, attrs = build("vptq-v4-c16-r8-norm-perm", 40, 64)
    x = torch.randn(5, 64)
    y = torch.ops.fxquant.linear_vptq(x, *args, None, **attrs, compute_dtype=cd)
    r = op.reference(x, *args, None, **attrs, compute_dtype=cd)
    assert y.dtype == torch.float32 and rel(y, r) < (1e-6 if cd == torch.float32 else 1e-2)


@pytest.mark.parametrize("scheme,dtype,with_bias", [("vptq-v4-c8-r4", torch.float32, True),
                                                     ("vptq-v3-c16-r8-o6-ov2-oc4-g3-norm-perm", torch.bfloat16, False)])
def test_opcheck(scheme, dtype, with_bias):
    _, _, args, attrs = build(scheme, 24, 36)
    x = torch.randn(2, 5, 36, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_vptq.default, (x, *args, b), attrs)


def test_backward_is_gradient_of_dequantized_linear():
    _, _, args, attrs = build("vptq-v4-c16-r8-o4-norm-perm", 16, 36, 5)
    w = op.dequantize_weight(*args, **attrs)
    x, b = torch.randn(3, 36, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.ops.fxquant.linear_vptq(x, *args, b, **attrs).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    assert rel(x.grad, x2.grad) < 1e-2 and rel(b.grad, b2.grad) < 1e-2  # the forward's x is bf16-rounded by the policy


def test_quantize_and_compile_a_model():
    """quantize_ (data-free k-means) and compile: the packed modules under torch.compile(fullgraph=True) give the
    eager outputs; the user's float model is left as it was by fxquant.compile."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    x = torch.randn(4, 32)
    ref = model(x)
    gm = fxquant.compile(model, "vptq-v4-c16-r8-perm", (x,))
    assert [r.scheme for r in gm.meta["fxquant_report"].quantized] == ["vptq-v4-c16-r8-perm"] * 2
    assert torch.equal(model(x), ref)
    q = fxquant.quantize_(model, "vptq-v4-c16-r8-perm", (x,))
    eager = q(x)
    assert rel(eager, ref) < 0.5
    compiled = torch.compile(q, fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gm(x), eager, rtol=1e-5, atol=1e-5)


# ---- scheme ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["vptq-v8-c256", "vptq-v8-c65536-r256-norm-perm", "vptq-v6-c4096-o32-ov4-oc256-g2",
                                  "vptq-v4-c256-gs128-fp16", "vptq-v12-c128-r128-norm-perm-fp32"])
def test_scheme_strings_round_trip(text):
    s = parse_scheme(text)
    assert isinstance(s, VPTQ) and str(s) == text
    assert scheme_from_json(scheme_to_json(s)) == s
    assert parse_scheme(str(s) + "@vptq").method.name == "vptq"


def test_scheme_fields_and_defaults():
    s = parse_scheme("vptq-v6-c4096-o32")
    assert (s.vector_len, s.num_centroids, s.num_res_centroids, s.outlier_size) == (6, 4096, 0, 32)
    assert (s.outlier_vector_len, s.num_outlier_centroids, s.group_num, s.group_size) == (6, 4096, 1, None)
    assert VPTQ(num_res_centroids=-1, group_size=-1) == VPTQ()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_centroids=100), r"VPTQ.num_centroids=100 is not supported; valid: a power of two in 2..65536"),
    (dict(num_centroids=1 << 17), r"num_centroids=131072"),
    (dict(vector_len=0), r"VPTQ.vector_len=0 is not supported; valid: an integer >= 1"),
    (dict(num_res_centroids=3), r"VPTQ.num_res_centroids=3 is not supported"),
    (dict(outlier_vector_len=4), r"VPTQ.outlier_size=0 is not supported; valid: an integer >= 1 when"),
    (dict(outlier_size=4, num_outlier_centroids=5), r"VPTQ.num_outlier_centroids=5"),
    (dict(group_num=0), r"VPTQ.group_num=0"),
    (dict(enable_norm=1), r"VPTQ.enable_norm=1 is not supported; valid: True, False"),
    (dict(codebook_dtype=torch.int8), r"VPTQ.codebook_dtype=torch.int8"),
])
def test_scheme_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VPTQ(**kwargs)


def test_unknown_string_lists_the_form():
    with pytest.raises(ValueError, match=r"vptq-v<v>-c<C>"):
        parse_scheme("vptq-c256")


def test_layer_shapes_the_scheme_cannot_take():
    s = parse_scheme("vptq-v4-c16-o3-g2")
    assert "group_num=2 must divide the 9 non-outlier columns" in s.unsupported_reason(torch.randn(8, 12))
    assert s.unsupported_reason(torch.randn(8, 13)) is None
    assert "columns, the weight has 12" in parse_scheme("vptq-v4-c16-gs16").unsupported_reason(torch.randn(8, 12))
    assert "non-finite" in parse_scheme("vptq-v4-c16").unsupported_reason(torch.tensor([[1.0, float("nan")]]))


# ---- argument errors ---------------------------------------------------------------------------------------
def _call(args, attrs, x=None, bias=None):
    return torch.ops.fxquant.linear_vptq(torch.randn(2, 36) if x is None else x, *args, bias, **attrs)


@pytest.mark.parametrize("mutate,match", [
    (lambda t, a: (t, {**a, "in_features": 35}), r"group_num=3 must divide"),
    (lambda t, a: ({**t, "indices": t["indices"][:, :-1]}, a), r"indices must be one of torch.int32 of shape"),
    (lambda t, a: ({**t, "indices": t["indices"].to(torch.int64)}, a), r"indices must be one of torch.int32"),
    (lambda t, a: ({**t, "centroids": t["centroids"][:, :-1]}, a), r"centroids must be one of .* \[G, C\*v\]"),
    (lambda t, a: ({**t, "res_centroids": torch.empty(0)}, a), r"res_centroids must be .* got torch.float32 of shape \(0,\)"),
    (lambda t, a: ({**t, "perm": t["perm"].to(torch.int32)}, a), r"perm must be one of torch.int16 of shape \(36,\)"),
    (lambda t, a: ({**t, "outlier_indices": t["outlier_indices"].float()}, a), r"outlier_indices must be one of torch.int16"),
    (lambda t, a: ({**t, "weight_scale": t["weight_scale"][:5]}, a), r"weight_scale must be .* of shape \(36,\)"),
    (lambda t, a: (t, {**a, "num_centroids": 12}), r"num_centroids=12 must be a power of two"),
    (lambda t, a: (t, {**a, "enable_norm": False}), r"weight_scale must be .* \(0,\) \(absent\)"),
], ids=["in_features", "indices_shape", "indices_dtype", "centroids", "res_absent", "perm_dtype", "outlier_dtype",
        "scale_shape", "centroid_count", "norm_flag"])
def test_bad_arguments_name_the_tensor(mutate, match):
    _, qw, _, attrs = build("vptq-v3-c16-r8-o6-ov2-oc4-g3-norm-perm", 24, 36)
    t, a = mutate(dict(qw.tensors), dict(attrs))
    with pytest.raises(ValueError, match="fxquant::linear_vptq: " + match):
        _call(tuple(t.values()), a)


def test_bad_activations_and_bias():
    _, _, args, attrs = build("vptq-v4-c16", 24, 36)
    with pytest.raises(ValueError, match=r"x has 35 input features .* in_features=36"):
        _call(args, attrs, torch.randn(2, 35))
    with pytest.raises(ValueError, match=r"bias must be None or a floating-point tensor of shape \(24,\)"):
        _call(args, attrs, bias=torch.randn(23))


# ---- the native kernels of every instruction set --------------------------------------------------------------
ISAS = native_cpu.isas()


@pytest.mark.skipif(not ISAS, reason="native kernels unavailable")
@pytest.mark.parametrize("isa", ISAS or ["none"])
@pytest.mark.parametrize("scheme", SCHEMES + ["vptq-v8-c65536-r256", "vptq-v4-c256-r65536"])
def test_native_kernels_of_each_isa(monkeypatch, isa, scheme):
    """GEMV (M = 1..9, every rows-of-x remainder) and decoder (fp32 exactly the torch decode of Wp times the
    scale; bf16 that rounded once) of both instruction sets against the reference."""
    monkeypatch.setattr(native_build, "_lib", lambda: native_cpu.kernels(isa))
    _, qw, args, attrs = build(scheme, 37, 36, 3)
    t, lay = qw.tensors, op.layout_of(attrs)
    w = op.dequantize_weight(*args, **attrs)
    for m in range(1, 10):
        x = torch.randn(m, 36)
        xp, _, beta = op.moved_to_activations(x, t, lay, scale_x=True)
        y = native_vptq.gemv(xp, t, lay) + (0 if beta is None else beta[:, None])
        assert rel(y, x @ w.t()) < 1e-5, m
    _, s_p, _ = op.moved_to_activations(torch.zeros(1, 36), t, lay, scale_x=False)
    decode = native_vptq.decoder(t, lay, s_p)
    want = fmt.decode_permuted_rows(t, lay, 0, 37) * (1 if s_p is None else s_p)
    for dtype in (torch.float32, torch.bfloat16):
        for n0, n1 in ((0, 37), (5, 22), (36, 37)):
            out = torch.empty(n1 - n0, 36, dtype=dtype)
            assert decode(n0, n1, out)
            assert torch.equal(out, want[n0:n1].to(dtype)), (dtype, n0, n1)
    assert not decode(0, 4, torch.empty(4, 36, dtype=torch.float16))  # an output it does not write


def test_native_refuses_long_vectors():
    """Vectors longer than the kernels take (64 lanes): the wrappers decline and the op takes the torch paths."""
    _, qw, args, attrs = build("vptq-v80-c4", 90, 8)
    lay = op.layout_of(attrs)
    assert native_vptq.gemv(torch.randn(1, 8), qw.tensors, lay) is None
    assert native_vptq.decoder(qw.tensors, lay, None) is None
    x = torch.randn(2, 8)
    assert rel(torch.ops.fxquant.linear_vptq(x, *args, None, **attrs), op.reference(policy_x(x), *args, None, **attrs)) < 1e-5
