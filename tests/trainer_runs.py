"""Run the spatial-adapter trainer in-process as a fresh process would (for the diffusers trainer tests)."""

from accelerate.state import AcceleratorState, GradientState

from diffusers_ext.training.train_spatial_adapter import train


def train_fresh(argv: list[str]) -> dict:
    """``train(argv)`` with accelerate's process-wide state reset before and after: accelerate keeps one
    mixed-precision and one gradient-accumulation setting per process, and these tests switch between them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return train(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
