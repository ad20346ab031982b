"""Micro-benchmarks: ``python -m orcd.bench.dequant`` (dequantize throughput per block format)."""
