"""LAVIS dataset builders registered by ``lavis_ext``: ``cirr`` and ``fashioniq``."""

from lavis_ext.datasets.cir_builders import CirrBuilder, FashionIQBuilder

__all__ = ["CirrBuilder", "FashionIQBuilder"]
