"""``fxquant::linear_fpx``: sub-byte floating point (``fp<X>_e<A>m<B>``) weight-only linear.

``y = x @ (decode(unpack(qweight)) * scale[:, None]).T + bias``; format, bit-packed layout and
scales in :mod:`fxquant.formats.fpx`.  CPU: no PyTorch kernel reads these codes, so the op
unpacks and decodes the weight with vectorized torch (a ``2^X``-entry table gather) and runs a
dense GEMM (:mod:`._cpu` picks the dtype).  CUDA: Triton kernel in :mod:`fxquant.kernels.fpx`.
"""
from __future__ import annotations

import torch

from ..formats import fpx as fmt
from ._linear import LinearOpDef, define


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, ebits: int, mbits: int,
                      in_features: int) -> torch.Tensor:
    """Stored buffers -> float32 ``[N, in_features]``."""
    return fmt.from_storage(qweight, scale, ebits, mbits, in_features)


def _cuda(x2, qweight, scale, *, bias, ebits, mbits, in_features):
    from ..kernels.fpx import fpx_linear

    return fpx_linear(x2, qweight, scale, bias, ebits=ebits, mbits=mbits)


OP = LinearOpDef(
    name="linear_fpx", tensors=("qweight", "scale"),
    scalars=(("ebits", "int"), ("mbits", "int"), ("in_features", "int")),
    dequantize=dequantize_weight, out_features=lambda qweight, **_: qweight.shape[0],
    cuda=_cuda,
    doc="x [..., K]; qweight uint8 [N, ceil(K/8) * X] (X = 1 + ebits + mbits, little-endian bit stream per "
        "row); scale bf16 [N]; bias [N] -> [..., N]",
)
linear_fpx = define(OP)
reference = OP.reference
