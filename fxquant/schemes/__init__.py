"""Quantization schemes: frozen, keyword-only dataclasses, one module per format family.

A scheme turns a float weight ``[N, K]`` into the buffers and scalar arguments of one
``torch.ops.fxquant`` op.  Scheme strings (``"int8wo"``, ``"int4wo-128"``) and scheme objects
(``Int4WeightOnly(group_size=128)``) are interchangeable everywhere a scheme is accepted.
Subclasses of :class:`Scheme` that set ``family`` register themselves; importing this package
imports every family module below.
"""
from ._base import QuantizedWeight, Scheme, parse_scheme, scheme_from_json, scheme_to_json, valid_scheme_names
from .weight_only import Int4WeightOnly, Int8WeightOnly
from .intx import IntX
from .float8 import Float8DynamicActivation, Float8WeightOnly
from .fpx import FPx
from .int8dq import Int8DynamicActivation, LLMInt8
from .bnb4 import FP4, NF4
from .bnb8 import Bnb8
from .onebit import OneBit
from .affine import Affine
from .vptq import VPTQ
from .gguf import GGUF
from .aqlm import AQLM

__all__ = ["Scheme", "QuantizedWeight", "parse_scheme", "valid_scheme_names", "scheme_to_json",
           "scheme_from_json", "Int8WeightOnly", "Int4WeightOnly"]
__all__ += ["IntX"]
__all__ += ["Float8WeightOnly", "Float8DynamicActivation", "FPx"]
__all__ += ["Int8DynamicActivation", "LLMInt8"]
__all__ += ["NF4", "FP4"]
__all__ += ["Bnb8"]
__all__ += ["OneBit"]
__all__ += ["Affine"]
__all__ += ["GGUF"]
__all__ += ["VPTQ"]
__all__ += ["AQLM"]
