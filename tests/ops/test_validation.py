"""Every ``torch.ops.fxquant.*`` op refuses arguments that do not fit its layout (x's K, a stored
tensor's dtype or shape, the bias) with a ValueError naming the op and the argument, in every impl:
eager CPU (through the dispatcher and the Autograd kernel), the reference, and the fake impl (static
and symbolic shapes); the native CPU wrappers refuse an x whose K is not the weight's."""
import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from fxquant.kernels import native_cpu
from fxquant.ops import bnb4, float8, fpx, int4wo, int8dq, int8wo, intx, onebit
from fxquant.schemes import parse_scheme

N, K = 24, 64
#: every op, and its layouts that differ in what is stored (axis 0 / 1, high plane, double quant, ...)
SCHEMES = ["int8wo", "int4wo-32", "uint3wo-32", "int6wo-16", "uint3wo-8-axis0", "nf4-64", "fp4-32+dq",
           "float8wo", "float8dq", "float8dq-row", "fp6_e3m2", "fp3_e1m1", "int8dq", "llm.int8", "onebit"]
DEFS = {d.name: d for d in (int8wo.OP, int4wo.OP, intx.OP, bnb4.OP, bnb4.OP_DQ, float8.OP_WO, float8.OP_DQ, fpx.OP,
                            int8dq.OP_INT8DQ, int8dq.OP_LLM_INT8, onebit.OP)}
#: another dtype for each stored dtype
OTHER_DTYPE = {torch.uint8: torch.int8, torch.int8: torch.uint8, torch.bfloat16: torch.float32,
               torch.float32: torch.bfloat16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}


def quantized(scheme: str, n: int = N, k: int = K):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
    return parse_scheme(scheme).quantize(w)


def run(impl: str, qw, x: torch.Tensor, tensors: dict | None = None, bias: torch.Tensor | None = None,
        **attrs) -> torch.Tensor:
    """Call the op of ``qw`` through ``impl``: "op" (dispatcher, CPU), "grad" (the Autograd kernel's
    autograd.Function), "reference", or "fake" (FakeTensorMode, static shapes)."""
    args = (x, *(tensors or qw.tensors).values(), bias)
    kwargs = {**qw.attrs, **attrs}
    if impl == "reference":
        return DEFS[qw.op].reference(*args, **kwargs)
    if impl == "fake":
        with FakeTensorMode() as mode:
            args = tuple(None if t is None else mode.from_tensor(t) for t in args)
            return getattr(torch.ops.fxquant, qw.op)(*args, **kwargs)
    if impl == "grad":
        args = (x.detach().requires_grad_(), *args[1:])
    return getattr(torch.ops.fxquant, qw.op)(*args, **kwargs)


IMPLS = ["op", "grad", "reference", "fake"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_valid_arguments_pass(scheme, impl):
    qw = quantized(scheme)
    y = run(impl, qw, torch.randn(3, K), bias=torch.randn(N))
    assert y.shape == (3, N)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("true_k", [K, 100])
@pytest.mark.parametrize("delta", ["K/2", "2K", "K-1", "K+1"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_k_raises(scheme, delta, true_k, impl):
    """K = 100 stores whole groups (int4wo-32: 128 columns): K - 1 and K + 1 fit the same storage, and
    the op's ``in_features`` still refuses them."""
    k = {"K/2": true_k // 2, "2K": 2 * true_k, "K-1": true_k - 1, "K+1": true_k + 1}[delta]
    qw = quantized(scheme, N, true_k)
    with pytest.raises(ValueError, match=rf"fxquant::{qw.op}: x has {k} input features .* in_features={true_k}"):
        run(impl, qw, torch.randn(3, k))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_bias_raises(scheme, impl):
    qw = quantized(scheme)
    for bias in (torch.randn(N + 1), torch.randn(N - 1), torch.randn(1, N), torch.zeros(N, dtype=torch.int32)):
        with pytest.raises(ValueError, match=rf"fxquant::{qw.op}: bias must be None or a floating-point tensor of "
                                             rf"shape \({N},\), got {bias.dtype} of shape"):
            run(impl, qw, torch.randn(3, K), bias=bias)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_stored_dtype_raises(scheme, impl):
    qw = quantized(scheme)
    for name, t in qw.tensors.items():
        bad = {**qw.tensors, name: t.to(OTHER_DTYPE[t.dtype])}
        with pytest.raises(ValueError, match=rf"fxquant::{qw.op}: {name} must be .*got {bad[name].dtype}"):
            run(impl, qw, torch.randn(3, K), tensors=bad)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_stored_shape_raises(scheme):
    """Any stored tensor one element short in its last dim is refused: by name when its shape is implied
    by the others and the scalars, else (it defines N or K itself) through the tensors or x it then
    disagrees with."""
    qw = quantized(scheme)
    for name, t in qw.tensors.items():
        if t.numel() < 2 or name in ("code_table", "absmax_code"):
            continue  # empty planes / offsets, scalar offsets; the tables: below
        bad = {**qw.tensors, name: t[..., :-1]}
        with pytest.raises(ValueError, match=rf"fxquant::{qw.op}: "):
            run("op", qw, torch.randn(3, K), tensors=bad)
    if "code_table" in qw.tensors:
        with pytest.raises(ValueError, match=r"code_table must be torch.float32 of shape \(16,\)"):
            run("op", qw, torch.randn(3, K), tensors={**qw.tensors, "code_table": qw.tensors["code_table"][:8]})


def _symbolic(mode: FakeTensorMode, t: torch.Tensor, name: str) -> torch.Tensor:
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())
    return mode.from_tensor(t, symbolic_context=ctx, source=ConstantSource(name))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_impl_checks_symbolic_k(scheme):
    """Under a ShapeEnv (torch.export / torch.compile) x's sizes are symbols: the right K records a
    guard on the symbol and gives ``[M, N]``; a wrong one raises the op's error."""
    qw = quantized(scheme)
    op = getattr(torch.ops.fxquant, qw.op)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    tensors = [mode.from_tensor(t, static_shapes=True) for t in qw.tensors.values()]
    good, bad = _symbolic(mode, torch.randn(5, K), "x"), _symbolic(mode, torch.randn(5, K + 1), "x_bad")
    with mode:
        y = op(good, *tensors, None, **qw.attrs)
        assert y.shape[1] == N and str(y.shape[0]) == str(good.shape[0])
        assert any(str(good.shape[1]) in str(g.expr) for g in env.guards)
        with pytest.raises(ValueError, match=rf"fxquant::{qw.op}: x has .* input features"):
            op(bad, *tensors, None, **qw.attrs)


def test_export_with_wrong_k_raises():
    """torch.export of a module calling an op with the wrong K fails with the op's message."""
    qw = quantized("int4wo-32")

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.fxquant.linear_int4wo(x, *qw.tensors.values(), None, **qw.attrs)

    dyn = {"x": {0: torch.export.Dim.AUTO}}
    assert torch.export.export(M(), (torch.randn(3, K),), dynamic_shapes=dyn).module()(torch.randn(2, K)).shape == (2, N)
    with pytest.raises(Exception, match=r"fxquant::linear_int4wo: x has 32 input features"):
        torch.export.export(M(), (torch.randn(3, K // 2),), dynamic_shapes=dyn)


# -- the native CPU wrappers ----------------------------------------------------------------------------
def _native_calls(k: int):
    """wrapper name -> a call of it with x of ``k`` columns against an N x K weight."""
    x = torch.randn(2, k)
    t4 = quantized("int4wo-32").tensors
    sz = t4["scales_and_zeros"]
    t3 = quantized("uint3wo-32").tensors
    a0 = quantized("uint4wo-8-axis0").tensors
    q8 = quantized("int8wo").tensors
    nf = quantized("nf4-32").tensors
    f3 = quantized("fp3_e1m1")
    ob = quantized("onebit").tensors
    tile = dict(block_n=64 if t4["qweight"].shape[0] % 64 == 0 else 32, out_features=N)
    return {
        "int8_gemv": lambda: native_cpu.int8_gemv(x, q8["qweight"], q8["scale"]),
        "int8_gemm": lambda: native_cpu.int8_gemm(x, q8["qweight"], q8["scale"]),
        "int4_tiled_gemv": lambda: native_cpu.int4_tiled_gemv(x, t4["qweight"], group_size=32, scale=sz[..., 0],
                                                             zero=sz[..., 1], **tile),
        "int4_tiled_gemv(3-bit plane)": lambda: native_cpu.int4_tiled_gemv(
            x, t3["codes_lo"], group_size=32, scale=t3["scale"], zero=t3["offset"], mid=4.0, plane_bits=3, **tile),
        "int4_gemm": lambda: native_cpu.int4_gemm(x, t4["qweight"], group_size=32, scale=sz[..., 0], zero=sz[..., 1],
                                                  **tile),
        "int4_tiled_axis0_gemv": lambda: native_cpu.int4_tiled_axis0_gemv(
            x, a0["codes_lo"], scale=a0["scale"], zero=a0["offset"], **tile),
        "lut4_gemv_x": lambda: native_cpu.lut4_gemv_x(x, nf["codes"], rows=N, row_bytes=K // 2, table=nf["code_table"],
                                                      block_bytes=16, scale=nf["absmax"]),
        "fpx_gemv": lambda: native_cpu.fpx_gemv(x, f3.tensors["qweight"], f3.tensors["scale"],
                                                fpx_table(f3), 3, K),
        "onebit_gemv": lambda: native_cpu.onebit_gemv(x, ob["sign_bits"], ob["a"], ob["b"]),
    }


def fpx_table(qw) -> torch.Tensor:
    from fxquant.formats import fpx as fmt

    return fmt.decode_table(qw.attrs["ebits"], qw.attrs["mbits"])


@pytest.mark.parametrize("wrapper", list(_native_calls(K)))
@pytest.mark.parametrize("k", [K // 2, 2 * K, K - 1, K + 1])
def test_native_wrappers_refuse_mismatched_k(wrapper, k):
    """Whether or not the kernels are built here: the check comes before the kernel is looked up."""
    with pytest.raises(ValueError, match=rf"native_cpu\.{wrapper.split('(')[0]}: "):
        _native_calls(k)[wrapper]()


@pytest.mark.skipif(not native_cpu.available(), reason=f"native kernels: {native_cpu.status()}")
@pytest.mark.parametrize("wrapper", list(_native_calls(K)))
def test_native_wrappers_accept_the_right_k(wrapper):
    y = _native_calls(K)[wrapper]()
    assert y is None or y.shape == (2, N)


@pytest.mark.parametrize("impl", ["op", "fake"])
@pytest.mark.parametrize("scheme,attr,value,match", [
    ("int4wo-32", "group_size", 48, r"group_size=48 is not supported; valid: 32, 64, 128, 256"),
    ("int4wo-32", "block_n", 24, r"block_n=24 is not supported; valid: an even divisor of 64"),
    ("int4wo-32", "in_features", K + 32, r"qweight must be torch.uint8 of shape \(64, 48\) \[Np, Kp/2\]"),
    ("int4wo-32", "out_features", -1, r"out_features=-1 is not supported; valid: an integer >= 0"),
    ("uint3wo-32", "bits", 9, r"bits=9 is not supported; valid: 1..8"),
    ("uint3wo-32", "axis", 2, r"axis=2 is not supported; valid: 0, 1"),
    ("uint3wo-32", "group_size", 0, r"group_size=0 is not supported; valid: an integer >= 1"),
    ("uint3wo-32", "in_features", K + 32, r"scale must be torch.bfloat16 of shape \(3, 24\) \[Kp/g, N\]"),
    ("uint3wo-8-axis0", "out_features", N + 8, r"scale must be torch.bfloat16 of shape \(4, 64\) \[ceil\(N/g\), K\]"),
    ("nf4-64", "blocksize", 48, r"blocksize=48 is not supported"),
    ("nf4-64", "in_features", K + 2, r"codes must be torch.uint8 of shape \(792,\)"),
    ("fp6_e3m2", "ebits", 6, r"ebits=6, mbits=2 is not supported"),
    ("fp6_e3m2", "in_features", K + 8, r"qweight must be torch.uint8 of shape \(24, 54\)"),
    ("float8dq", "granularity", "col", r"granularity='col' is not supported; valid: tensor, row"),
    ("llm.int8", "threshold", 0.0, r"threshold=0.0 is not supported; valid: a float > 0"),
])
def test_bad_scalars_raise(scheme, attr, value, match, impl):
    """A scalar outside its range, or one the stored tensors do not fit (in_features one group more),
    is named; the check runs in the fake impl too."""
    qw = quantized(scheme)
    with pytest.raises(ValueError, match=rf"fxquant::{qw.op}: {match}"):
        run(impl, qw, torch.randn(3, K), **{attr: value})
