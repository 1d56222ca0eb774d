"""LAVIS tasks registered by ``lavis_ext``: ``composed_image_retrieval``."""

from lavis_ext.tasks.composed_image_retrieval import ComposedImageRetrievalTask

__all__ = ["ComposedImageRetrievalTask"]
