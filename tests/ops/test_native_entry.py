"""The C++ op entry (fxquant/kernels/native_entry.cpp): where it takes a call it computes exactly what
the Python CPU kernel computes (the same C kernel: bit for bit), it is taken only where the Python
routing would call that kernel, and everything else (gradients, bad input, other dtypes, padded
layouts, fake tensors, inference mode) keeps the Python kernels' behaviour."""
import pytest
import torch

from helpers import Spy, assert_linear_close
from fxquant.formats import bnb4 as bnb4_fmt
from fxquant.formats import int4, int8
from fxquant.kernels import native_affine, native_cpu, native_entry
from fxquant.ops import affine, bnb4, int4wo, int8dq, int8wo

pytestmark = pytest.mark.skipif(not native_entry.ensure(), reason=f"C++ entry: {native_entry.status()}")

BF16_TOL = 2**-7


def int4_op(n, k, group=128, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + seed))
    st = int4.to_storage(w, group, 64)
    args = (st["qweight"], st["scales_and_zeros"])
    attrs = dict(group_size=group, block_n=64, out_features=n, in_features=k)
    return torch.ops.fxquant.linear_int4wo.default, args, attrs, int4wo.OP, (native_cpu, "int4_tiled_gemv")


def int8_op(n, k, seed=0):
    q, s = int8.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + seed)))
    return torch.ops.fxquant.linear_int8wo.default, (q, s), {}, int8wo.OP, (native_cpu, "int8_gemv")


def int8dq_op(n, k, seed=0):
    q, s = int8.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + seed)))
    return torch.ops.fxquant.linear_int8dq.default, (q, s), {}, int8dq.OP_INT8DQ, (native_cpu, "int8_gemv")


def affine_op(n, k, seed=0, scheme="affine4-g32"):
    from fxquant.schemes import parse_scheme

    qw = parse_scheme(scheme).quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + seed)))
    return (torch.ops.fxquant.linear_affine.default, tuple(qw.tensors.values()), dict(qw.attrs), affine.OP,
            (native_affine, "affine_gemv"))


def nf4_op(n, k, blocksize=64, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + seed))
    args = tuple(bnb4_fmt.to_storage(w, "nf4", blocksize, double_quant=False).values())
    attrs = dict(blocksize=blocksize, out_features=n, in_features=k)
    return torch.ops.fxquant.linear_bnb4.default, args, attrs, bnb4.OP, (native_cpu, "lut4_gemv_x")


def nf4_dq_op(n, k, blocksize=64, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + seed))
    st = bnb4_fmt.to_storage(w, "nf4", blocksize, double_quant=True)
    args = tuple(st[t] for t in bnb4.OP_DQ.tensors)
    attrs = dict(blocksize=blocksize, absmax_blocksize=bnb4_fmt.NESTED_BLOCKSIZE, out_features=n, in_features=k)
    return torch.ops.fxquant.linear_bnb4_dq.default, args, attrs, bnb4.OP_DQ, (native_cpu, "lut4_gemv_x")


OPS = {"int4wo": int4_op, "int8wo": int8_op, "int8dq": int8dq_op, "nf4": nf4_op, "nf4+dq": nf4_dq_op,
       "affine": affine_op,  # GPTQ / AWQ / compressed-tensors checkpoints' layout; symmetric, 3-bit fp16 scales:
       "affine-sym": lambda n, k, seed=0: affine_op(n, k, seed, "affine4-g32-sym"),
       "affine3-fp16": lambda n, k, seed=0: affine_op(n, k, seed, "affine3-g16-fp16")}
_FAMILY = {"int4wo": "int4", "int8wo": "int8", "int8dq": "int8dq", "affine": "affine", "affine-sym": "affine",
           "affine3-fp16": "affine", "nf4": "lut4", "nf4+dq": "lut4"}
ROWS = {name: native_entry.row_limits()[family] for name, family in _FAMILY.items()}


def run(op, x, args, bias, attrs, python=False):
    if python:
        with native_entry.disabled():
            return op(x, *args, bias, **attrs)
    return op(x, *args, bias, **attrs)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 1), ("max",), (1, "max")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_same_bits_as_the_python_kernel_and_python_wrapper_skipped(name, shape, with_bias, monkeypatch):
    n, k = 200, 512
    op, args, attrs, od, spy_at = OPS[name](n, k)
    shape = tuple(ROWS[name] if d == "max" else d for d in shape)
    x = torch.randn(*shape, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    spy = Spy(monkeypatch, *spy_at)
    y = run(op, x, args, bias, attrs)
    assert len(spy.calls) == 0, "the C++ entry did not take a call it covers"
    y_py = run(op, x, args, bias, attrs, python=True)
    assert len(spy.calls) == 1
    assert y.dtype == torch.bfloat16 and y.shape == (*shape, n)
    assert torch.equal(y, y_py)
    ref = od.reference(x, *args, bias, **attrs)
    w = od.dequantized(dict(zip(od.tensors, args)), {**attrs, "compute_dtype": None})
    assert_linear_close(y, ref, x, w, BF16_TOL, bias)


def _python_takes(op, x, args, bias, attrs, spy_at, monkeypatch, raises=None):
    """The call goes to the Python kernels (the spied wrapper runs, or the Python check raises) and
    gives what they give with the entry off."""
    spy = Spy(monkeypatch, *spy_at)
    if raises is not None:
        with pytest.raises(raises) as on:
            run(op, x, args, bias, attrs)
        with pytest.raises(raises) as off:
            run(op, x, args, bias, attrs, python=True)
        assert str(on.value) == str(off.value)
        return
    y = run(op, x, args, bias, attrs)
    assert len(spy.calls) == 1
    assert torch.equal(y, run(op, x, args, bias, attrs, python=True))


@pytest.mark.parametrize("name", OPS)
def test_other_activations_take_the_python_kernels(name, monkeypatch):
    """fp32 x, more rows than the GEMV's, a non-contiguous x, compute_dtype set."""
    n, k = 96, 256
    op, args, attrs, _, spy_at = OPS[name](n, k)
    x = torch.randn(2, k)
    _python_takes(op, x, args, None, attrs, spy_at, monkeypatch)
    xt = torch.randn(k, 2).to(torch.bfloat16).t()
    _python_takes(op, xt, args, None, attrs, spy_at, monkeypatch)
    _python_takes(op, x.to(torch.bfloat16), args, None, {**attrs, "compute_dtype": torch.float32}, spy_at,
                  monkeypatch)
    y = run(op, torch.randn(ROWS[name] + 1, k).to(torch.bfloat16), args, None, attrs)
    assert y.shape == (ROWS[name] + 1, n)


@pytest.mark.parametrize("k", [576, 100])
def test_int4wo_partial_last_group(k, monkeypatch):
    """K not a multiple of the group (576, 100 at g128): x zero-padded to the stored width in C++, the
    same bits as the Python path's padding."""
    op, args, attrs, od, spy_at = int4_op(72, k)
    x = torch.randn(2, 3, k).to(torch.bfloat16)
    bias = torch.randn(72).to(torch.bfloat16)
    spy = Spy(monkeypatch, *spy_at)
    y = run(op, x, args, bias, attrs)
    assert len(spy.calls) == 0
    assert torch.equal(y, run(op, x, args, bias, attrs, python=True)) and len(spy.calls) == 1
    w = od.dequantized(dict(zip(od.tensors, args)), {**attrs, "compute_dtype": None})
    assert_linear_close(y, od.reference(x, *args, bias, **attrs), x, w, BF16_TOL, bias)


def test_straddling_blocks_take_the_python_kernels(monkeypatch):
    """nf4 with blocks straddling rows (K = 576 at blocksize 128): the Python path's piece scales."""
    op, args, attrs, _, spy_at = nf4_op(64, 576, blocksize=128)
    _python_takes(op, torch.randn(1, 576).to(torch.bfloat16), args, None, attrs, spy_at, monkeypatch)


@pytest.mark.parametrize("name", OPS)
def test_bad_input_raises_the_python_check(name, monkeypatch):
    """x with the wrong K (K/2 and 2K), a bias of the wrong length: the Python check's ValueError."""
    n, k = 64, 256
    op, args, attrs, _, spy_at = OPS[name](n, k)
    for kk in (k // 2, 2 * k):
        _python_takes(op, torch.randn(1, kk).to(torch.bfloat16), args, None, attrs, spy_at, monkeypatch,
                      raises=ValueError)
    _python_takes(op, torch.randn(1, k).to(torch.bfloat16), args, torch.randn(n + 1).to(torch.bfloat16), attrs,
                  spy_at, monkeypatch, raises=ValueError)


@pytest.mark.parametrize("name", OPS)
def test_gradients_go_through_the_autograd_twin(name):
    """x requiring grad: the autograd Function (dx = grad @ W), the same forward values."""
    n, k = 48, 128
    op, args, attrs, od, _ = OPS[name](n, k)
    x = torch.randn(2, k).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(n).to(torch.bfloat16).requires_grad_()
    y = op(x, *args, bias, **attrs)
    assert y.grad_fn is not None
    g = torch.randn_like(y)
    y.backward(g)
    w = od.dequantized(dict(zip(od.tensors, args)), {**attrs, "compute_dtype": None})
    torch.testing.assert_close(x.grad.float(), (g.float() @ w), rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(bias.grad, g.sum(0))
    with torch.no_grad():
        assert torch.equal(y.detach(), op(x, *args, bias, **attrs))


@pytest.mark.parametrize("name", OPS)
def test_inference_mode_fake_tensors_and_compile(name, monkeypatch):
    """Inference mode skips the AutogradCPU key: the entry at BackendSelect takes the call (the same
    bits, the Python wrapper skipped); fake tensors get the fake impl; a compiled function calling
    the op matches eager."""
    n, k = 64, 256
    op, args, attrs, _, spy_at = OPS[name](n, k)
    x = torch.randn(1, k).to(torch.bfloat16)
    y = op(x, *args, None, **attrs)
    spy = Spy(monkeypatch, *spy_at)
    with torch.inference_mode():
        assert torch.equal(op(x, *args, None, **attrs), y)
        assert len(spy.calls) == 0
        assert torch.equal(op(x.float(), *args, None, **attrs), run(op, x.float(), args, None, attrs, python=True))
        assert len(spy.calls) == 2
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fy = op(mode.from_tensor(x), *(mode.from_tensor(a) for a in args), None, **attrs)
    assert fy.shape == y.shape and fy.dtype == y.dtype
    compiled = torch.compile(lambda t: op(t, *args, None, **attrs), fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), y)


def test_disabled_restores_and_status():
    assert native_entry.status() == "loaded" and torch.ops.fxquant_native.enabled()
    with native_entry.disabled():
        assert not torch.ops.fxquant_native.enabled()
    assert torch.ops.fxquant_native.enabled()
    with pytest.raises(RuntimeError, match="unknown kernel"):
        torch.ops.fxquant_native.configure("int5", 0, 0)


def _experts_op(name, n, k, e):
    """The experts twin of ``name``'s op over ``e`` experts of different weights, their per-expert args."""
    built = [OPS[name](n, k, seed=i) for i in range(e)]
    op, _, attrs, _, spy_at = built[0]
    stacked = tuple(torch.stack(ts) for ts in zip(*(b[1] for b in built)))
    return getattr(torch.ops.fxquant, op._schema.name.split("::")[1] + "_experts").default, stacked, attrs, op, spy_at


@pytest.mark.parametrize("name", OPS)
def test_experts_twin_same_bits_as_its_python_loop(name, monkeypatch):
    """The experts op through the C++ entry: each expert's rows through the per-expert fast path (no Python
    kernel runs), an expert with no rows skipped, rows past the last end zero: the Python loop's result
    bit for bit, and each expert's rows equal to the per-expert op on that expert's weight."""
    n, k, e = 96, 256, 4
    op, stacked, attrs, base, spy_at = _experts_op(name, n, k, e)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    offs = torch.tensor([2, 2, 5, 8], dtype=torch.int32)  # expert 1 has no rows; row 8 is past the last end
    from fxquant.ops import _experts

    spy, loop = Spy(monkeypatch, *spy_at), Spy(monkeypatch, _experts, "_split")  # the Python loop's first step
    y = op(x, offs, *stacked, **attrs)
    assert len(spy.calls) == len(loop.calls) == 0, "the C++ entry did not take the experts call"
    with native_entry.disabled():
        y_py = op(x, offs, *stacked, **attrs)
    assert len(loop.calls) == 1  # the spy sees the Python loop when the entry is off
    assert torch.equal(y, y_py) and y.dtype == torch.bfloat16 and y.shape == (9, n)
    for i, (a, b) in enumerate([(0, 2), (2, 5), (5, 8)]):
        want = base(x[a:b], *(t[[0, 2, 3][i]] for t in stacked), None, **attrs)
        assert torch.equal(y[a:b], want)
    assert not y[8:].any()
    # a gradient for x: through the autograd twin (the per-expert ops' own autograd)
    xg = x.float().requires_grad_()
    op(xg.to(torch.bfloat16), offs, *stacked, **attrs).float().sum().backward()
    with native_entry.disabled():
        xg2 = x.float().requires_grad_()
        op(xg2.to(torch.bfloat16), offs, *stacked, **attrs).float().sum().backward()
    assert torch.equal(xg.grad, xg2.grad) and xg.grad.abs().sum() > 0
    # more rows than the fast path takes, and an AWQ input scale: the Python loop, same result as with it off
    big = torch.randn(ROWS[name] + 3, k).to(torch.bfloat16)
    big_offs = torch.tensor([0, ROWS[name] + 1, ROWS[name] + 3, ROWS[name] + 3], dtype=torch.int32)
    scale = torch.rand(e, k) + 0.5
    for args, kw in [((big, big_offs), {}), ((x, offs), {"input_scale": scale})]:
        got = op(*args, *stacked, **attrs, **kw)
        with native_entry.disabled():
            assert torch.equal(got, op(*args, *stacked, **attrs, **kw))


def test_int8dq_activation_codes_round_ties_to_even_as_python():
    """int8dq's per-row activation quantization in the C++ entry: ties (x / scale exactly k + 0.5), zero rows
    and signs give the Python path's codes (round half to even), so the results are bit-equal."""
    op, args, attrs, _, _ = int8dq_op(64, 128)
    x = torch.zeros(3, 128)
    x[0, :8] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 0.5, 126.5, -126.5])  # scale 1: every one a tie
    x[1] = torch.linspace(-3, 3, 128)
    x = x.to(torch.bfloat16)  # row 2 all zeros
    y = op(x, *args, None, **attrs)
    with native_entry.disabled():
        assert torch.equal(y, op(x, *args, None, **attrs))
    assert not y[2].any()
