"""Helpers shared by the op modules: output shapes and autograd for weight-only linears."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def linear_out(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Empty output of a linear: ``x.shape[:-1] + (out_features,)`` in ``x``'s dtype."""
    return x.new_empty((*x.shape[:-1], out_features))


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The definition every weight-only op shares: ``x @ weight.T + bias`` in fp32, cast to x."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def register_weight_only_autograd(op, dequantize: Callable[..., torch.Tensor], weight_args: tuple[str, ...],
                                  attr_args: tuple[str, ...] = ()) -> None:
    """Make ``op(x, *weight_args, bias, *attr_args)`` differentiable in ``x`` and ``bias``.

    The quantized weight is frozen (no gradient), as in QLoRA: ``dx = dy @ dequantize(...)``.
    """

    def setup_context(ctx, inputs, output):
        ctx.weights = inputs[1:1 + len(weight_args)]
        ctx.attrs = inputs[2 + len(weight_args):]
        ctx.has_bias = inputs[1 + len(weight_args)] is not None
        ctx.x_dtype = inputs[0].dtype
        ctx.save_for_backward(*ctx.weights)

    def backward(ctx, grad):
        weights = ctx.saved_tensors
        w = dequantize(*weights, *ctx.attrs)
        dx = (grad.float() @ w).to(ctx.x_dtype)
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return (dx, *([None] * len(weights)), db, *([None] * len(ctx.attrs)))

    op.register_autograd(backward, setup_context=setup_context)
