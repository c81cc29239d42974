"""A failed allocation in a native kernel raises ``MemoryError`` naming the kernel and the sizes,
through the op, and never returns the unwritten output (``torch.empty`` garbage).

The kernels run from the fault-injection build (``native_cpu.fault_injection_kernels``: the same
sources with ``-DFXQ_FAULT_INJECT``), whose ``fail_alloc(n)`` makes the n-th allocation request from
then on fail: each case arms n = 1, 2, ... until a call completes without reaching the armed
request, so every allocation the op's kernels make on that path fails once."""
from contextlib import contextmanager

import pytest
import torch

from helpers import assert_linear_close
from fxquant.kernels import native_build, native_cpu
from fxquant.schemes import parse_scheme

# the native large-M kernels are what these test; the Python routing to each library (the C++ entry
# of native_entry.cpp, which calls the loaded kernels without it: test_native_entry.py) is what they spy on
pytestmark = pytest.mark.usefixtures("no_amx", "python_kernels")

needs_native = pytest.mark.skipif(not native_cpu.available(), reason=f"native kernels: {native_cpu.status()}")
needs_bf16_dot = pytest.mark.skipif(not native_cpu.has_bf16_dot(), reason="no AVX512-BF16 kernels here")


@contextmanager
def fault_kernels(isa: str):
    """Route the ops to ``isa``'s kernels from the fault-injection build (disarmed on exit)."""
    lib, real = native_cpu.fault_injection_kernels(isa), native_build._lib
    native_build._lib = lambda: lib
    try:
        yield lib
    finally:
        lib.fail_alloc(0)
        native_build._lib = real


def _case(scheme: str, n: int, k: int, m: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(m + n)
    qw = parse_scheme(scheme).quantize(torch.randn(n, k, generator=gen) * 0.1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    op = getattr(torch.ops.fxquant, qw.op)
    return qw, op, x


def _every_allocation_fails_once(isa: str, scheme: str, n: int, k: int, m: int, kernel: str,
                                 dtype: torch.dtype = torch.float32) -> int:
    qw, op, x = _case(scheme, n, k, m, dtype)
    args = tuple(qw.tensors.values())
    failures = 0
    with fault_kernels(isa) as lib:
        for nth in range(1, 64):
            lib.fail_alloc(nth)
            try:
                y = op(x, *args, None, **qw.attrs)
            except MemoryError as e:
                assert kernel in str(e) and f"M={m}" in str(e) and "nothing was computed" in str(e), str(e)
                assert lib.fail_alloc_pending() == 0  # it was the armed request that failed
                failures += 1
                continue
            # completed: only if the armed request was never reached (a failure it swallowed would
            # have left part of y unwritten)
            assert lib.fail_alloc_pending() > 0, f"allocation {nth} failed but {scheme} M={m} returned"
            break
        else:
            pytest.fail("more than 63 allocation requests in one call")
    ref = _linear_reference(qw)(x, *args, None, **qw.attrs)
    dq = {**qw.attrs, "compute_dtype": None}
    w = next(d for d in _linear_defs() if d.name == qw.op).dequantized(qw.tensors, dq)
    assert_linear_close(y, ref, x, w, 2**-7)  # the completed call's result (the fp32 bound: test_compute_dtype_policy)
    return failures


def _linear_defs():
    from fxquant.ops import bnb4, fpx, int4wo, int8wo, intx, onebit

    return [int8wo.OP, int4wo.OP, intx.OP, bnb4.OP, bnb4.OP_DQ, fpx.OP, onebit.OP]


def _linear_reference(qw):
    return next(d for d in _linear_defs() if d.name == qw.op).reference


#: (scheme, N, K, M, the C kernel whose allocation fails) per ISA; M picks the path
GEMV_CASES = {
    "avx2": [("int4wo-64", 70, 256, 1, "fxq_int4t_gemv"), ("uint3wo-32", 40, 96, 3, "fxq_int4t_gemv"),
             ("nf4", 33, 128, 2, "fxq_lut4_gemv"), ("nf4-64+dq", 9, 256, 1, "fxq_lut4_gemv"),
             ("onebit", 17, 77, 2, "fxq_onebit_gemv")],
    "avx512": [("uint3wo-32", 40, 96, 3, "fxq512_int4t_gemv"), ("uint3wo-64-axis0", 128, 64, 1, "fxq512_int4t_axis0_gemv"),
               ("onebit", 17, 77, 5, "fxq512_onebit_gemv"),
               ("nf4", 33, 128, 2, "fxq512_lut4_gemv")],  # fp32 x, NF4's table: the fp32 kernel (x rounded in C)
}


@needs_native
@pytest.mark.parametrize("isa,case", [(i, c) for i in native_cpu.isas() for c in GEMV_CASES[i]],
                         ids=lambda v: v if isinstance(v, str) else v[0])
def test_gemv_allocation_failure_raises(isa, case):
    scheme, n, k, m, kernel = case
    assert _every_allocation_fails_once(isa, scheme, n, k, m, kernel) >= 1


@needs_bf16_dot
@pytest.mark.parametrize("scheme,n,k,m,kernel,dtype", [
    ("int4wo-64", 70, 256, 3, "fxq512_int4t_bf16_gemv_x", torch.float32),   # fp32 x rounded in C, both buffers
    ("nf4", 33, 128, 2, "fxq512_lut4_bf16_gemv_x", torch.bfloat16),         # 64-byte chunk kernel
    ("nf4-32+dq", 9, 96, 1, "fxq512_lut4_bf16_gemv_x", torch.bfloat16),     # split halves
    ("int4wo-64", 70, 256, 130, "fxq512_int4t_bf16_gemm", torch.float32),   # grouped GEMM: packed x, group sums,
    ("int4wo-64", 70, 256, 130, "fxq512_int4t_bf16_gemm", torch.bfloat16),  # per-thread scratch; W-rounding one
    ("int8wo", 50, 384, 70, "fxq512_int8_bf16_gemm", torch.float32),
    ("nf4", 33, 128, 70, "fxq512_lut4_bf16_gemm", torch.bfloat16),
])
def test_bf16_kernel_allocation_failure_raises(scheme, n, k, m, kernel, dtype):
    assert _every_allocation_fails_once("avx512", scheme, n, k, m, kernel, dtype) >= 1


@needs_native
def test_status_of_a_layout_the_kernel_does_not_compute():
    """A kernel given arguments it does not compute returns FXQ_EARG instead of returning without
    writing (the 3-bit fpX kernel asked for 4 bits): the wrapper's error names it."""
    lib = native_cpu.kernels(native_cpu.isas()[0])
    if lib.isa != "avx512":
        pytest.skip("the AVX2 fpX kernel computes both widths")
    y = torch.empty(1, 1)
    x, codes, table, scale = torch.zeros(1, 8), torch.zeros(1, 4, dtype=torch.uint8), torch.zeros(16, dtype=torch.int8), \
        torch.ones(1, dtype=torch.bfloat16)
    st = lib.fxq_fpx_gemv(x.data_ptr(), 1, 8, codes.data_ptr(), 4, 1, 4, table.data_ptr(), scale.data_ptr(), 1.0,
                          y.data_ptr(), 1, 0, 1)
    with pytest.raises(ValueError, match="fxq512_fpx_gemv: status -2"):
        native_cpu._raise(st, lib.fxq_fpx_gemv, M=1, K=8, N=1, bits=4)
