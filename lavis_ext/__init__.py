"""LAVIS extensions: composed image retrieval (SPRC's ``blip2_cir_align_prompt`` with gated fusion).

Importing this package first makes the unmodified salesforce-lavis 1.0.2 work on the current stack
(:mod:`lavis_ext.compat`), then registers our models, datasets and tasks in LAVIS's registry. Only
``python -m lavis_ext.<cli> --help`` skips both (:func:`vlext.cli_help.help_only_invocation`): the help text
need not wait for torch and LAVIS, and the exported names then load on first use (:mod:`vlext.lazy_exports`).
"""

from typing import TYPE_CHECKING

from vlext.cli_help import help_only_invocation
from vlext.lazy_exports import lazy_exports, load_all

if TYPE_CHECKING:
    from lavis_ext import compat as compat
    from lavis_ext.datasets import CirrBuilder as CirrBuilder
    from lavis_ext.datasets import FashionIQBuilder as FashionIQBuilder
    from lavis_ext.models import Blip2QformerCirAlignPrompt as Blip2QformerCirAlignPrompt
    from lavis_ext.models import GatedFusion as GatedFusion
    from lavis_ext.processors import TargetPadProcessor as TargetPadProcessor
    from lavis_ext.tasks import ComposedImageRetrievalTask as ComposedImageRetrievalTask

_EXPORTS = {
    "Blip2QformerCirAlignPrompt": "lavis_ext.models",
    "CirrBuilder": "lavis_ext.datasets",
    "ComposedImageRetrievalTask": "lavis_ext.tasks",
    "FashionIQBuilder": "lavis_ext.datasets",
    "GatedFusion": "lavis_ext.models",
    "TargetPadProcessor": "lavis_ext.processors",
    "compat": "lavis_ext.compat",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

# `python -m lavis_ext.<cli> --help` imports this package first; the CLI modules register what they need
# themselves when they run, so the help text need not wait for torch and LAVIS.
if not help_only_invocation():
    from lavis_ext import compat

    compat.apply()
    # imported now for their registrations in LAVIS's registry (model, processor, builders, task)
    load_all(__name__, _EXPORTS)
