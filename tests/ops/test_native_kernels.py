"""fxquant's native CPU GEMV kernels (``fxquant/kernels/native_cpu.c``), through the ops that use
them at small M, against each op's plain-torch reference (the oracle); which M takes them; and
what happens when they cannot be built or are turned off."""
import contextlib
import math
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_linear_close, intx_code_part, policy_x
from fxquant.formats import int4
from fxquant.kernels import native_build, native_cpu
from fxquant.ops import _cpu, bnb4, fpx, int4wo, int8wo, intx, onebit
from fxquant.schemes import parse_scheme

# the native large-M kernels are what these test, through the Python routing to each library (which they
# spy on or swap; the C++ entry, which calls the loaded kernels directly: test_native_entry.py)
pytestmark = pytest.mark.usefixtures("no_amx", "python_kernels")

needs_native = pytest.mark.skipif(not native_cpu.available(), reason=f"native kernels: {native_cpu.status()}")
#: every instruction set whose kernels run here (AVX-512 and AVX2 on an AVX-512 CPU): the
#: correctness tests run each, since a CPU without AVX-512 only ever runs the AVX2 ones
each_isa = pytest.mark.parametrize("isa", native_cpu.isas() or ["none"])


@contextmanager
def using(isa: str):
    """Route the ops to the kernels of ``isa`` (the ops look ``native_build._lib`` up at call time)."""
    real = native_build._lib
    native_build._lib = lambda: native_cpu.kernels(isa)
    try:
        yield
    finally:
        native_build._lib = real

#: op name -> (its reference, the module whose NATIVE_MAX_ROWS applies, the native wrapper it calls)
OPS = {
    "linear_int8wo": (int8wo.reference, int8wo, "int8_gemv"),
    "linear_int4wo": (int4wo.reference, int4wo, "int4_tiled_gemv"),
    "linear_intx": (intx.reference, intx, "int4_tiled_gemv"),
    "linear_bnb4": (bnb4.reference, bnb4, "lut4_gemv_x"),
    "linear_bnb4_dq": (bnb4.reference_dq, bnb4, "lut4_gemv_x"),
    "linear_fpx": (fpx.reference, fpx, "lut4_gemv"),  # 3-bit codes: fpx_gemv (see wrapper_of)
    "linear_onebit": (onebit.reference, onebit, "onebit_gemv"),
}
#: scheme -> what K must be a multiple of (group / block edges are where kernels have tails)
SCHEMES = {
    "int8wo": 1, "int4wo-32": 32, "int4wo-128": 128, "uint4wo-16": 16, "int4wo-48-axis1": 48,
    "uint1wo-8": 8, "uint2wo-16": 16, "uint3wo-32": 32, "int3wo-16": 16, "uint5wo-32": 32,
    "uint8wo-16": 16, "nf4": 64, "nf4-32+dq": 32, "fp4-128": 128, "fp4-64+dq": 64,
    "fp4_e2m1": 1, "fp4_e1m2": 1, "fp4_e3m0": 1, "fp3_e1m1": 1, "fp3_e2m0": 1, "onebit": 1,
}
#: fp32 activations: products exact (fp32, or bf16 values where the compute_dtype policy rounds x:
#: :func:`policy_x`), so the only difference from the reference on those values is the order of an
#: fp32 sum (and int4/intx's per-group s·Σqx + (z - mid·s)·Σx): a dot-product rounding bound far
#: below any bf16 path's
FP32_TOL, BF16_TOL = 2e-6, 2**-7


def wrapper_of(qw) -> str:
    if qw.op == "linear_fpx" and 1 + qw.attrs["ebits"] + qw.attrs["mbits"] == 3:
        return "fpx_gemv"
    return OPS[qw.op][2]


def takes_bf16_dot(qw) -> bool:
    """Whether this weight's native kernel has a bf16 dot-product form here (4-bit int4 tiles of 64
    rows, 4-bit table codes, axis-0 tiles of 64 rows and even K) under the active ISA: the form that
    runs on bf16 values (bf16 x, or fp32 x the policy rounds)."""
    lib = native_cpu._lib()
    if lib is None or getattr(lib, "fxq512_int4t_bf16_gemv", None) is None:
        return False
    if qw.op in ("linear_bnb4", "linear_bnb4_dq", "linear_fpx"):  # fpx: 4-bit table and 3-bit plane kernels
        return True
    if qw.op not in ("linear_int4wo", "linear_intx"):
        return False
    a = qw.attrs
    if a.get("axis", 1) == 0:  # 64-row tiles and even K: A = scale * x rounded to bf16 (fxq512_int4t_axis0_gemv)
        return a["block_n"] == 64 and qw.tensors["scale"].shape[1] % 2 == 0
    bits = 4 if qw.op == "linear_int4wo" else a["bits"]
    return a["block_n"] == 64 and a["group_size"] % 2 == 0 and bits >= 4


@contextmanager
def spy(name: str):
    """Count calls of ``native_cpu.<name>`` (the ops look it up on the module at call time)."""
    real, calls = getattr(native_cpu, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(native_cpu, name, counted)
    try:
        yield calls
    finally:
        setattr(native_cpu, name, real)


def quantized(scheme: str, n: int, k: int, seed: int):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1 + 0.02
    qw = parse_scheme(scheme).quantize(w)
    return qw, getattr(torch.ops.fxquant, qw.op)


@contextlib.contextmanager
def native_route(op_name: str):
    """int4wo sends bf16 x to int4pack on CPUs without the bf16 dot kernel (``int4wo.native_row_limit``);
    here the GEMV is under test, so it takes its own rows."""
    if op_name != "linear_int4wo":
        yield
        return
    real = int4wo.native_row_limit
    int4wo.native_row_limit = lambda x2, nm, block_n=None: real(x2, nm)
    try:
        yield
    finally:
        int4wo.native_row_limit = real


def takes_lut4_gemm(qw, m: int, dtype: torch.dtype) -> bool:
    """Whether bnb4's op runs the native large-M GEMM on these rows here (bf16 x from its row threshold,
    AVX512-BF16 under the active ISA, pieces of at least 32 elements) instead of the GEMV."""
    lib = native_cpu._lib()
    return (qw.op.startswith("linear_bnb4") and dtype == torch.bfloat16 and m >= bnb4.NATIVE_GEMM_MIN_ROWS
            and lib is not None and getattr(lib, "fxq512_lut4_bf16_gemm", None) is not None
            and math.gcd(qw.attrs["in_features"], qw.attrs["blocksize"]) >= 32)


def check(scheme: str, n: int, k: int, m: int, dtype: torch.dtype, with_bias: bool, seed: int = 0) -> None:
    qw, op = quantized(scheme, n, k, seed)
    reference, module, _ = OPS[qw.op]
    wrapper = "lut4_gemm" if takes_lut4_gemm(qw, m, dtype) else wrapper_of(qw)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, k, generator=gen) + 0.3).to(dtype)  # non-zero group sums: zero points matter
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    args = tuple(qw.tensors.values())
    with spy(wrapper) as calls, native_route(qw.op):
        y = op(x, *args, bias, **qw.attrs)
    assert calls, f"{scheme} M={m}: the native kernel was not called"
    r = reference(policy_x(x), *args, bias, **qw.attrs)
    w = module.OP_DQ.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None}) if qw.op.endswith("_dq") \
        else module.OP.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    assert y.shape == r.shape == (m, n) and y.dtype == dtype
    # fp32 x: exact products on every kernel (the policy's rounding of x is in r); bf16 x: a bf16 output
    assert_linear_close(y, r, x, w, FP32_TOL if dtype == torch.float32 else BF16_TOL, bias)


@needs_native
@each_isa
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_op_matches_reference(isa, scheme, data):
    """Every format with a native kernel, over M up to its limit, odd N, K at block edges and inside
    a partial last block (int4wo / intx: the group padded; bnb4: a block straddling rows, in pieces of
    at least NATIVE_MIN_PIECE), fp32/bf16."""
    mult = SCHEMES[scheme]
    op_name = parse_scheme(scheme).quantize(torch.randn(2, mult * 64)).op
    _, module, _ = OPS[op_name]
    m = data.draw(st.integers(1, module.NATIVE_MAX_ROWS), label="M")
    n = data.draw(st.integers(1, 80), label="N")
    k = mult * data.draw(st.integers(1, max(1, 320 // mult)), label="K / multiple")
    if op_name in ("linear_int4wo", "linear_intx"):
        k -= data.draw(st.integers(0, mult - 1), label="K short of whole groups")
    elif op_name.startswith("linear_bnb4") and k > mult:
        k -= bnb4.NATIVE_MIN_PIECE * data.draw(st.integers(0, mult // bnb4.NATIVE_MIN_PIECE - 1), label="pieces")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    with using(isa):
        check(scheme, n, k, m, dtype, data.draw(st.booleans(), label="bias"), seed=data.draw(st.integers(0, 99)))


@needs_native
@pytest.mark.parametrize("scheme,n,k", [
    ("int8wo", 37, 4099),          # K not a multiple of 16: the scalar tail
    ("int4wo-256", 130, 512),      # 130 rows: a partial last tile of 32
    ("uint1wo-32", 40, 96),        # 2 tiles: shard chunk boundaries fall inside groups (slow path)
    ("uint3wo-32", 40, 96),
    ("uint2wo-32", 200, 1056),
    ("nf4-64+dq", 300, 1024),      # > 256 blocks: several nested absmax blocks per row range
    ("fp4_e2m1", 9, 36),           # K not a multiple of 8: padded codes
    ("fp3_e1m1", 9, 300),          # runs of the 1-bit plane with remainders
    ("onebit", 33, 77),            # K not a multiple of 8 (or 32): the byte tail
])
@each_isa
def test_edge_shapes(isa, scheme, n, k):
    qw, _ = quantized(scheme, 2, k, 0)
    with using(isa):
        for m in sorted({1, min(5, OPS[qw.op][1].NATIVE_MAX_ROWS)}):  # 5: a full 4-row tile + 1
            check(scheme, n, k, m, torch.float32, with_bias=True)


@needs_native
@each_isa
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_intx_and_int4wo_read_foreign_tile_heights(isa, bits):
    """Weights packed for another CPU's tile height (64 here when the native one is 32, and the
    reverse) go through the native kernel at small M, not the warning path."""
    other = 64 if int4.native_cpu_block_n() != 64 else 32
    w = torch.randn(72, 256, generator=torch.Generator().manual_seed(bits))
    from fxquant.formats import intx as intx_fmt
    stored = intx_fmt.to_storage(w, bits, 64, False, 1, other)
    attrs = dict(bits=bits, group_size=64, symmetric=False, axis=1, block_n=other, out_features=72, in_features=256)
    x = torch.randn(2, 256)
    with spy("int4_tiled_gemv") as calls, using(isa):
        y = torch.ops.fxquant.linear_intx(x, *stored.values(), None, **attrs)
    assert calls
    r = intx.reference(policy_x(x), *stored.values(), None, **attrs)
    assert_linear_close(y, r, x, intx.dequantize_weight(*stored.values(), **attrs), FP32_TOL)
    if bits == 4:
        st4 = int4.to_storage(w, 64, other)
        with using(isa):
            y4 = torch.ops.fxquant.linear_int4wo(x, st4["qweight"], st4["scales_and_zeros"], None, 64, other, 72, 256)
        assert_linear_close(y4, r, x, intx.dequantize_weight(*stored.values(), **attrs), FP32_TOL)


@needs_native
@pytest.mark.parametrize("scheme", ["int8wo", "int4wo-64", "uint2wo-32", "nf4", "fp3_e1m1", "onebit"])
def test_routing_by_rows(scheme):
    """The native kernel runs from 1 to its row limit and not above; both sides are the reference on
    the policy's x (fp32 activations: exact products and fp32 sums on either side)."""
    qw, op = quantized(scheme, 48, 128, 0)
    reference, module, _ = OPS[qw.op]
    wrapper = wrapper_of(qw)
    args = tuple(qw.tensors.values())
    x1 = torch.randn(1, 128)
    nm = _cpu.numerics(x1.dtype, None)
    limit = (module.native_row_limit(x1, nm) if qw.op == "linear_int4wo" else
             module.native_max_rows(x1, qw.attrs["bits"], nm) if qw.op == "linear_intx" else
             module.native_row_limit(nm) if qw.op in ("linear_int8wo", "linear_onebit") else module.NATIVE_MAX_ROWS)
    for m, native in ((1, True), (limit, True), (limit + 1, False)):
        x = torch.randn(m, 128)
        with spy(wrapper) as calls:
            y = op(x, *args, None, **qw.attrs)
        assert bool(calls) == native, (scheme, m)
        r = reference(policy_x(x), *args, None, **qw.attrs)
        assert ((y - r).norm() / r.norm()).item() < 1e-5, (scheme, m)


@needs_native
def test_compile_fullgraph_and_opcheck_at_m1():
    qw, op = quantized("int4wo-32", 40, 96, 3)
    args = tuple(qw.tensors.values())

    class Layer(torch.nn.Module):
        def forward(self, x):
            return op(x, *args, None, **qw.attrs)

    x = torch.randn(1, 96)
    eager = Layer()(x)
    torch._dynamo.reset()
    compiled = torch.compile(Layer(), fullgraph=True)(x)
    assert torch.equal(compiled, eager)  # same kernel, same inputs
    torch.library.opcheck(op.default, (torch.randn(1, 96), *args, torch.randn(40)), qw.attrs)


@needs_native
def test_isa_selection():
    """The widest instruction set by default, AVX2 when FXQUANT_NATIVE_ISA=avx2 asks; asking
    :func:`kernels` for one that does not run here names the ones that do."""
    assert native_cpu.isa() == native_cpu.isas()[0] and "avx2" in native_cpu.isas()
    with pytest.raises(ValueError, match="avx2"):
        native_cpu.kernels("sse2")
    out = _run("from fxquant.kernels import native_cpu; print(native_cpu.isa())", FXQUANT_NATIVE_ISA="avx2")
    assert out.returncode == 0 and out.stdout.strip() == "avx2", out.stderr


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


_OP_STILL_WORKS = """
    import torch, fxquant
    from fxquant.formats import int8
    from fxquant.kernels import native_cpu
    from fxquant.ops import int8wo
    q, s = int8.quantize(torch.randn(24, 40))
    x = torch.randn(1, 40)
    y = torch.ops.fxquant.linear_int8wo(x, q, s, None)
    r = int8wo.reference(x, q, s, None)
    assert ((y - r).norm() / r.norm()).item() < 2e-2
    print(native_cpu.available(), "|", native_cpu.status())
"""


def test_disabled_by_env_keeps_the_aten_path():
    out = _run(_OP_STILL_WORKS, FXQUANT_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False | disabled by FXQUANT_NATIVE=0"


def test_no_compiler_warns_and_keeps_the_aten_path(tmp_path):
    out = _run(_OP_STILL_WORKS, CC=str(tmp_path / "no-such-cc"), FXQUANT_CACHE_DIR=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    available, status = out.stdout.strip().split(" | ")
    assert available == "False" and status.startswith("build failed")
    assert "native CPU kernels unavailable" in out.stderr


@needs_native
def test_built_once_then_loaded_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _run(_OP_STILL_WORKS, FXQUANT_CACHE_DIR=str(cache))
    assert first.returncode == 0 and first.stdout.strip() == "True | loaded", first.stderr
    (lib,) = cache.glob("fxquant_native_*.so")
    stamp = lib.stat().st_mtime_ns
    second = _run(_OP_STILL_WORKS, FXQUANT_CACHE_DIR=str(cache))
    assert second.returncode == 0 and second.stdout.strip() == "True | loaded", second.stderr
    assert list(cache.glob("fxquant_native_*.so")) == [lib] and lib.stat().st_mtime_ns == stamp


@needs_native
def test_unwritable_cache_dir_falls_back_to_a_private_temp_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    (tmp_path / "tmp").mkdir()
    out = _run(_OP_STILL_WORKS, FXQUANT_CACHE_DIR=str(blocker / "cache"), TMPDIR=str(tmp_path / "tmp"))
    assert out.returncode == 0 and out.stdout.strip() == "True | loaded", out.stderr
    assert list((tmp_path / "tmp").glob(f"fxquant-{os.getuid()}/fxquant_native_*.so"))


needs_bf16_dot = pytest.mark.skipif(not native_cpu.has_bf16_dot(), reason="no AVX512-BF16 dot-product kernels here")


@needs_bf16_dot
@pytest.mark.parametrize("scheme", ["int4wo-32", "int4wo-128", "uint4wo-64", "int4wo-256"])
@pytest.mark.parametrize("m,n", [(1, 130), (3, 64), (5, 200), (17, 72), (int4wo.NATIVE_MAX_ROWS_BF16DOT, 40)])
def test_int4_bf16_dot_kernel_is_the_reference_on_bf16_x(scheme, m, n):
    """bf16 activations take the bf16 dot-product kernel: its products of bf16 codes and bf16 x are
    exact, so against the fp32 reference on the same bf16 x only the fp32 summation order differs
    (the fp32 bound, not the bf16 one), at M up to its limit and a partial last tile."""
    qw, op = quantized(scheme, n, 256, m)
    x = (torch.randn(m, 256, generator=torch.Generator().manual_seed(m)) + 0.3).to(torch.bfloat16)
    args = tuple(qw.tensors.values())
    with spy("int4_tiled_gemv") as calls:
        y = op(x, *args, None, **qw.attrs)
    assert calls and y.dtype == torch.bfloat16
    t = qw.tensors
    kw = dict(block_n=qw.attrs["block_n"], group_size=qw.attrs["group_size"], out_features=qw.attrs["out_features"])
    if qw.op == "linear_int4wo":
        kw.update(scale=t["scales_and_zeros"][..., 0], zero=t["scales_and_zeros"][..., 1])
        y32 = native_cpu.int4_tiled_gemv(x, t["qweight"], **kw)
    else:
        kw.update(scale=t["scale"], zero=t["offset"] if t["offset"].numel() else None, mid=8.0)
        y32 = native_cpu.int4_tiled_gemv(x, t["codes_lo"], **kw)
    assert y32.dtype == torch.float32  # the kernel's fp32 result; the op's is it rounded once
    assert torch.equal(y, y32.to(torch.bfloat16))
    r = OPS[qw.op][0](x.float(), *args, None, **qw.attrs)  # fp32 result on the same bf16 x
    w = OPS[qw.op][1].OP.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    assert_linear_close(y32, r, x, w, FP32_TOL)


@needs_bf16_dot
@pytest.mark.parametrize("m,n,k,group", [(5, 130, 256, 32), (40, 64, 128, 128), (33, 300, 512, 64),
                                         (29, 70, 1536, 256), (native_cpu.GEMM_ROWS + 17, 100, 1024, 128)])
@pytest.mark.parametrize("exact", [True, False])
def test_int4_gemm_kernel_against_exact_products(m, n, k, group, exact):
    """The large-M int4 GEMM (tile chunks decoded inside it) against float64 products of the same
    bf16 x and the reference's dequant (``exact``: the grouped form, codes exact and each group's
    scale and offset applied in fp32; else the weight rounded once to bf16), across partial tiles, x
    blocks of 14 rows, k chunks (1024), groups that straddle them and the wrapper's row chunks; x =
    identity rows returns W.T (each output one product: bit for bit the bf16 weight, or W to fp32
    rounding)."""
    gen = torch.Generator().manual_seed(m + n + k)
    st_ = int4.to_storage(torch.randn(n, k, generator=gen), group, 64)
    sz = st_["scales_and_zeros"]
    kw = dict(block_n=64, group_size=group, scale=sz[..., 0], zero=sz[..., 1], out_features=n, exact=exact)
    w32 = int4.from_storage(st_["qweight"], sz, group, 64, n, k)
    want = w32 if exact else w32.to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    y = native_cpu.int4_gemm(x, st_["qweight"], **kw)  # fp32 x: the fp32 result
    xb = x.to(torch.bfloat16).double()
    products, size = xb @ want.double().t(), xb.abs() @ want.double().abs().t()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert ((y.double() - products).abs() <= (2e-6 if exact else 1e-5) * size).all()
    yb = native_cpu.int4_gemm(x.to(torch.bfloat16), st_["qweight"], **kw)  # bf16 x: rounded to bf16
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    eye = torch.eye(k, dtype=torch.bfloat16)[: min(k, 300)]
    got = native_cpu.int4_gemm(eye, st_["qweight"], **kw)
    if exact:
        torch.testing.assert_close(native_cpu.int4_gemm(eye.float(), st_["qweight"], **kw), w32.t()[: eye.shape[0]],
                                   rtol=2**-20, atol=1e-6)
    else:
        assert torch.equal(got, want.t()[: eye.shape[0]])


def check_route(scheme: str, n: int, k: int, m: int, wrapper: str, dtype: torch.dtype = torch.float32) -> None:
    """The op at ``m`` rows runs ``native_cpu.<wrapper>`` and gives the reference within bf16 rounding."""
    qw, op = quantized(scheme, n, k, 3)
    reference, module, _ = OPS[qw.op]
    args = tuple(qw.tensors.values())
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    with spy(wrapper) as calls:
        y = op(x, *args, None, **qw.attrs)
    assert calls
    op_def = module.OP_DQ if qw.op.endswith("_dq") else module.OP
    w = op_def.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    # fp32 x: exact products on the policy's values; bf16 x: a bf16 result (and weight, on the GEMMs)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert_linear_close(y, reference(policy_x(x), *args, None, **qw.attrs), x, w, tol)


@needs_bf16_dot
def test_int4wo_large_m_takes_the_native_gemm():
    """Above the packed kernels' rows, int4wo runs the native GEMM that decodes tiles inside it."""
    m = max(int4wo.packed_max_rows(), int4wo.NATIVE_MAX_ROWS_BF16DOT) + 8
    check_route("int4wo-128", 200, 512, m, "int4_gemm", torch.bfloat16)


@needs_bf16_dot
@pytest.mark.parametrize("scheme,n,k", [("nf4", 200, 512), ("fp4-128", 70, 576), ("nf4-64+dq", 45, 1152)])
def test_nf4_large_m_takes_the_native_gemm(scheme, n, k):
    """Above the GEMV's rows, NF4 / FP4 on bf16 x run the native GEMM that decodes the table codes
    inside it (blocks straddling rows at K=576, blocksize 128: pieces of 64; double-quant absmax
    decoded first); the reference within bf16. fp32 x with compute_dtype None (fp32 exact) does not."""
    from fxquant.ops import bnb4

    check_route(scheme, n, k, bnb4.NATIVE_GEMM_MIN_ROWS + 3, "lut4_gemm", torch.bfloat16)
    qw, op = quantized(scheme, n, k, 3)
    with spy("lut4_gemm") as calls:
        op(torch.randn(40, k), *qw.tensors.values(), None, **qw.attrs)
    assert not calls


@needs_bf16_dot
@pytest.mark.parametrize("m,n,k,piece", [(17, 15, 64, 64), (33, 29, 1088, 64), (70, 45, 2048, 128), (40, 1009, 1152, 64),
                                         (native_cpu.GEMM_ROWS + 44, 14, 96, 32), (20, 30, 2560, 512)])
def test_lut4_gemm_kernel_against_exact_products(m, n, k, piece):
    """The large-M 4-bit table GEMM against float64 products of the same bf16 x and the weight it
    multiplies, ``bf16(table[code] * scale[piece])`` (rounded once): fp32 output off only by fp32
    summation, bf16 output rounded once more; across panel, x-block, k-chunk (1024) and piece edges, and
    the wrapper's row chunks; a piece below 32 or not dividing K is not taken."""
    gen = torch.Generator().manual_seed(m * n + k)
    codes = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen)
    table = torch.randn(16, generator=gen)
    scale = torch.rand(n * k // piece, generator=gen) + 0.5
    hi, lo = (codes >> 4).long(), (codes & 15).long()
    idx = torch.stack([hi, lo], 1).reshape(n, k)
    w = (table[idx] * scale.repeat_interleave(piece).reshape(n, k)).to(torch.bfloat16)  # fp32 product, rounded once
    x = torch.randn(m, k, generator=gen)
    xb = x.to(torch.bfloat16)
    exact = xb.double() @ w.double().t()
    size = xb.double().abs() @ w.double().abs().t()
    y = native_cpu.lut4_gemm(x, codes, rows=n, table=table, scale=scale, piece=piece)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert ((y.double() - exact).abs() <= 1e-5 * size + 1e-30).all()
    yb = native_cpu.lut4_gemm(xb, codes, rows=n, table=table, scale=scale, piece=piece)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    small = scale.repeat_interleave(piece // 16)  # pieces of 16 elements: below a 32-element unit
    assert native_cpu.lut4_gemm(x, codes, rows=n, table=table, scale=small, piece=16) is None
    with pytest.raises(ValueError, match="lut4_gemm"):
        native_cpu.lut4_gemm(x, codes[:-1], rows=n, table=table, scale=scale, piece=piece)


@needs_bf16_dot
@pytest.mark.parametrize("scheme,wrapper", [("int4wo-128", "int4_gemm"), ("uint4wo-64", "int4_gemm"),
                                            ("int8wo", "int8_gemm"), ("nf4", "lut4_gemm")])
def test_with_amx_large_m_dequantizes_for_the_dense_gemm(scheme, wrapper, monkeypatch):
    """With AMX (oneDNN's bf16 GEMM ~9x the native GEMMs there), large M skips the native
    decode-in-GEMM kernels for blocked dequantize + dense GEMM; same result within bf16."""
    monkeypatch.setattr(_cpu, "amx", lambda: True)
    qw, op = quantized(scheme, 130, 512, 3)
    reference, module, _ = OPS[qw.op]
    args = tuple(qw.tensors.values())
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with spy(wrapper) as calls:
        y = op(x, *args, None, **qw.attrs)
    assert not calls
    w = module.OP.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    assert_linear_close(y, reference(policy_x(x), *args, None, **qw.attrs), x, w, BF16_TOL)


@needs_bf16_dot
@pytest.mark.parametrize("scheme", ["uint4wo-64", "int4wo-48-axis1", "uint4wo-16"])
def test_intx_4bit_large_m_takes_the_native_gemm(scheme):
    """4-bit intx along axis 1 stores int4wo's tiles: above the GEMV's rows it runs the same native
    GEMM (zero point or none, groups that straddle its k chunks), the reference within bf16."""
    x1 = torch.empty(1, 1152)
    check_route(scheme, 130, 1152, intx.native_max_rows(x1, 4, _cpu.numerics(x1.dtype, None)) + 9, "int4_gemm")


@needs_native
@each_isa
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (70, 129), (130, 256)])
def test_int8_decoder_is_exact_in_bf16(isa, n, k):
    """int8wo's large-M decoder writes the codes as bf16 rows, bit for bit what torch's conversion
    gives (every int8 is exact in bf16), for any block of rows, and rejects a wrong buffer."""
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n * k))
    with using(isa):
        decode = native_cpu.int8_decoder(q)
        for r0, r1 in ((0, n), (n // 2, n), (0, max(1, n // 3))):
            out = torch.full((r1 - r0, k), float("nan"), dtype=torch.bfloat16)
            decode(r0, r1, out)
            assert torch.equal(out, q[r0:r1].to(torch.bfloat16))
        with pytest.raises(ValueError, match="contiguous bf16"):
            decode(0, n, torch.empty(n, k, dtype=torch.float32))


@needs_native
@each_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,cols,block", [(1, 24, 8), (3, 40, 8), (5, 96, 32), (2, 1000, 8)])
def test_lut4_whole_x_is_the_split_halves(isa, dtype, m, cols, block):
    """lut4_gemv_x (x whole; with the bf16 dot-product kernel split and rounded in C) gives bit for
    bit what lut4_gemv gives on the two strided halves torch makes, for widths that leave partial
    16-lane tails (not whole 64-byte chunks: those take the chunk kernel, tested below), contiguous
    or not."""
    gen = torch.Generator().manual_seed(m * cols)
    codes = torch.randint(0, 256, (7 * cols,), dtype=torch.uint8, generator=gen)
    table = torch.randn(16, generator=gen)
    scale = torch.rand(7 * cols // block, generator=gen) + 0.5
    kw = dict(rows=7, row_bytes=cols, table=table, block_bytes=block, scale=scale)
    x = torch.randn(m, 2 * cols, generator=gen).to(dtype)
    with using(isa):
        want = native_cpu.lut4_gemv(x[:, 0::2], x[:, 1::2], codes, **kw)
        assert torch.equal(native_cpu.lut4_gemv_x(x, codes, **kw), want)
        wide = torch.randn(m, 4 * cols, generator=gen).to(dtype)[:, : 2 * cols]  # rows not contiguous
        assert torch.equal(native_cpu.lut4_gemv_x(wide, codes, **kw),
                           native_cpu.lut4_gemv(wide[:, 0::2], wide[:, 1::2], codes, **kw))


@needs_bf16_dot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,rows,cols,block", [(1, 7, 64, 32), (3, 5, 128, 32), (5, 9, 192, 64), (4, 3, 256, 128),
                                               (16, 11, 2048, 32), (2, 33, 512, 256)])
def test_lut4_chunk_kernel_against_exact_products(dtype, m, rows, cols, block):
    """The 64-byte-chunk table kernel (rows of whole chunks, 32-byte or 64-byte-multiple blocks)
    against float64 products of the same bf16 x and the bf16-rounded table: bf16 products are exact
    in fp32, so only the fp32 summation differs; every code value, both nibbles, each block's own
    scale, several rows of x per tile and a partial last tile."""
    gen = torch.Generator().manual_seed(m * rows + cols)
    codes = torch.randint(0, 256, (rows * cols,), dtype=torch.uint8, generator=gen)
    table = torch.randn(16, generator=gen)
    scale = torch.rand(rows * cols // block, generator=gen) + 0.5
    x = torch.randn(m, 2 * cols, generator=gen).to(dtype)
    y = native_cpu.lut4_gemv_x(x, codes, rows=rows, row_bytes=cols, table=table, block_bytes=block, scale=scale,
                               round_x=True)  # fp32 x: rounded to bf16 in C
    hi, lo = (codes >> 4).long(), (codes & 15).long()
    tb = table.to(torch.bfloat16).double()
    w = torch.stack([tb[hi], tb[lo]], dim=1).reshape(rows, 2 * cols)  # first code in the high nibble
    w = w * scale.double().repeat_interleave(2 * block).reshape(rows, 2 * cols)
    xb = x.to(torch.bfloat16).double()
    exact, size = xb @ w.t(), xb.abs() @ w.abs().t()
    assert y.shape == (m, rows) and ((y.double() - exact).abs() <= 1e-6 * size + 1e-30).all()


@needs_bf16_dot
@pytest.mark.parametrize("m,n,k", [(1, 1, 2), (31, 15, 66), (33, 29, 1026), (70, 14, 2050), (64, 43, 4096),
                                   (native_cpu.GEMM_ROWS + 44, 45, 130), (40, 1009, 1090)])
def test_int8_gemm_kernel_against_exact_products(m, n, k):
    """The large-M int8 GEMM (weight panels decoded inside it) against float64 products of the same
    bf16 x and codes: its fp32 output is off only by fp32 summation, its bf16 output by one more
    rounding (bf16 x: bf16 out); across weight-panel edges (14 rows), x-block edges (32 rows), k-chunk edges (1024)
    and the wrapper's row chunks, with strided and fp32 x; (40, 1009, 1090): blocks of several panels, each
    chunk decoded during the previous one's products (a last panel of one row, chunks ending in 2 codes)."""
    gen = torch.Generator().manual_seed(m * n + k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(m, 2 * k, generator=gen)[:, ::2]  # strided rows: the wrapper makes them contiguous
    xb = x.to(torch.bfloat16)
    exact = (xb.double() @ q.double().t()) * scale.double()
    size = (xb.double().abs() @ q.double().abs().t()) * scale.double()
    y = native_cpu.int8_gemm(x, q, scale)  # fp32 x: the fp32 result
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert ((y.double() - exact).abs() <= 1e-5 * size).all()
    yb = native_cpu.int8_gemm(xb, q, scale)  # bf16 x: rounded once more, to bf16
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y.to(torch.bfloat16))
    xc, rs = xb.contiguous(), scale.float()
    y32 = torch.full((m, n), float("nan"))
    assert native_cpu._lib().fxq512_int8_bf16_gemm(xc.data_ptr(), m, k, k, q.data_ptr(), n, rs.data_ptr(),
                                                   y32.data_ptr(), n, 0, 1) == 0
    assert ((y32.double() - exact).abs() <= 1e-5 * size).all()
    eye = torch.eye(k, dtype=torch.bfloat16)[: min(k, 300)]  # each output one exact product, rounded once
    assert torch.equal(native_cpu.int8_gemm(eye, q, scale), (q.float() * scale.float()[:, None]).t()[: eye.shape[0]].bfloat16())
    assert native_cpu.int8_gemm(x[:, :-1], q[:, :-1].contiguous(), scale) is None  # odd K


@needs_bf16_dot
@pytest.mark.parametrize("k,wrapper,dtype", [(384, "int8_gemm", torch.float32), (384, "int8_gemm", torch.bfloat16),
                                             (385, "int8_decoder", torch.bfloat16)])
def test_int8wo_large_m_takes_the_native_gemm(k, wrapper, dtype):
    """Above the packed kernels' rows, int8wo runs the native GEMM that decodes weight panels inside
    it (even K; fp32 x: exact products, fp32 result) or, for bf16 x, converts rows of codes natively
    into the bf16 GEMM's buffer (odd K); either is the reference on the policy's x."""
    check_route("int8wo", 150, k, int8wo.packed_max_rows() + 5, wrapper, dtype)


needs_avx512 = pytest.mark.skipif("avx512" not in native_cpu.isas(), reason="no AVX-512 kernels here")


@needs_avx512
@pytest.mark.parametrize("scheme", ["uint3wo-128-axis0", "uint1wo-16-axis0", "uint2wo-32-axis0", "int3wo-32-axis0",
                                    "uint4wo-64-axis0", "int4wo-16-axis0", "uint5wo-16-axis0", "uint8wo-32-axis0"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_intx_axis0_kernel_matches_reference(scheme, data):
    """Axis-0 intx (groups of rows n % R, R = ceil(N/g), a scale per column) at small M takes the
    AVX-512 axis-0 GEMV: with AVX512-BF16, 64-row tiles and even K its bf16 dot-product form (scale *
    x rounded to bf16, exact products, fp32 sums: the bf16 bound), otherwise fp32 products and sums
    (the fp32 bound), for periods R that do and do not divide the tile height or N (partial groups),
    partial last tiles, K at 2 (mod 16) edges, M up to the routing limit, fp32/bf16 x."""
    g = int(scheme.split("-")[1])
    n = max(1, g * data.draw(st.integers(1, 7), label="N / g") - data.draw(st.integers(0, g - 1), label="N short"))
    bits = int(scheme.split("wo")[0][-1])
    # odd K only where every plane is 4-bit (sub-4-bit planes with odd K keep the dequantize path)
    k = data.draw(st.integers(1, 300), label="K") if bits in (4, 8) else 2 * data.draw(st.integers(1, 150), label="K/2")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    qw, op = quantized(scheme, n, k, data.draw(st.integers(0, 99), label="seed"))
    limit = intx.native_max_rows_axis0(torch.empty(1, k, dtype=dtype), qw.attrs["block_n"], bits,
                                       _cpu.numerics(dtype, None))
    m = data.draw(st.one_of(st.integers(1, limit), st.just(limit)), label="M")  # up to the routing limit
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)) + 0.3).to(dtype)
    args = tuple(qw.tensors.values())
    with using("avx512"), spy("int4_tiled_axis0_gemv") as calls:
        y = op(x, *args, None, **qw.attrs)
    assert calls
    r = intx.reference(policy_x(x), *args, None, **qw.attrs)
    w = intx.OP.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    assert y.dtype == dtype
    if dtype == torch.bfloat16 and takes_bf16_dot(qw):
        # the bf16 form (bf16 x only: fp32-exact results take the fp32 form) rounds A = scale * x, so
        # the bound is relative to the code part (q - mid) * scale of the weight too, not only to W
        w = w.abs() + intx_code_part(qw.tensors, qw.attrs).abs()
    assert_linear_close(y, r, x, w, FP32_TOL if dtype == torch.float32 else BF16_TOL)


@needs_avx512
def test_intx_axis0_kernel_large_shape_and_shard_boundaries():
    """A shape where the 3-bit planes' shard chunks end inside a tile's column range (the per-load
    path), against the reference: 11 tiles of 64 rows, K = 200; odd K with sub-4-bit codes keeps the
    dequantize path (still the reference's result)."""
    qw, op = quantized("uint3wo-64-axis0", 64 * 11, 200, 3)
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(5))
    args = tuple(qw.tensors.values())
    with using("avx512"), spy("int4_tiled_axis0_gemv") as calls:
        y = op(x, *args, None, **qw.attrs)
    assert calls
    r = intx.reference(policy_x(x), *args, None, **qw.attrs)
    w = intx.OP.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    assert_linear_close(y, r, x, w, FP32_TOL)  # fp32 x: the fp32 form on the policy's x
    qw, op = quantized("uint3wo-16-axis0", 48, 33, 1)
    x = torch.randn(1, 33, generator=torch.Generator().manual_seed(6))
    args = tuple(qw.tensors.values())
    with using("avx512"), spy("int4_tiled_axis0_gemv") as calls:
        y = op(x, *args, None, **qw.attrs)
    torch.testing.assert_close(y, intx.reference(policy_x(x), *args, None, **qw.attrs), rtol=1e-5, atol=1e-5)
