"""Tiny offline models, pipelines and detectors for tests, benchmarks and the demo (never imported by the library modules)."""
