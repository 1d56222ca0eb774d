"""Shared, dependency-light core of the distribution: the extension manifest and the toy world.

Importing it never imports LAVIS, diffusers or open_clip, so each extension package can use it
without pulling in the other two.
"""

from vlext.manifest import Demo, Extension, ManifestError, load_demos, load_registry

__all__ = ["Demo", "Extension", "ManifestError", "load_demos", "load_registry"]
