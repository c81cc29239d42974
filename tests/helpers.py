"""Shared test helpers (import as ``from helpers import ...``; tests/ is on pytest's pythonpath)."""
import importlib

import pytest
import torch

# dtype -> (rtol on ||y - ref|| / ||ref||) for the CPU fast paths vs the fp32 reference: the packed
# kernels run in bf16 (activations and scales rounded to 8 mantissa bits, fp32 accumulation).
FAST_PATH_TOL = {torch.float32: 1e-2, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def policy_x(x: torch.Tensor) -> torch.Tensor:
    """The values the ops compute on under ``compute_dtype=None`` on this CPU: fp32 x rounded to bf16
    where the dense path is bf16 (:func:`fxquant.ops._cpu.numerics`), else x."""
    from fxquant.ops import _cpu
    return x.to(torch.bfloat16).to(x.dtype) if _cpu.numerics(x.dtype, None).round_x else x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def assert_linear_close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                        tol: float, bias: torch.Tensor | None = None) -> None:
    """Elementwise ``|y - ref| <= tol * (|x| @ |W|.T)``: the rounding bound of a dot product.

    A norm-relative check fails on cancellation (one output whose terms nearly cancel); the
    magnitude-weighted bound is what bf16 rounding of the operands actually guarantees."""
    bound = tol * (x.float().abs().reshape(-1, x.shape[-1]) @ w.float().abs().t()).reshape(ref.shape)
    bound = bound + tol * ref.float().abs()  # rounding of the output itself (and of the bias)
    if bias is not None:
        bound = bound + tol * bias.float().abs()
    err = (y.float() - ref.float()).abs()
    assert (err <= bound + 1e-6).all(), f"max excess {(err - bound).max().item():.3g}"


def err_vs_magnitude(y: torch.Tensor, r: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                     b: torch.Tensor | None) -> float:
    """||y - r|| relative to the size of the terms summed, ||x|·|W|ᵀ + |b|||: a bf16 output plus a
    bf16 bias rounds twice, which ``rel`` over a cancelling single output would blow up."""
    size = x.float().abs() @ w.abs().T + (0 if b is None else b.float().abs())
    return ((y.float() - r.float()).norm() / size.norm().clamp(min=1e-12)).item()


def intx_code_part(tensors: dict, attrs: dict) -> torch.Tensor:
    """The code part ``(q - mid) * scale`` of an intx weight (its offset left out), fp32 ``[N, K]``:
    what the axis-0 kernel's bf16 form meets with its rounding of ``A = scale * x``, even where the
    group's offset cancels it in W, so error bounds for that form are relative to it too."""
    from fxquant.ops import intx

    no_offset = {**tensors, "offset": torch.zeros_like(tensors["offset"])}
    return intx.OP.dequantized(no_offset, {**attrs, "compute_dtype": None})


def triton_kernel(name: str):
    """For a kernel test module: ``fxquant.kernels.<name>``, the device its kernels run on ("cpu"
    under the interpreter that tests/kernels/conftest.py turns on without a GPU, else "cuda") and
    the module's ``pytestmark``.  Skips the whole module when Triton is not installed."""
    pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux x86_64 only)")
    kernel = importlib.import_module(f"fxquant.kernels.{name}")
    device = "cpu" if importlib.import_module("fxquant.kernels._common").INTERPRETED else "cuda"
    marks = [pytest.mark.triton,
             pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(),
                                reason="no GPU and TRITON_INTERPRET is not true: the Triton kernel cannot run")]
    return kernel, device, marks


class Spy:
    """Patches ``module.name`` (a function the ops look up at call time) to record each call:
    ``calls`` holds, per call, whether it returned something (not ``None``)."""

    def __init__(self, monkeypatch, module, name):
        real, self.calls = getattr(module, name), []

        def counted(*args, **kwargs):
            y = real(*args, **kwargs)
            self.calls.append(y is not None)
            return y

        monkeypatch.setattr(module, name, counted)
