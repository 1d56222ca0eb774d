"""LAVIS extensions: composed image retrieval (SPRC's ``blip2_cir_align_prompt`` with gated fusion).

Importing this package first makes the unmodified salesforce-lavis 1.0.2 work on the current stack
(:mod:`lavis_ext.compat`), then registers our models, datasets and tasks in LAVIS's registry.
"""

from vlext.cli_help import help_only_invocation

# `python -m lavis_ext.<cli> --help` imports this package first; the CLI modules register what they need
# themselves when they run, so the help text need not wait for torch and LAVIS.
if not help_only_invocation():
    from lavis_ext import compat

    compat.apply()

    # Imported for their registrations in LAVIS's registry (model, processor, builders, task).
    from lavis_ext.datasets import CirrBuilder, FashionIQBuilder
    from lavis_ext.models import Blip2QformerCirAlignPrompt, GatedFusion
    from lavis_ext.processors import TargetPadProcessor
    from lavis_ext.tasks import ComposedImageRetrievalTask

__all__ = [
    "Blip2QformerCirAlignPrompt",
    "CirrBuilder",
    "ComposedImageRetrievalTask",
    "FashionIQBuilder",
    "GatedFusion",
    "TargetPadProcessor",
    "compat",
]
