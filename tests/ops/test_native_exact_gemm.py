"""The native GEMMs behind the fp32-exact large-M paths (the ``compute_dtype`` policy): the GEMM on
a weight decoded to bf16 (``native_cpu.bf16_gemm``: float8 and fpX blocks) against float64 products,
and which large-M paths take it."""
from contextlib import contextmanager

import pytest
import torch

from fxquant.kernels import native_cpu
from fxquant.ops import _dequant_gemm
from fxquant.schemes import parse_scheme

needs_bf16_gemm = pytest.mark.skipif(not native_cpu.has_bf16_gemm(), reason="no AVX512-BF16 GEMM here")


@needs_bf16_gemm
@pytest.mark.parametrize("m,n,k", [(1, 1, 2), (31, 15, 66), (33, 29, 1026), (native_cpu.GEMM_ROWS + 5, 45, 130),
                                   (40, 301, 2050)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_bf16_gemm_against_exact_products(m, n, k, xdtype):
    """``(x @ w.T) * rs`` on a bf16 weight: x's values as bf16 (fp32 x rounded in the kernel), exact
    products, fp32 sums: float64 products within fp32 summation, across weight panels (14 rows), x
    blocks (32 rows), k chunks (1024) and the wrapper's row chunks; written into a column block of a
    wider output (row stride != N) without touching the other columns; rs None means 1."""
    gen = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    rs = torch.rand(n, generator=gen) + 0.5
    x = torch.randn(m, k, generator=gen).to(xdtype)
    xb = x.to(torch.bfloat16).double()
    products, size = xb @ w.double().t(), xb.abs() @ w.double().abs().t()
    wide = torch.full((m, n + 7), float("nan"))
    y = native_cpu.bf16_gemm(x, w, rs, out=wide[:, 3:3 + n])
    assert y.data_ptr() == wide[:, 3:].data_ptr() and y.dtype == torch.float32
    assert ((y.double() - products * rs.double()).abs() <= 1e-6 * size * rs.double() + 1e-30).all()
    assert wide[:, :3].isnan().all() and wide[:, 3 + n:].isnan().all()
    y1 = native_cpu.bf16_gemm(x, w)
    assert ((y1.double() - products).abs() <= 1e-6 * size + 1e-30).all()
    assert native_cpu.bf16_gemm(x[:, :-1], w[:, :-1]) is None  # odd K


@contextmanager
def counted(name: str):
    real, calls = getattr(native_cpu, name), []

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    setattr(native_cpu, name, spy)
    try:
        yield calls
    finally:
        setattr(native_cpu, name, real)


@needs_bf16_gemm
@pytest.mark.parametrize("scheme", ["float8wo", "float8wo-e5m2", "float8dq-row", "fp6_e3m2", "fp5_e2m2"])
@pytest.mark.parametrize("dtype,cd", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.float32)])
def test_float8_and_fpx_large_m_take_the_native_gemm_where_x_is_bf16(scheme, dtype, cd, monkeypatch):
    """float8 / fpX blocks at large M go to the native bf16 GEMM whenever the GEMM's x is bf16 (bf16
    activations, fp32 ones the policy rounds, float8dq's float8 codes), never for unrounded fp32
    values (``compute_dtype=float32`` on a weight-only op); small blocks so that several are decoded."""
    monkeypatch.setattr(_dequant_gemm, "NATIVE_BLOCK_BYTES", 64 * 130 * 2)
    qw = parse_scheme(scheme).quantize(torch.randn(200, 130, generator=torch.Generator().manual_seed(1)))
    op = getattr(torch.ops.fxquant, qw.op)
    x = torch.randn(70, 130, generator=torch.Generator().manual_seed(2)).to(dtype)
    with counted("bf16_gemm") as calls:
        op(x, *qw.tensors.values(), None, **qw.attrs, **({"compute_dtype": cd} if cd else {}))
    native = cd is None or qw.op == "linear_float8dq"  # float8dq: its float8 codes, any compute_dtype but bf16
    assert (len(calls) == 4) == native, len(calls)  # 200 rows in blocks of 64
