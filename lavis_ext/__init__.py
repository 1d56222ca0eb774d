"""LAVIS extensions: composed image retrieval (SPRC's ``blip2_cir_align_prompt`` with gated fusion).

Importing this package first makes the unmodified salesforce-lavis 1.0.2 work on the current stack
(:mod:`lavis_ext.compat`), then registers our models, datasets and tasks in LAVIS's registry.
"""

from lavis_ext import compat

compat.apply()

__all__ = ["compat"]
