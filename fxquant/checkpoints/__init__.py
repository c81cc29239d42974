"""Checkpoints other libraries write and read, converted to and from fxquant's packed layers without a
float copy of the quantized weights.  One module per ecosystem (docs/checkpoints.md)."""
from .compressed_tensors import load_compressed_tensors, save_compressed_tensors
from .vptq import load_vptq, save_vptq
from .bnb import load_bnb, save_bnb
from .gptq import load_gptq, save_gptq
from .awq import load_awq, save_awq
from .gguf import from_gguf
from .aqlm import load_aqlm, save_aqlm

__all__ = ["save_compressed_tensors", "load_compressed_tensors"]
__all__ += ["load_bnb", "save_bnb"]
__all__ += ["load_gptq", "save_gptq", "load_awq", "save_awq"]
__all__ += ["from_gguf"]
__all__ += ["load_vptq", "save_vptq"]
__all__ += ["load_aqlm", "save_aqlm"]
