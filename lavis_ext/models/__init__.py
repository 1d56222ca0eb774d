"""LAVIS models registered by ``lavis_ext``: ``blip2_cir_align_prompt`` (SPRC with optional gated fusion)."""

from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt
from lavis_ext.models.gated_fusion import GatedFusion

__all__ = ["Blip2QformerCirAlignPrompt", "GatedFusion"]
