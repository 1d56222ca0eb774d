"""GPU figures: ``bash benchmarks/gpu/run.sh`` (see its header)."""
