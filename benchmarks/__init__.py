"""Benchmarks: each ``bench_*.py`` compares an extension against its host's own implementation in one run."""
