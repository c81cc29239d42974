"""Quantization methods: the algorithms that choose a format's codes and parameters.

``RTN`` (round to nearest, the default), ``HQQ`` (half-quadratic zero / scale optimisation, no
data), ``GPTQ`` (Hessian-based error feedback), ``AWQ`` (activation-aware channel scaling and
clipping) and ``OneBit`` (calibrated sign-value decomposition).  A scheme string ends in
``@<method>`` (``"int4wo-128@gptq"``) or a scheme object carries ``method=GPTQ(...)``;
see docs/algorithms.md.
"""
from ._base import Method, MethodResult, Stats, method_from_json, method_names, method_to_json, parse_method
from .rtn import RTN
from .onebit import OneBit
from .hqq import HQQ
from .gptq import GPTQ
from .awq import AWQ
from .aqlm import AQLM
from .vptq import VPTQ

__all__ = ["Method", "MethodResult", "Stats", "parse_method", "method_to_json", "method_from_json",
           "method_names", "RTN", "HQQ"]
__all__ += ["GPTQ", "AWQ"]
__all__ += ["OneBit"]
__all__ += ["VPTQ"]
__all__ += ["AQLM"]
