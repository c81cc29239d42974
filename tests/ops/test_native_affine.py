"""The native affine GEMV (fxquant/kernels/native_affine.c) of every instruction set against float64
``x @ W.T`` on the reference's weight, and the ``compute_dtype`` policy of ``linear_affine`` /
``linear_affine_perm`` across the M that select the native and the blocked paths."""
import pytest
import torch

from fxquant.kernels import native_affine, native_build, native_cpu
from fxquant.ops import _cpu
from fxquant.ops import affine as affine_op
from fxquant.ops import affine_perm
from fxquant.schemes import parse_scheme
from helpers import assert_linear_close

ISAS = native_cpu.isas()
pytestmark = pytest.mark.skipif(not ISAS, reason=f"native kernels unavailable: {native_cpu.status()}")

SCHEMES = ["affine4-g32-fp16", "affine4-g128", "affine4-ch-sym", "affine4-g7", "affine8-ch-fp16", "affine8-g64-sym",
           "affine3-g16", "affine2-g8-sym", "affine5-g7-fp32", "affine6-g32-fp16", "affine7-ch"]
SHAPES = [(5, 33), (64, 128), (33, 256), (3, 64), (1, 1), (6, 576), (3, 160)]  # 576, 160: a partial last group of 4-bit g128 / g64


def layer(scheme: str, n: int, k: int, seed: int = 0):
    qw = parse_scheme(scheme).quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    t, a = qw.tensors, qw.attrs
    return t, a, affine_op.dequantize_weight(*t.values(), **a)


def close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, tol: float = 1e-6) -> None:
    """|y - x @ W.T| <= tol * |x| @ |W|.T elementwise (float64 reference): fp32 sums in another order."""
    ref = x.double() @ w.double().T
    bound = tol * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all(), ((y.double() - ref).abs() / bound).max().item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_gemv_is_the_reference_weight_times_x(isa, scheme):
    ks = native_cpu.kernels(isa)
    for i, (n, k) in enumerate(SHAPES):
        t, a, w = layer(scheme, n, k, i)
        zero = None if a["symmetric"] else t["zero_point"]
        for m in (1, 3, 4, 5, 9):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = native_affine.affine_gemv(x, t["qweight"], t["scale"].float(), zero, bits=a["bits"],
                                          group_size=a["group_size"], kernels=ks)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            close(y, x, w)
            yr = native_affine.affine_gemv(x, t["qweight"], t["scale"].float(), zero, bits=a["bits"],
                                           group_size=a["group_size"], round_x=True, kernels=ks)
            close(yr, x.to(torch.bfloat16).float(), w)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_and_fp16_activations(isa):
    t, a, w = layer("affine4-g32-fp16", 40, 96)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 96).to(dtype)
        y = native_affine.affine_gemv(x, t["qweight"], t["scale"].float(), t["zero_point"], bits=4, group_size=32,
                                      kernels=native_cpu.kernels(isa))
        close(y, x.float(), w)


def test_a_mismatched_x_is_refused():
    t, a, _ = layer("affine4-g32-fp16", 8, 64)
    with pytest.raises(ValueError, match=r"native_cpu.affine_gemv: .* are not the 4-bit affine layout of K=32"):
        native_affine.affine_gemv(torch.randn(1, 32), t["qweight"], t["scale"].float(), t["zero_point"], bits=4,
                                  group_size=32)
    with pytest.raises(ValueError, match="affine_gemv"):
        native_affine.affine_gemv(torch.randn(1, 64), t["qweight"], t["scale"], t["zero_point"], bits=4, group_size=32)


MS = (1, 7, 16, 33, 60, 300)  # the native GEMV up to affine.NATIVE_MAX_ROWS, then the blocked path


def _op_case(scheme: str, permuted: bool, k: int = 256, n: int = 96):
    gen = torch.Generator().manual_seed(k)
    qw = parse_scheme(scheme).quantize(torch.randn(n, k, generator=gen) * 0.05 + 0.01)
    t, a = qw.tensors, qw.attrs
    if permuted:
        perm = torch.randperm(k, generator=gen).to(torch.int32)
        qw = affine_perm.packed(t["qweight"], t["scale"], None if a["symmetric"] else t["zero_point"], perm,
                                bits=a["bits"], group_size=a["group_size"], symmetric=a["symmetric"], n=n, k=k)
    opdef = affine_perm.OP if permuted else affine_op.OP
    x = torch.randn(max(MS), k, generator=gen) + 0.3
    return qw, opdef, getattr(torch.ops.fxquant, qw.op), x, opdef.dequantized(qw.tensors, {**qw.attrs,
                                                                                              "compute_dtype": None})


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("scheme", ["affine4-g32-fp16", "affine3-g64", "affine8-ch-sym-fp32"])
@pytest.mark.parametrize("cd", [None, torch.float32])
def test_policy_holds_on_every_path(scheme, permuted, cd):
    """compute_dtype None: fp32 x rounded to bf16 once where the dense path is bf16, at every M;
    float32: never rounded.  fp32 sums in another order only (tolerance as tests/ops/test_compute_dtype_policy)."""
    qw, opdef, op, x, w = _op_case(scheme, permuted)
    rounds = cd is None and _cpu.numerics(torch.float32, None).round_x
    xv = x.to(torch.bfloat16).float() if rounds else x
    full = op(x, *qw.tensors.values(), None, **qw.attrs, compute_dtype=cd)
    for m in MS:
        y = op(x[:m], *qw.tensors.values(), None, **qw.attrs, compute_dtype=cd)
        r = opdef.reference(xv[:m], *qw.tensors.values(), None, **qw.attrs)
        assert_linear_close(y, r, xv[:m], w, 4e-6)
        assert_linear_close(y, full[:m], xv[:m], w, 8e-6)


def test_without_the_native_library_the_blocked_path_runs(monkeypatch):
    qw, opdef, op, x, w = _op_case("affine4-g32-fp16", False)
    want = op(x[:3], *qw.tensors.values(), None, **qw.attrs)
    monkeypatch.setattr(native_build, "_lib", lambda: None)
    assert native_affine.affine_gemv(x[:3], qw.tensors["qweight"], qw.tensors["scale"].float(),
                                     qw.tensors["zero_point"], bits=4, group_size=32) is None
    assert_linear_close(op(x[:3], *qw.tensors.values(), None, **qw.attrs), want, x[:3], w, 8e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_a_failed_allocation_raises_and_writes_nothing(isa):
    ks = native_cpu.fault_injection_kernels(isa)
    t, a, _ = layer("affine4-g32-fp16", 8, 64)
    ks.fail_alloc(1)
    try:
        with pytest.raises(MemoryError, match="fxq.*affine_gemv: allocation failed"):
            native_affine.affine_gemv(torch.randn(2, 64), t["qweight"], t["scale"].float(), t["zero_point"], bits=4,
                                      group_size=32, round_x=True, kernels=ks)
    finally:
        ks.fail_alloc(0)
