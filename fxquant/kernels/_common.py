"""What every Triton GEMM kernel of fxquant shares: the grouped tile order, autotune configs and
pruning, and the interpreter's bf16 workaround.  Each kernel module keeps its own kernel body,
search space and launcher."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import interpreting

INTERPRETED = interpreting()  # what every @triton.jit of the kernel modules saw at import
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # activation dtypes every kernel takes


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: ``GROUP_M`` row tiles share each
    column tile of weights while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def store_tile(acc, y_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, stride_yn,
               HAS_BIAS: tl.constexpr):
    """Epilogue: ``acc`` (fp32 ``[BLOCK_M, BLOCK_N]``) plus the bias, stored in ``y``'s dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def dot(x, w, acc, DOT_IN_FP32: tl.constexpr):
    """``acc + x @ w`` (``acc`` fp32).  ``DOT_IN_FP32``: both operands upcast to fp32 first (exact; fp32
    activations, or bf16 under the interpreter: see :func:`bf16_via_fp32`), else ``w`` cast to x's
    dtype.  ``"ieee"``: fp32 operands use exact fp32 products as the reference does (tf32 would keep
    ~10 mantissa bits); 16-bit operands are unaffected."""
    if DOT_IN_FP32:
        out = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    return out


def config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    """One autotune point of a GEMM kernel with ``BLOCK_M/N/K`` and ``GROUP_M`` = 8."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=num_warps, num_stages=num_stages)


def prune_by_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep configs whose M tile is at most one step taller than the (bucketed) rows ``M_BUCKET``."""
    max_m = max(16, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max_m] or configs[:1]


def tuned(kernel, *, cuda: Sequence[triton.Config], interpreter: Sequence[triton.Config], key: list[str],
          prune: Callable[..., list[triton.Config]] = prune_by_rows):
    """``kernel`` autotuned over ``cuda`` configs (``interpreter`` ones under ``TRITON_INTERPRET``),
    re-tuned per ``key``; ``M_BUCKET`` (next power of two of M) belongs in ``key`` so a new M does
    not re-tune.  The GPU search spaces are not measured: no GPU was lent to this project."""
    return triton.autotune(configs=list(interpreter if INTERPRETED else cuda), key=key,
                           prune_configs_by={"early_config_prune": prune})(kernel)


def check_launch(launcher: str, module: str, x2d: torch.Tensor, bias: Optional[torch.Tensor],
                 tensors: dict[str, torch.Tensor], check: Callable[..., None], **scalars) -> None:
    """What a launcher checks before it allocates: ``x2d`` a 2-D ``[M, K]`` tensor of
    :data:`X_DTYPES`, then the op family's own argument check (``check``, from :mod:`fxquant.ops`: K,
    the stored tensors' dtypes and shapes, bias; its ``ValueError`` re-raised with the launcher's
    name), then one device for all (:func:`check_device`)."""
    if x2d.dim() != 2 or x2d.dtype not in X_DTYPES:
        raise ValueError(f"{launcher}: x2d must be a 2-D [M, K] tensor of dtype "
                         f"{', '.join(map(str, X_DTYPES))}, got {x2d.dtype} of shape {tuple(x2d.shape)}")
    try:
        check(x2d, bias, **tensors, **scalars)
    except ValueError as e:
        raise ValueError(f"{launcher}: {e}") from None
    check_device(launcher, module, {"x2d": x2d, **tensors, "bias": bias})


def check_device(launcher: str, module: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """``ValueError`` (prefixed with the ``launcher`` name) unless every tensor (``None`` skipped)
    is on one device, and that device is CUDA or, under the interpreter, anything."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{launcher}: all tensors must be on one device, got {devices}")
    device = next(iter(devices.values()))
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{launcher}: tensors are on {device}; the Triton kernel needs CUDA tensors, "
                         f"or TRITON_INTERPRET=1 set before fxquant.kernels.{module} is imported")


def bf16_via_fp32(x_dtype: torch.dtype) -> bool:
    """Whether to route bf16 through fp32 around the CPU interpreter's bf16 gaps.

    The interpreter stores bf16 as raw uint16: its ``tl.dot`` multiplies the bit patterns and an
    int -> bf16 cast is a bitcast (triton-lang/triton#11584), and fp32 -> bf16 truncates instead of
    rounding to nearest even.  So under the interpreter bf16 tiles enter the dot as fp32 (exact: the
    products of bf16 values are exact in fp32) and the launcher rounds the fp32 output with torch.
    Compiled GPU runs use bf16 operands and the kernel's own rounding store."""
    return INTERPRETED and x_dtype == torch.bfloat16
