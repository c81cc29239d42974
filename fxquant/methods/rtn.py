"""Round-to-nearest: the scheme's own ``quantize`` (each format's min / max or absmax parameters)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._base import Method, MethodResult

__all__ = ["RTN"]


@dataclass(frozen=True, kw_only=True)
class RTN(Method):
    """``@rtn`` (the default): no data, no search; exactly what a scheme without a method stores."""

    name: ClassVar[str] = "rtn"

    def quantize(self, scheme, weight, stats=None) -> MethodResult:
        return MethodResult(scheme.quantize(weight.contiguous()))
