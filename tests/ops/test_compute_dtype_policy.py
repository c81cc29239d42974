"""The CPU ``compute_dtype`` policy (``fxquant.ops._cpu.numerics``) holds on every path: results do
not change with the batch size, whatever path M selects.

``None`` with fp32 activations: on a CPU whose dense path is bf16 (``_cpu.dense_dtype()``) the
result is the fp32 reference on x rounded to bf16 once; on one without, the fp32 reference on x
itself; ops that quantize their activations (int8dq, LLM.int8, float8dq) never round them to bf16.
Compared at fp32-summation tolerance, far below bf16's rounding (2^-9 per element, ~1e-4 of the
bound here), so a path that skips or adds a bf16 rounding of x, of the weight or of the output
fails.  M = 1, 7, 16, 60, 300 cross every routing threshold (native GEMV limits 8-56 rows, packed
kernels 12-96, the large-M threshold 48 / 192, the native GEMMs' 256-row chunks)."""
import pytest
import torch

from helpers import assert_linear_close
from fxquant.ops import _cpu
from fxquant.schemes import parse_scheme

MS = (1, 7, 16, 60, 300)
#: bound on |y - ref| relative to |x| @ |W| (+ |ref|): fp32 sums of K = 256 products in another order,
#: and the per-group s·Σqx + (z - mid·s)·Σx forms; skipping x's bf16 rounding is ~100x above it
FP32_TOL = 4e-6
#: scheme, K: every family, each kernel layout (int4 tiles, sub-4-bit and 8-bit planes, axis 0,
#: NF4's inexact and FP4's exact tables, fpX 3 / 4 / 6 bits, odd K for int8wo's blocked path)
CASES = [("int8wo", 256), ("int8wo", 255), ("int4wo-64", 256), ("int4wo-32", 256), ("uint4wo-64", 256),
         ("uint3wo-32", 256), ("uint8wo-32", 256), ("int3wo-32-axis0", 256), ("uint4wo-32-axis0", 256),
         ("nf4-64", 256), ("nf4-64+dq", 256), ("fp4-64", 256), ("float8wo", 256), ("float8dq-row", 256),
         ("fp6_e3m2", 256), ("fp4_e2m1", 256), ("fp3_e1m1", 256), ("onebit", 256), ("int8dq", 256),
         ("llm.int8-4.5", 256)]
DYNAMIC = ("linear_int8dq", "linear_llm_int8", "linear_float8dq")
N = 96  # a partial second 64-row tile; axis-0 groups of up to 32 rows


def _defs():
    from fxquant.ops import bnb4, float8, fpx, int4wo, int8dq, int8wo, intx, onebit

    return {d.name: d for d in (int8wo.OP, int4wo.OP, intx.OP, bnb4.OP, bnb4.OP_DQ, float8.OP_WO, float8.OP_DQ,
                                fpx.OP, onebit.OP, int8dq.OP_INT8DQ, int8dq.OP_LLM_INT8)}


def _case(scheme: str, k: int):
    gen = torch.Generator().manual_seed(k)
    qw = parse_scheme(scheme).quantize(torch.randn(N, k, generator=gen) * 0.05 + 0.01)
    x = torch.randn(max(MS), k, generator=gen) + 0.3  # non-zero group sums: zero points matter
    if qw.op == "linear_llm_int8":
        x[:, 3] *= 40  # an outlier column
    opdef = _defs()[qw.op]
    w = opdef.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    return qw, getattr(torch.ops.fxquant, qw.op), opdef, x, w


def _run(op, qw, x, **kw):
    return op(x, *qw.tensors.values(), None, **qw.attrs, **kw)


def _check_all_m(scheme: str, k: int, round_x: bool, **kw) -> None:
    """At every M: the op against the fp32 reference on x (rounded to bf16 first when ``round_x``,
    unless the op quantizes x itself), and the rows of each M against those of the largest."""
    qw, op, opdef, x, w = _case(scheme, k)
    rounds = round_x and qw.op not in DYNAMIC
    xv = x.to(torch.bfloat16).float() if rounds else x
    full = _run(op, qw, x, **kw)
    for m in MS:
        y = full if m == max(MS) else _run(op, qw, x[:m], **kw)
        r = opdef.reference(xv[:m], *qw.tensors.values(), None, **qw.attrs)
        assert y.dtype == torch.float32 and y.shape == (m, N)
        try:
            assert_linear_close(y, r, xv[:m], w, FP32_TOL)
            if qw.op != "linear_llm_int8":  # its outlier columns are those of the whole batch
                assert_linear_close(y, full[:m], xv[:m], w, 2 * FP32_TOL)
        except AssertionError as e:
            raise AssertionError(f"{scheme} K={k} M={m} {kw}: {e}") from None


@pytest.mark.parametrize("scheme,k", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_none_fp32_x_is_rounded_once_on_every_path(scheme, k):
    """``compute_dtype=None``, fp32 x, this CPU: rounded to bf16 once where the dense path is bf16."""
    _check_all_m(scheme, k, round_x=_cpu.dense_dtype() == torch.bfloat16)


@pytest.mark.parametrize("scheme,k", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_float32_compute_never_rounds(scheme, k):
    _check_all_m(scheme, k, round_x=False, compute_dtype=torch.float32)


@pytest.fixture
def no_fast_bf16(monkeypatch):
    """This CPU seen as one without fast bf16 (dense fp32): ``dense_dtype`` and the thresholds it
    decides, both cached, replaced and cleared."""
    _cpu.large_m_threshold.cache_clear()
    monkeypatch.setattr(_cpu, "dense_dtype", lambda: torch.float32)
    yield
    _cpu.large_m_threshold.cache_clear()


@pytest.mark.parametrize("scheme,k", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_none_without_fast_bf16_never_rounds(scheme, k, no_fast_bf16):
    assert _cpu.large_m_threshold() == 192
    _check_all_m(scheme, k, round_x=False)


@pytest.mark.parametrize("scheme,k", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_none_fp16_x_is_never_rounded_to_bf16(scheme, k):
    """fp16 activations: fp32 arithmetic on their values, the result rounded to fp16 once, so nearly
    every output equals the reference's fp16 result (bf16-rounded x would move most of them by
    several fp16 ulps) and none is more than one ulp away."""
    qw, op, opdef, x, w = _case(scheme, k)
    xh = x.half()
    for m in MS:
        y = _run(op, qw, xh[:m])
        r = opdef.reference(xh[:m], *qw.tensors.values(), None, **qw.attrs)
        assert y.dtype == torch.float16
        # one fp16 ulp (2^-24 at least: subnormals), plus the fp32 sums' difference where outputs cancel
        ulp = 2.0 ** (torch.frexp(r.float())[1] - 11).float().clamp(min=-24)
        err = (y.float() - r.float()).abs()
        slack = ulp + FP32_TOL * (xh[:m].float().abs() @ w.abs().t())
        assert (err <= slack).all(), f"{scheme} M={m}: {(err - slack).max().item():.3g} above"
        assert (err == 0).float().mean() >= 0.9, f"{scheme} M={m}: {(err == 0).float().mean().item():.2f} equal"


@pytest.mark.parametrize("scheme,k", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_bfloat16_compute_rounds_every_path(scheme, k):
    """``compute_dtype=bfloat16``: every path on bf16 values of x, within bf16 rounding of the bf16
    reference (which also rounds the weight and the output)."""
    qw, op, opdef, x, w = _case(scheme, k)
    for m in MS:
        y = _run(op, qw, x[:m], compute_dtype=torch.bfloat16)
        r = opdef.reference(x[:m], *qw.tensors.values(), None, **qw.attrs, compute_dtype=torch.bfloat16)
        assert_linear_close(y, r, x[:m], w, 2**-7)
