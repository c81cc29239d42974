"""fxquant: quantize PyTorch models as compiler passes over a traced graph."""
from . import methods, schemes
from .api import compile, quantize_
from .checkpoints import load_compressed_tensors, save_compressed_tensors
from .checkpoints import load_vptq, save_vptq
from .checkpoints import load_bnb, save_bnb
from .checkpoints import load_awq, load_gptq, save_awq, save_gptq
from .checkpoints import load_aqlm, save_aqlm
from .checkpoints import from_gguf
from .pipeline import quantize_pipeline
from .report import Report, report
from .schemes import Int4WeightOnly, Int8WeightOnly, Scheme
from .serialize import load, save
from .spec import Spec

__all__ = ["compile", "quantize_", "Spec", "report", "Report", "save", "load", "schemes", "methods", "Scheme", "Int8WeightOnly", "Int4WeightOnly"]
__all__ += ["save_compressed_tensors", "load_compressed_tensors"]
__all__ += ["load_vptq", "save_vptq"]
__all__ += ["load_bnb", "save_bnb"]
__all__ += ["load_gptq", "save_gptq", "load_awq", "save_awq"]
__all__ += ["load_aqlm", "save_aqlm"]
__all__ += ["from_gguf"]
__all__ += ["quantize_pipeline"]
__version__ = "0.1.0"

from . import _integrations  # noqa: E402  (quant_method "fxquant" in transformers / diffusers, once imported)

_integrations.install()
