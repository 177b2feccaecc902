"""Benchmarks: each figure against a baseline timed in the same run (`python -m tinydist.bench`)."""
