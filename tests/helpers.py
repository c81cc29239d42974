"""Shared test helpers (import as ``from helpers import ...``; tests/ is on pytest's pythonpath)."""
import torch

# dtype -> (rtol on ||y - ref|| / ||ref||) for the CPU fast paths vs the fp32 reference: the packed
# kernels run in bf16 (activations and scales rounded to 8 mantissa bits, fp32 accumulation).
FAST_PATH_TOL = {torch.float32: 1e-2, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
