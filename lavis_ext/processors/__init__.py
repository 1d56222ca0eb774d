"""LAVIS processors registered by ``lavis_ext``: ``cir_target_pad`` (SPRC's target-pad transform)."""

from lavis_ext.processors.target_pad import TargetPadProcessor

__all__ = ["TargetPadProcessor"]
