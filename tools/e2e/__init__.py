"""Helpers of tools/bench_e2e.py: the models (``models``), the rows (``variants``) and the
generate timing, compile bookkeeping and profiler (``timing``)."""
