"""LAVIS extensions: composed image retrieval (SPRC's ``blip2_cir_align_prompt`` with gated fusion).

Importing this package first makes the unmodified salesforce-lavis 1.0.2 work on the current stack
(:mod:`lavis_ext.compat`), then registers our models, datasets and tasks in LAVIS's registry.
"""

from lavis_ext import compat

compat.apply()

# Imported for their registrations in LAVIS's registry (model, processor, builders, task).
from lavis_ext.datasets import CirrBuilder, FashionIQBuilder  # noqa: E402
from lavis_ext.models import Blip2QformerCirAlignPrompt, GatedFusion  # noqa: E402
from lavis_ext.processors import TargetPadProcessor  # noqa: E402
from lavis_ext.tasks import ComposedImageRetrievalTask  # noqa: E402

__all__ = [
    "Blip2QformerCirAlignPrompt",
    "CirrBuilder",
    "ComposedImageRetrievalTask",
    "FashionIQBuilder",
    "GatedFusion",
    "TargetPadProcessor",
    "compat",
]
