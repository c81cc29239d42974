"""int8wo / int4wo ops: CPU fast paths and dispatch vs the plain-torch reference, opcheck, autograd."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from helpers import FAST_PATH_TOL, assert_linear_close, rel
from fxquant.formats import int4, int8
from fxquant.kernels import native_build, native_cpu
from fxquant.ops import _cpu, int4wo, int8wo

DTYPES = [torch.float32, torch.bfloat16]


def int8_case(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s = int8.quantize(w)
    op = lambda x, b: torch.ops.fxquant.linear_int8wo(x, q, s, b)  # noqa: E731
    op.weight = int8.dequantize(q, s)
    return (q, s), op, lambda x, b: int8wo.reference(x, q, s, b)


def int4_case(n, k, seed, group=32, block_n=None):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    block_n = block_n or int4.native_cpu_block_n() or 64
    st_ = int4.to_storage(w, group, block_n)
    args = (st_["qweight"], st_["scales_and_zeros"])
    op = lambda x, b: torch.ops.fxquant.linear_int4wo(x, *args, b, group, block_n, n, k)  # noqa: E731
    op.weight = int4.from_storage(*args, group, block_n, n, k)
    ref = lambda x, b: int4wo.reference(x, *args, b, group, block_n, n, k)  # noqa: E731
    return args, op, ref


CASES = {"int8wo": lambda n, k, seed: int8_case(n, k, seed),
         "int4wo": lambda n, k, seed: int4_case(n, k, seed)}


@pytest.mark.parametrize("name", CASES)
@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
       with_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]), seed=st.integers(0, 999))
def test_op_matches_reference(name, m, n, k, dtype, with_bias, lead, seed):
    """Any K (int4wo: a partial last group of 32 is padded)."""
    _, op, ref = CASES[name](n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y, r = op(x, b), ref(x, b)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert_linear_close(y, r, x, op.weight, FAST_PATH_TOL[dtype], b)


@pytest.mark.parametrize("k", [8, 24, 130, 136, 200, 4112])
@pytest.mark.parametrize("m", [1, 2, 9])
def test_int8wo_aten_path_at_any_k(k, m, monkeypatch, python_kernels):
    """With the native kernels off, small M runs ``_weight_int8pack_mm`` where it is right
    (K % 16 == 0 on the AVX-512 build) and the dequantize path elsewhere: right at every K."""
    monkeypatch.setattr(native_build, "_lib", lambda: None)
    _, op, ref = int8_case(40, k, k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    y, r = op(x, None), ref(x, None)
    assert torch.isfinite(y).all()
    assert_linear_close(y, r, x, op.weight, FAST_PATH_TOL[torch.bfloat16])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_large_m_path_matches_reference(name, dtype, monkeypatch):
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    _, op, ref = CASES[name](48, 96, 0)
    x = torch.randn(2, 9, 96).to(dtype)
    b = torch.randn(48).to(dtype)
    assert rel(op(x, b), ref(x, b)) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("n", [100, 129])
def test_large_m_blocked_decode_is_the_reference_in_fp32(name, n, monkeypatch, fp32_dense):
    """Above the threshold the weight is decoded a block of rows at a time (tiny blocks here: many
    blocks, a partial last tile); in fp32 that is the reference up to summation order."""
    from fxquant.ops import _dequant_gemm

    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    monkeypatch.setattr(_dequant_gemm, "BLOCK_BYTES", 4096)
    _, op, ref = CASES[name](n, 96, 5)
    x = torch.randn(20, 96)
    b = torch.randn(n)
    y, r = op(x, b), ref(x, b)
    assert y.shape == (20, n) and rel(y, r) < 1e-6


def test_int8wo_switches_kernels_at_its_own_crossover(monkeypatch):
    """Between the native GEMV's rows (``native_row_limit()``, when the native kernels load) and
    ``packed_max_rows()`` rows (measured per dense GEMM dtype, capped by the CPU-wide threshold)
    int8wo calls the packed kernel; from it on, the blocked dequantize path; all equal the reference."""
    from fxquant.kernels import native_cpu

    real, calls = torch._weight_int8pack_mm, []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    limit = int8wo.packed_max_rows()
    native = int8wo.native_row_limit(_cpu.numerics(torch.float32, None)) if native_cpu.available() else 0
    _, op, ref = int8_case(64, 64, 2)
    for m, packed in ((limit - 1, int(native < limit - 1)), (limit, 0), (native + 1, int(native + 1 < limit))):
        calls.clear()
        x = torch.randn(m, 64)
        assert rel(op(x, None), ref(x, None)) < FAST_PATH_TOL[torch.float32]
        assert len(calls) == packed, m


def test_int4_foreign_block_n_uses_dequant_path(monkeypatch, fp32_dense, python_kernels):
    """Weights packed for another CPU's tile height still compute the right thing: the native GEMV
    reads any tile height at small M; above it, the dequantize path (with a warning)."""
    monkeypatch.setattr(int4wo, "_warned_layout", False)
    native = int4.native_cpu_block_n()
    other = 64 if native != 64 else 32
    _, op, ref = int4_case(40, 64, 3, block_n=other)
    if native_cpu.available():
        x = torch.randn(int4wo.NATIVE_MAX_ROWS, 64)
        assert rel(op(x, None), ref(x, None)) < 1e-5
    # int4pack's rows (bf16 activations: its bf16 output allowed; fp32 ones keep the GEMV), below
    # the bf16 dot-product GEMV's limit on CPUs that have it
    monkeypatch.setattr(native_cpu, "has_bf16_dot", lambda: False)
    x = torch.randn(int4wo.NATIVE_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="block_n"):
        y = op(x, None)
    assert rel(y, ref(x, None)) < 2**-8


def test_int4_odd_rows_are_sliced():
    _, op, ref = int4_case(10, 64, 1)
    x = torch.randn(1, 64)
    assert op(x, None).shape == (1, 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_int8wo(dtype, with_bias):
    q, s = int8.quantize(torch.randn(24, 40))
    x = torch.randn(5, 40, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_int8wo.default, (x, q, s, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_int4wo(dtype, with_bias):
    (qw, sz), _, _ = int4_case(24, 64, 0)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_int4wo.default, (x, qw, sz, b, 32, int4.native_cpu_block_n() or 64, 24, 64))


@pytest.mark.parametrize("name", CASES)
def test_backward_is_gradient_of_dequantized_linear(name):
    _, op, _ = CASES[name](16, 64, 5)
    if name == "int8wo":
        q, s = int8.quantize(torch.randn(16, 64, generator=torch.Generator().manual_seed(5)))
        w = int8.dequantize(q, s)
    else:
        (qw, sz), _, _ = int4_case(16, 64, 5)
        w = int4.from_storage(qw, sz, 32, int4.native_cpu_block_n() or 64, 16, 64)
    x = torch.randn(3, 64, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    op(x, b).backward(gy)
    assert torch.allclose(x.grad, gy @ w, atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(name, cd):
    """compute_dtype=fp32 computes exactly the fp32 reference; bf16/fp16 within their rounding."""
    (t1, t2), _, _ = CASES[name](24, 64, 7)
    extra = (32, int4.native_cpu_block_n() or 64, 24, 64) if name == "int4wo" else ()
    op = getattr(torch.ops.fxquant, f"linear_{name}")
    ref = int4wo.reference if name == "int4wo" else int8wo.reference
    x = torch.randn(3, 64)
    y = op(x, t1, t2, None, *extra, compute_dtype=cd)
    r32 = ref(x, t1, t2, None, *extra)
    assert rel(y, ref(x, t1, t2, None, *extra, compute_dtype=cd)) < (1e-6 if cd == torch.float32 else 1e-2)
    assert rel(y, r32) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[cd]


@pytest.mark.parametrize("bf16_dot", [False, True])
def test_int4wo_bf16_decode_route(monkeypatch, bf16_dot, python_kernels):
    """bf16 activations without the bf16 dot-product kernel: int4pack at every M below its limit
    (the fp32 native GEMV is compute-bound there), for weights tiled for this CPU only; fp32 x stays
    on the native GEMV (an exact result); the result is the reference's either way."""
    from fxquant.kernels import native_cpu

    monkeypatch.setattr(native_cpu, "has_bf16_dot", lambda: bf16_dot)
    bn = int4.native_cpu_block_n() or 64
    xb, xf = torch.randn(1, 256, dtype=torch.bfloat16), torch.randn(1, 256)
    nb, nf = _cpu.numerics(torch.bfloat16, None), _cpu.numerics(torch.float32, None)
    assert (int4wo.native_row_limit(xb, nb, bn) == 0) == (not bf16_dot)
    assert int4wo.native_row_limit(xf, nf, bn) >= int4wo.NATIVE_MAX_ROWS
    assert int4wo.native_row_limit(xb, nb, 32 if bn != 32 else 64) >= int4wo.NATIVE_MAX_ROWS
    _, op, ref = int4_case(96, 256, 0, group=64, block_n=bn)
    for m in (1, 5):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert_linear_close(op(x, None), ref(x, None), x, op.weight, FAST_PATH_TOL[torch.bfloat16])
