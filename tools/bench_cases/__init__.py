"""Benchmark rows per format family, loaded by tools/bench.py.

Each module holds ``CASES`` (dicts with the fields of ``tools.bench.Case``: ``name``, ``fmt``,
``kind`` "fxquant" | "reference" | "alternative" | "peer", ``act_dtype``,
``prepare(weight fp32 [N, K]) -> state``, ``forward(state, x [M, K]) -> y [M, N]``) and ``TARGETS``
(dicts with the fields of ``tools.bench.Target``).  A new format is a new module listed here.
"""
MODULES = ("weight_only", "intx", "bnb4", "int8dq", "float8", "fpx", "onebit")
