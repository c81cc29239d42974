"""``QuantizedLinear``'s eager CPU fast path (``LinearOpDef.cpu_bound``) computes exactly what the op
does: oracle, the op called through the dispatcher on the module's own buffers."""
import pytest
import torch
from torch import nn

import fxquant
from fxquant.modules import QuantizedLinear
from test_compile import EVERY_FAMILY

SCHEMES = sorted(set(EVERY_FAMILY.values()) | {"int4wo-128", "nf4"})


def quantized_linear(scheme, n=72, k=256, bias=True, dtype=torch.bfloat16):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(k, n, bias=bias).to(dtype))
    fxquant.quantize_(m, fxquant.Spec(default=scheme), example_inputs=(torch.randn(1, k, dtype=dtype),))
    assert isinstance(m[0], QuantizedLinear), m[0]
    return m[0]


def through_op(q, x):
    return q._fn(x, *(getattr(q, n) for n in q.tensor_names), q.bias, **q.op_attrs)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_equal_to_the_op(scheme, dtype):
    q = quantized_linear(scheme, dtype=dtype)
    with torch.no_grad():
        for shape in [(1, 256), (1, 1, 256), (3, 5, 256), (70, 256), (0, 256)]:
            x = torch.randn(*shape, dtype=dtype)
            y = q(x)
            assert q._bound is not None
            assert torch.equal(y, through_op(q, x)), (scheme, shape)
            assert y.dtype == dtype and y.shape == (*shape[:-1], 72)


def test_used_only_where_the_dispatcher_would_go_straight_to_cpu(monkeypatch):
    q = quantized_linear("int4wo-128")
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)
    assert q._bound is not None
    bound, used = q._bound, []
    monkeypatch.setattr(q, "_bound", lambda x: used.append(1) or bound(x))
    with torch.no_grad():
        q(x)
    assert used == [1]
    xg = x.clone().requires_grad_()
    q(xg).float().sum().backward()  # grad: the autograd path, x gets a gradient
    assert xg.grad is not None and used == [1]
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False):
        q(x)
    with torch.no_grad(), torch.profiler.profile() as prof:
        q(x)
    assert used == [1]
    assert any("fxquant::linear_int4wo" in e.name for e in prof.events())


def test_new_buffers_and_moves_rebuild_it():
    q = quantized_linear("int8wo")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)
        old = q._bound
        q.qweight = torch.flip(q.qweight, [0]).contiguous()  # a new buffer object
        assert q._bound is None
        assert torch.equal(q(x), through_op(q, x)) and q._bound is not old
        q.bias = None
        assert q._bound is None and torch.equal(q(x), through_op(q, x))
        q.to(torch.float32)
        assert q._bound is None and torch.equal(q(x), through_op(q, x))


def test_bad_x_raises_the_ops_error():
    q = quantized_linear("int4wo-128")
    with torch.no_grad():
        q(torch.randn(1, 256, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="linear_int4wo") as fast:
            q(torch.randn(1, 128, dtype=torch.bfloat16))
        with pytest.raises(ValueError) as op:
            through_op(q, torch.randn(1, 128, dtype=torch.bfloat16))
    assert str(fast.value) == str(op.value)
