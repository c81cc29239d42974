"""Group-wise formats at any in_features: int4wo and intx pad a partial last group (axis 0: along N),
bnb4 keeps bitsandbytes' flat blocks.  Every CPU path, named and forced, against the reference at
K = 576 (SmolLM2's hidden size, 4.5 groups of 128), 100 and 4099; and the reference itself against
the float weight within the formats' per-element bounds."""
import pytest
import torch

from helpers import Spy, assert_linear_close
from fxquant.formats import bnb4 as bnb4_fmt
from fxquant.formats import int4
from fxquant.kernels import native_build, native_cpu, native_entry
from fxquant.ops import _linear, bnb4, int4wo, intx
from fxquant.schemes import parse_scheme

pytestmark = pytest.mark.usefixtures("no_amx")  # the native large-M kernels are what these test

KS = [576, 100, 4099]
N = 40
#: the fp32 paths (native fp32 GEMV, fp32 dequantize + GEMM) are the reference up to the order of an
#: fp32 sum; bf16 ones (ATen int4pack, the int4 kernel per plane, the bf16 GEMMs) round x, W or y once
FP32_TOL, BF16_TOL = 2e-6, 2**-7
needs_native = pytest.mark.skipif(not native_cpu.available(), reason=f"native kernels: {native_cpu.status()}")
needs_int4pack = pytest.mark.skipif(int4.native_cpu_block_n() is None, reason="no ATen int4 CPU kernel layout")
needs_gemm = pytest.mark.skipif(not native_cpu.has_bf16_dot(), reason="no AVX512-BF16 native GEMM here")


def quantized(scheme: str, n: int, k: int):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.1 + 0.01
    qw = parse_scheme(scheme).quantize(w)
    return w, qw, getattr(torch.ops.fxquant, qw.op)


def op_def(qw) -> _linear.LinearOpDef:
    return {"linear_int4wo": int4wo.OP, "linear_intx": intx.OP, "linear_bnb4": bnb4.OP,
            "linear_bnb4_dq": bnb4.OP_DQ}[qw.op]


def run_path(scheme, k, m, dtype, monkeypatch, spy, native=True, cd=None):
    """The op at ``m`` rows (``compute_dtype`` ``cd``) against its reference; ``spy`` = (module, name)
    must have run and returned."""
    if not native:
        monkeypatch.setattr(native_build, "_lib", lambda: None)
    w, qw, op = quantized(scheme, N, k)
    s = Spy(monkeypatch, *spy)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) + 0.2).to(dtype)
    bias = torch.randn(N).to(dtype)
    args = (x, *qw.tensors.values(), bias)
    attrs = {**qw.attrs, **({"compute_dtype": cd} if cd is not None else {})}
    with native_entry.disabled():  # the Python routing is under test (the C++ entry: test_native_entry.py)
        y = op(*args, **attrs)
    r = op_def(qw).reference(*args, **attrs)
    assert any(s.calls), f"{spy[1]} was not taken"
    assert y.shape == r.shape == (m, N) and y.dtype == dtype
    return y, r, x, op_def(qw).dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None}), bias


def check(scheme, k, m, dtype, monkeypatch, spy, exact_in_fp32, native=True, cd=None):
    y, r, x, w, bias = run_path(scheme, k, m, dtype, monkeypatch, spy, native, cd)
    exact = exact_in_fp32 and dtype == torch.float32 and cd is None
    assert_linear_close(y, r, x, w, FP32_TOL if exact else BF16_TOL, bias)


DTYPES = [torch.float32, torch.bfloat16]


# -- int4wo: every CPU path ---------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("k", KS)
def test_int4wo_native_gemv(k, m, dtype, monkeypatch, fp32_dense):
    real = int4wo.native_row_limit  # bf16 x goes to int4pack without the bf16 dot kernel: the GEMV is under test
    monkeypatch.setattr(int4wo, "native_row_limit", lambda x2, nm, block_n=None: real(x2, nm))
    check("int4wo-128", k, m, dtype, monkeypatch, (native_cpu, "int4_tiled_gemv"), True)


@needs_native
@pytest.mark.parametrize("k", KS)
def test_int4wo_native_bf16_dot_gemv(k, monkeypatch):
    """fp32 activations at the bf16 dot-product kernel (where the CPU has it): x rounded to bf16."""
    check("int4wo-64", k, 3, torch.float32, monkeypatch, (native_cpu, "int4_tiled_gemv"), False)


#: where the ATen int4 kernel (a bf16 result) is allowed: bf16 x, or fp32 x with compute_dtype bf16
BF16_RESULT = [(torch.bfloat16, None), (torch.float32, torch.bfloat16)]


@needs_int4pack
@pytest.mark.parametrize("dtype,cd", BF16_RESULT)
@pytest.mark.parametrize("k", KS)
def test_int4wo_aten_int4pack(k, dtype, cd, monkeypatch):
    check("int4wo-128", k, 5, dtype, monkeypatch, (torch.ops.aten, "_weight_int4pack_mm_for_cpu"), False,
          native=False, cd=cd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_int4wo_blocked_decode(k, dtype, monkeypatch, fp32_dense):
    check("int4wo-32", k, 256, dtype, monkeypatch, (_linear, "blocked_linear"), True, native=False)


@needs_gemm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_int4wo_native_gemm(k, dtype, monkeypatch):
    check("int4wo-128", k, 256, dtype, monkeypatch, (native_cpu, "int4_gemm"), False)


# -- intx: every CPU path, axis 1 (K padded) and axis 0 (N padded) -------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["uint3wo-128", "int6wo-64", "uint4wo-32"])
@pytest.mark.parametrize("k", KS)
def test_intx_native_gemv(k, scheme, dtype, monkeypatch, fp32_dense):
    check(scheme, k, 1, dtype, monkeypatch, (native_cpu, "int4_tiled_gemv"), True)


@needs_int4pack
@pytest.mark.parametrize("dtype,cd", BF16_RESULT)
@pytest.mark.parametrize("scheme", ["uint3wo-128", "int8wo-64", "uint4wo-32"])
@pytest.mark.parametrize("k", KS)
def test_intx_int4_kernel(k, scheme, dtype, cd, monkeypatch):
    check(scheme, k, 5, dtype, monkeypatch, (intx, "int4_kernel_linear"), False, native=False, cd=cd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,m,path", [("uint3wo-128", 80, "tiled_dequant_linear"),
                                           ("int5wo-64", 256, "rows_dequant_linear"),
                                           ("uint2wo-7", 20, "tiled_dequant_linear")])
@pytest.mark.parametrize("k", KS)
def test_intx_dequant_paths(k, scheme, m, path, dtype, monkeypatch, fp32_dense):
    check(scheme, k, m, dtype, monkeypatch, (intx, path), True, native=False)


@needs_gemm
@pytest.mark.parametrize("k", KS)
def test_intx_native_gemm(k, monkeypatch):
    check("uint4wo-128", k, 256, torch.bfloat16, monkeypatch, (native_cpu, "int4_gemm"), False)


@pytest.mark.parametrize("n", [100, 57, 130])
@pytest.mark.parametrize("m", [1, 20, 256])
def test_intx_axis0_partial_groups_along_n(n, m, monkeypatch, fp32_dense):
    """axis 0 groups run along N: N = 100 at g64 has ceil(100/64) = 2 param rows, so rows n and n + 2
    share a group; every M (native axis-0 GEMV where built, then the dequantize paths)."""
    w, qw, op = quantized("uint4wo-64-axis0", n, 96)
    assert qw.tensors["scale"].shape == (-(-n // 64), 96)
    x = torch.randn(m, 96)
    y, r = op(x, *qw.tensors.values(), None, **qw.attrs), intx.reference(x, *qw.tensors.values(), None, **qw.attrs)
    assert_linear_close(y, r, x, intx.OP.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None}), BF16_TOL)


# -- bnb4: flat blocks that straddle rows take the native GEMV in pieces --------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["nf4-128", "fp4-256+dq", "nf4-4096", "nf4-64"])
@pytest.mark.parametrize("k", [576, 100, 4098])
def test_bnb4_native_gemv_any_even_k(k, scheme, dtype, monkeypatch, fp32_dense):
    """K % blocksize != 0 (576 at 128: pieces of 64; 4098 at 4096: pieces of 2 -> below
    NATIVE_MIN_PIECE, chunked; 100 at 64: pieces of 4, chunked): the stored blocks stay bitsandbytes'
    flat ones; where the pieces are large enough the native GEMV runs."""
    piece = __import__("math").gcd(k, parse_scheme(scheme).blocksize)
    spy = (native_cpu, "lut4_gemv_x") if piece >= bnb4.NATIVE_MIN_PIECE else (bnb4, "_chunked_linear")
    check(scheme, k, 3, dtype, monkeypatch, spy, True)


@pytest.mark.parametrize("scheme", ["nf4-128", "fp4-64+dq"])
@pytest.mark.parametrize("k", [577, 4099])
def test_bnb4_odd_k_chunked(k, scheme, monkeypatch, fp32_dense):
    """Odd K (rows start mid-byte): the chunked decode, at every M."""
    for m in (1, 256):
        check(scheme, k, m, torch.float32, monkeypatch, (bnb4, "_chunked_linear"), True)


# -- the reference is the float weight within the per-element bounds -------------------------------------------
@pytest.mark.parametrize("k", KS)
def test_int4wo_reference_is_the_weight_within_its_bound(k):
    """|x @ W.T - reference| <= |x| @ E.T, E = scale/2 + |zero| 2^-8 per element: the padded columns
    add nothing (x is never padded with anything but zeros) and the last group keeps its bound."""
    w, qw, op = quantized("int4wo-128", N, k)
    sz = qw.tensors["scales_and_zeros"].float()  # [Kp/g, Np, 2]
    per_col = lambda t: t[:, :N].t().repeat_interleave(128, dim=1)[:, :k]  # noqa: E731
    bound = per_col(sz[..., 0]) / 2 + per_col(sz[..., 1]).abs() * 2**-8
    x = torch.randn(4, k)
    err = (op(x, *qw.tensors.values(), None, **qw.attrs) - x @ w.t()).abs()
    assert (err <= x.abs() @ bound.t() * (1 + 1e-4) + 1e-5).all()


@pytest.mark.parametrize("scheme,shape", [("uint3wo-128", (N, 576)), ("int5wo-64", (N, 100)),
                                          ("uint4wo-64-axis0", (100, 96)), ("uint2wo-3-axis0", (58, 40))])
def test_intx_reference_is_the_weight_within_its_bound(scheme, shape):
    w, qw, op = quantized(scheme, *shape)
    s, o, g = qw.tensors["scale"].float(), qw.tensors["offset"].float(), qw.attrs["group_size"]
    n, k = shape
    per = ((lambda t: t.t().repeat_interleave(g, dim=1)[:, :k]) if qw.attrs["axis"] == 1
           else (lambda t: t[torch.arange(n) % t.shape[0]]))
    bound = per(s) / 2 + (per(o).abs() * 2**-8 if o.numel() else 0)  # symmetric: no offset, scale / 2
    x = torch.randn(4, k)
    err = (intx.reference(x, *qw.tensors.values(), None, **qw.attrs) - x @ w.t()).abs()
    assert (err <= x.abs() @ bound.t() * (1 + 1e-4) + 1e-5).all()


def test_bnb4_flat_blocks_are_bitsandbytes_layout_at_any_k():
    """K = 576 at blocksize 128: blocks run over the flattened weight (no padding per row)."""
    w, qw, _ = quantized("nf4-128", N, 576)
    assert qw.tensors["codes"].numel() == N * 576 // 2 and qw.tensors["absmax"].numel() == N * 576 // 128
    assert torch.equal(qw.tensors["codes"], bnb4_fmt.quantize_4bit(w, "nf4", 128)[0])


@pytest.mark.parametrize("scheme,n", [("int4wo-32", N), ("uint3wo-64", N), ("uint4wo-32-axis0", 37), ("nf4-128", N)])
def test_opcheck_partial_groups(scheme, n):
    """Schema, fake impl (with in_features), autograd registration and AOT dispatch at K = 100."""
    _, qw, op = quantized(scheme, n, 100)
    x = torch.randn(2, 3, 100, requires_grad=True)
    torch.library.opcheck(op.default, (x, *qw.tensors.values(), torch.randn(n)), qw.attrs)


@pytest.mark.parametrize("cd", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int4wo-128", "uint3wo-64", "uint4wo-32-axis0"])
def test_compute_dtype_at_partial_groups(scheme, cd):
    """compute_dtype fp32 / fp16 skips the fast paths (the dequantized [N, K] weight meets x as it
    is); bf16 takes them (x at the stored width): both are the reference in that dtype."""
    _, qw, op = quantized(scheme, N, 100)
    x = torch.randn(3, 100)
    attrs = {**qw.attrs, "compute_dtype": cd}
    y = op(x, *qw.tensors.values(), None, **attrs)
    r = op_def(qw).reference(x, *qw.tensors.values(), None, **attrs)
    assert y.shape == (3, N)
    torch.testing.assert_close(y, r, rtol=1e-5 if cd == torch.float32 else 2e-2, atol=1e-5 if cd == torch.float32 else 2e-2)
