"""``torch.ops.fxquant.*`` custom ops: one module per op family.

Each module holds the op's schema (``torch.library.custom_op``), fake impl, plain-torch
reference (the op's definition and test oracle), fast CPU impl and CUDA (Triton) impl.
Importing this package registers every op.
"""
from . import int4wo, int8wo  # noqa: F401  (registration side effects)
from . import intx  # noqa: F401
from . import float8, fpx  # noqa: F401
from . import int8dq  # noqa: F401
from . import onebit  # noqa: F401
from . import bnb4  # noqa: F401
from . import bnb8  # noqa: F401  (bitsandbytes 8-bit checkpoints)
from . import affine  # noqa: F401
from . import vptq  # noqa: F401  (VPTQ codebooks)
from . import gguf  # noqa: F401  (GGUF block types)
from . import affine_perm  # noqa: F401  (GPTQ act-order layers)
from . import aqlm  # noqa: F401  (AQLM codebooks)

__all__ = ["int4wo", "int8wo"]


def op_def(name: str):
    """The :class:`~fxquant.ops._linear.LinearOpDef` of ``torch.ops.fxquant.<name>`` (its reference,
    dequantization and argument names), e.g. ``op_def("linear_int8wo")``."""
    import sys

    from ._linear import LinearOpDef

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith(__name__ + "."):
            for value in vars(mod).values():
                if isinstance(value, LinearOpDef) and value.name == name:
                    return value
    raise KeyError(f"no fxquant op named {name!r}")
