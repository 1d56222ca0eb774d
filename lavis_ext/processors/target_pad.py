"""SPRC's "target pad" image transform as a LAVIS processor (``cir_target_pad``).

CIRR and FashionIQ images are often far from square; a plain resize + centre crop cuts off the garment or
the object the caption talks about. SPRC (after CLIP4Cir, Baldrati et al. 2022) first pads the image with
black so that its aspect ratio is at most ``target_ratio`` (1.25), then resizes and centre-crops.
"""

from __future__ import annotations

import torchvision.transforms.functional as TF
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipImageBaseProcessor
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms

__all__ = ["TargetPadProcessor", "target_pad"]


def target_pad(image: Image.Image, target_ratio: float) -> Image.Image:
    """Pad symmetrically (black) until max(w, h) / min(w, h) <= target_ratio; unchanged if already so."""
    w, h = image.size
    if max(w, h) / min(w, h) < target_ratio:
        return image
    side = max(w, h) / target_ratio
    hp, vp = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
    return TF.pad(image, [hp, vp, hp, vp], fill=0, padding_mode="constant")


@registry.register_processor("cir_target_pad")
class TargetPadProcessor(BlipImageBaseProcessor):
    def __init__(self, image_size=224, target_ratio=1.25, mean=None, std=None):
        super().__init__(mean=mean, std=std)
        if not target_ratio >= 1.0:
            raise ValueError(f"cir_target_pad: target_ratio must be >= 1.0, got {target_ratio!r}")
        self.target_ratio = float(target_ratio)
        self.transform = transforms.Compose(
            [
                transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                self.normalize,
            ]
        )

    def __call__(self, item: Image.Image):
        return self.transform(target_pad(item.convert("RGB"), self.target_ratio))

    @classmethod
    def from_config(cls, cfg=None):
        cfg = cfg if cfg is not None else OmegaConf.create()
        return cls(
            image_size=cfg.get("image_size", 224),
            target_ratio=cfg.get("target_ratio", 1.25),
            mean=cfg.get("mean", None),
            std=cfg.get("std", None),
        )
