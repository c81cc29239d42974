"""linear_int8dq / linear_llm_int8: CPU paths vs the references, the CPU integer-GEMM engines,
opcheck, autograd, compute_dtype, the bitsandbytes oracle, and torch.export with static shapes."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.library import opcheck

from helpers import FAST_PATH_TOL, rel
from fxquant.formats import int8dq as fmt
from fxquant.ops import _cpu
from fxquant.ops import int8dq as op

DTYPES = [torch.float32, torch.bfloat16]
THRESHOLD = 6.0


def weights(n, k, seed=0):
    return fmt.quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05)


def activations(*shape, seed=0, outlier_cols=()):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    for c in outlier_cols:  # LLM.int8's premise: a few input features are large in some tokens
        if c < shape[-1]:
            x[..., 0, c] = 20.0 * (1 + c % 3)
    return x


OPS = {
    "int8dq": (lambda x, q, s, b, **kw: torch.ops.fxquant.linear_int8dq(x, q, s, b, **kw),
               lambda x, q, s, b, **kw: op.reference_int8dq(x, q, s, bias=b, **kw)),
    "llm.int8": (lambda x, q, s, b, **kw: torch.ops.fxquant.linear_llm_int8(x, q, s, b, THRESHOLD, **kw),
                 lambda x, q, s, b, **kw: op.reference_llm_int8(x, q, s, bias=b, threshold=THRESHOLD, **kw)),
}


@pytest.mark.parametrize("name", OPS)
@given(m=st.integers(1, 40), n=st.integers(1, 64), k=st.sampled_from([1, 7, 8, 33, 64, 130, 1024, 1025]),
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans(), lead=st.sampled_from([(), (2,), (1, 3)]),
       seed=st.integers(0, 999))
def test_op_matches_reference(name, m, n, k, dtype, with_bias, lead, seed):
    run, ref = OPS[name]
    q, s = weights(n, k, seed)
    x = activations(*lead, m, k, seed=seed + 1, outlier_cols=(0, 5, k - 1)).to(dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype) if with_bias else None
    y, r = run(x, q, s, b), ref(x, q, s, b)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert rel(y, r) < FAST_PATH_TOL[dtype]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
def test_large_m_path_matches_reference(name, dtype, monkeypatch):
    monkeypatch.setattr(_cpu, "large_m_threshold", lambda: 8)
    run, ref = OPS[name]
    q, s = weights(48, 96)
    x = activations(2, 9, 96, outlier_cols=(3,)).to(dtype)
    b = torch.randn(48).to(dtype)
    assert rel(run(x, q, s, b), ref(x, q, s, b)) < FAST_PATH_TOL[dtype]


# -- the CPU integer GEMM engines -----------------------------------------------------------------
def extreme_codes(m, n, k, seed=0):
    """Codes at +-127 in long runs: every u8 x s8 pair sum of a shifted GEMM overflows int16."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    a[:, : k // 2], b[: n // 2, : k // 2] = 127, -127
    return a, b


@pytest.mark.parametrize("m", [1, 3, 9, 64])
@pytest.mark.parametrize("k", [64, 100, 136, 1040])
def test_cpu_int8_matmul_engines(m, k):
    a, b = extreme_codes(m, 80, k)
    exact = fmt.int8_matmul(a, b).float()
    got = op.cpu_int8_matmul(a, b)
    if m <= op.INT8PACK_MAX_M and _cpu.int8pack_k_ok(k):
        assert rel(got, exact) < 2**-8
    else:  # oneDNN (when its probe passed) or the chunked fp32 product: the integers, up to the fp32
        # rounding of oneDNN's shifted sum sum((a + 128) * b) before its zero-point compensation
        # (AMX: off by 1 at K=1040 here; VNNI and the chunked product: exact)
        shifted = (a.float().abs() + 128) @ b.float().abs().T
        assert torch.all((got - exact).abs() <= shifted * 2**-23)
    s = torch.rand(80).to(torch.bfloat16) + 0.5
    assert rel(op.cpu_int8_matmul(a, b, s), exact * s.float()) < 2**-8


def test_onednn_split_is_exact_where_shifted_saturates():
    if op.onednn_mode() is None:
        pytest.skip("no oneDNN int8 GEMM in this build")
    a, b = extreme_codes(17, 64, 512)
    packed = torch.ops.onednn.qlinear_prepack(b, None)
    exact = fmt.int8_matmul(a, b).float()
    assert torch.equal(op._onednn_matmul(a, packed, "split"), exact)
    if op.onednn_mode() == "split":  # this CPU has no VNNI: the one-GEMM form is wrong here
        assert not torch.equal(op._onednn_matmul(a, packed, "shifted"), exact)


def test_fallback_without_onednn(monkeypatch):
    monkeypatch.setattr(op, "onednn_mode", lambda: None)
    a, b = extreme_codes(20, 16, 64)
    assert torch.equal(op.cpu_int8_matmul(a, b), fmt.int8_matmul(a, b).float())


def test_packed_weight_cache(monkeypatch):
    if op.onednn_mode() is None:
        pytest.skip("no oneDNN int8 GEMM in this build")
    calls = []
    prepack = torch.ops.onednn.qlinear_prepack
    monkeypatch.setattr(op, "_prepack", lambda w: calls.append(1) or prepack(w, None))
    a, b = extreme_codes(20, 16, 64)
    op.cpu_int8_matmul(a, b)
    op.cpu_int8_matmul(a, b)
    assert len(calls) == 1
    b.neg_()  # in place: the packed copy is stale
    assert torch.equal(op.cpu_int8_matmul(a, b), fmt.int8_matmul(a, b).float())
    assert len(calls) == 2
    key = id(b)
    del b
    assert key not in op._PACKED


# -- op contract -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(name, dtype, with_bias):
    q, s = weights(24, 40)
    x = activations(2, 5, 40, outlier_cols=(7,)).to(dtype).requires_grad_()
    b = torch.randn(24, dtype=dtype) if with_bias else None
    if name == "int8dq":
        opcheck(torch.ops.fxquant.linear_int8dq.default, (x, q, s, b))
    else:
        opcheck(torch.ops.fxquant.linear_llm_int8.default, (x, q, s, b, THRESHOLD))


@pytest.mark.parametrize("name", OPS)
def test_backward_is_gradient_of_dequantized_linear(name):
    run, _ = OPS[name]
    q, s = weights(16, 64, 5)
    x = activations(3, 64, outlier_cols=(2,)).requires_grad_()
    b = torch.randn(16, requires_grad=True)
    gy = torch.randn(3, 16)
    run(x, q, s, b).backward(gy)
    assert torch.allclose(x.grad, gy @ fmt.dequantize_weight(q, s), atol=1e-4)
    assert torch.allclose(b.grad, gy.sum(0), atol=1e-5)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtype_is_honoured(name, cd):
    """compute_dtype sets the float parts; the integer product is the same exact one."""
    run, ref = OPS[name]
    q, s = weights(24, 64, 7)
    x = activations(3, 64, outlier_cols=(1,))
    y = run(x, q, s, None, compute_dtype=cd)
    assert rel(y, ref(x, q, s, None, compute_dtype=cd)) < (1e-6 if cd == torch.float32 else 1e-2)
    assert rel(y, ref(x, q, s, None)) < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[cd]


# -- what the formats are for --------------------------------------------------------------------
def test_llm_int8_without_outliers_is_int8dq():
    q, s = weights(32, 128)
    x = activations(5, 128)  # |x| < 6 everywhere
    assert torch.equal(op.reference_llm_int8(x, q, s, bias=None, threshold=THRESHOLD),
                       op.reference_int8dq(x, q, s, bias=None))


def test_outliers_are_what_llm_int8_fixes():
    """With a few large input features, per-token int8 loses the small ones; LLM.int8 does not."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = fmt.quantize_weight(w)
    x = activations(8, 256, outlier_cols=(3, 77, 200))
    x[:, (3, 77, 200)] = 60.0
    exact = F.linear(x, fmt.dequantize_weight(q, s))
    e_dq = rel(op.reference_int8dq(x, q, s, bias=None), exact)
    e_llm = rel(op.reference_llm_int8(x, q, s, bias=None, threshold=THRESHOLD), exact)
    assert e_llm < 0.01 < e_dq and e_llm < e_dq / 4


def test_llm_int8_matches_bitsandbytes_linear8bitlt():
    """Oracle: bitsandbytes' Linear8bitLt(threshold=6) (eval mode, CPU) holding fxquant's codes."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s = fmt.quantize_weight(w)
    m = bnb.nn.Linear8bitLt(256, 48, bias=False, has_fp16_weights=False, threshold=THRESHOLD)
    m.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    m = m.to("cpu").eval()  # in training mode it dequantizes the weight instead (MatMul8bitFp)
    m.weight.data.copy_(q)  # same weight codes and scales (bnb keeps absmax = 127 * scale)
    m.weight.SCB.copy_(s.float() * 127)
    x = activations(6, 256, outlier_cols=(3, 100)).half()  # bnb quantizes fp16 activations
    with torch.no_grad():
        theirs = m(x)
    ours = torch.ops.fxquant.linear_llm_int8(x, q, s, None, THRESHOLD)
    exact = x.float() @ w.t()
    # same algorithm: the two differ by fp16 rounding and codes one apart at near-ties, far less
    # than either differs from the float product (measured 0.0013 vs 0.0051)
    assert rel(ours, theirs) < 0.5 * rel(ours, exact)
    assert rel(ours, exact) < 0.01 < rel(op.reference_int8dq(x, q, s, bias=None), exact)


# -- static shapes under torch.export -------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, k=64, n=32):
        super().__init__()
        q, s = weights(n, k)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)

    def forward(self, x):
        return torch.ops.fxquant.linear_llm_int8(x, self.qweight, self.scale, None, THRESHOLD) * 2


def _assert_no_unbacked(ep):
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        for v in vals:
            if isinstance(v, torch.Tensor):
                assert not free_unbacked_symbols(v), f"{node.format_node()} has data-dependent shape {v.shape}"
    assert not any(str(s).startswith("u") for s in ep.range_constraints), ep.range_constraints


def test_llm_int8_export_has_no_data_dependent_shapes():
    """The issue's test: LLM.int8 exported with torch.export, dynamic batch and sequence, no
    unbacked symbols; the exported program runs at other shapes with and without outliers."""
    mod = _Block()
    x = activations(2, 8, 64, outlier_cols=(3,))
    dims = {"x": {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=4096)}}
    ep = torch.export.export(mod, (x,), dynamic_shapes=dims)
    _assert_no_unbacked(ep)
    assert sum(n.target == torch.ops.fxquant.linear_llm_int8.default for n in ep.graph.nodes) == 1
    for shape, cols in [((1, 1, 64), ()), ((3, 5, 64), (1, 2, 60)), ((2, 8, 64), (3,))]:
        xi = activations(*shape, seed=len(cols), outlier_cols=cols)
        assert torch.equal(ep.module()(xi), mod(xi))


def test_llm_int8_reference_exports_without_data_dependent_shapes():
    """The reference itself (masks, no gathers) traces with static shapes too."""
    q, s = weights(32, 64)

    class Ref(torch.nn.Module):
        def forward(self, x):
            return op.reference_llm_int8(x, q, s, bias=None, threshold=THRESHOLD)

    x = activations(4, 64, outlier_cols=(3,))
    ep = torch.export.export(Ref(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("m", max=1024)}})
    _assert_no_unbacked(ep)
    for m in (1, 7):
        xi = activations(m, 64, seed=m, outlier_cols=(m,))
        assert torch.equal(ep.module()(xi), Ref()(xi))


def test_torch_compile_fullgraph_mixing_formats():
    """fxquant.compile with int8dq, llm.int8 and int8wo layers, then torch.compile(fullgraph=True)
    with dynamic shapes: one graph, same numbers as eager, at several batch sizes."""
    import fxquant

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96),
                                torch.nn.ReLU(), torch.nn.Linear(96, 32)).eval()
    spec = fxquant.Spec(rules={"0": "int8dq", "2": "llm.int8-4.5", "4": "int8wo"})
    qm = fxquant.compile(model, spec, (torch.randn(4, 64),))
    schemes = [r.scheme for r in fxquant.report(qm).rows]
    assert schemes == ["int8dq", "llm.int8-4.5", "int8wo"]
    compiled = torch.compile(qm, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m in (4, 1, 7):
            x = activations(m, 64, seed=m, outlier_cols=(5,))
            assert rel(compiled(x), qm(x)) < 1e-6
            assert rel(qm(x), model(x)) < 0.03
