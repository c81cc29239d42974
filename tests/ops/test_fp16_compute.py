"""``compute_dtype=torch.float16`` with large activations: the CPU paths stay finite wherever the
reference (dequantize, then an fp16 ``F.linear``) is, at M above every routing threshold.

The hazard: a blocked path that multiplies *unscaled* codes (int8 up to 127) into an fp16 GEMM and
applies the per-row scale afterwards overflows fp16 (65504) where the scaled weight does not."""
import pytest
import torch

from fxquant.ops import _cpu
from fxquant.ops._dequant_gemm import blocked_linear
from fxquant.schemes import parse_scheme

SCHEMES = ["int8wo", "int4wo-64", "uint4wo-64", "uint3wo-32", "nf4", "float8wo", "fp6_e3m2", "fp4_e2m1", "onebit"]


def _reference_def(op_name: str):
    from fxquant.ops import bnb4, float8, fpx, int4wo, int8wo, intx, onebit

    defs = [int8wo.OP, int4wo.OP, intx.OP, bnb4.OP, bnb4.OP_DQ, float8.OP_WO, fpx.OP, onebit.OP]
    return next(d for d in defs if d.name == op_name)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [40, 300])  # above every blocked / packed threshold (_cpu.large_m_threshold() <= 192)
def test_fp16_compute_stays_finite_with_large_activations(scheme, m):
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(96, 512, generator=gen) * 0.05
    qw = parse_scheme(scheme).quantize(w)
    attrs = {**qw.attrs, "compute_dtype": torch.float16}
    # |x| ~ 400: the unscaled int8 sums reach ~ 127 * 400 * sqrt(512) ~ 1e6 (inf in fp16), |y| stays ~ 1e3
    x = torch.randn(m, 512, generator=gen) * 400
    args = tuple(qw.tensors.values())
    opdef = _reference_def(qw.op)
    y = getattr(torch.ops.fxquant, qw.op)(x, *args, None, **attrs)
    r = opdef.reference(x, *args, None, **attrs)
    assert r.isfinite().all() and r.abs().max() < 2e4  # the case is one the reference computes
    assert y.isfinite().all(), f"{scheme} M={m}: {(~y.isfinite()).sum().item()} non-finite outputs"
    # fp16 weight and output roundings (2^-11 each) over |x| |W|: a loose bound, far below inf
    wq = opdef.dequantized(qw.tensors, {**qw.attrs, "compute_dtype": None})
    size = x.abs() @ wq.abs().t()
    assert ((y - r).abs() <= 2**-9 * size + 2**-9 * r.abs()).all()


@pytest.mark.parametrize("rows", [None, 7])
def test_blocked_linear_fp16_scales_the_weight_not_the_output(rows):
    """``blocked_linear`` in fp16 with a per-row scale (the int8wo, float8 and fpX decoders' form):
    the GEMM meets the scaled weight, rounded once to fp16 as the reference's, so large activations
    do not overflow; in bf16 / fp32 the scale stays on the output."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(-127, 128, (50, 256), generator=gen, dtype=torch.int8)
    scale = (torch.rand(50, generator=gen) * 1e-3 + 1e-4).to(torch.bfloat16)
    x = torch.randn(33, 256, generator=gen) * 500

    def decode(r0, r1, out):
        out.copy_(codes[r0:r1])

    w16 = (codes.float() * scale.float()[:, None]).half()
    want = torch.mm(x.half(), w16.t())
    y = blocked_linear(x, 50, 256, decode, scale, torch.float16, rows)
    assert want.isfinite().all() and y.isfinite().all() and y.dtype == torch.float16
    torch.testing.assert_close(y, want, rtol=2**-9, atol=1e-2)
    y32 = blocked_linear(x, 50, 256, decode, scale, torch.float32, rows)
    torch.testing.assert_close(y32, x @ (codes.float() * scale.float()[:, None]).t(), rtol=1e-5, atol=1e-3)


def test_the_large_m_threshold_is_below_the_cases():
    assert _cpu.large_m_threshold() < 300
