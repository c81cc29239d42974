"""Quantize / dequantize / pack math, one module per format.

These modules are the single source of truth for every number layout fxquant stores: the ops'
references, the CPU fast paths, the Triton kernels' tests and the report all call them.
"""
