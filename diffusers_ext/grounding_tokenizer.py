"""Grounding tokenizer: (phrase feature, box) pairs -> grounding tokens for the gated self-attention.

GLIGEN (Li et al., CVPR 2023, "GLIGEN: Open-Set Grounded Text-to-Image Generation") encodes each
grounded object as one token: a Fourier embedding of its xyxy box concatenated with the phrase's text
feature, sent through an MLP. Padded or dropped objects use learnable null features instead of zeros, so
"no object" is something the model can learn to ignore. Parameter names follow diffusers'
``GLIGENTextBoundingboxProjection`` (``linears``, ``null_positive_feature``, ``null_position_feature``) so
native and official GLIGEN weights load without renaming.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vlext.boxes import BOX_RULE, box_error, satisfies_box_rule

__all__ = ["BOX_RULE", "GroundingTokenizer", "as_tensor", "check_grounding_inputs", "fourier_box_embedding"]


def as_tensor(value, name: str, device=None, dtype=None) -> torch.Tensor | None:
    """Tensors pass through; nested Python lists/tuples (and numpy arrays) of numbers become tensors, so
    ``[[0.1, 0.1, 0.5, 0.5]]`` works wherever a (batch, objects, 4) tensor does. ``None`` stays ``None``."""
    if value is None or isinstance(value, torch.Tensor):
        return value if value is None or (device is None and dtype is None) else value.to(device, dtype)
    try:
        return torch.as_tensor(value, dtype=torch.float32 if dtype is None else dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{name} must be a tensor or a nested list of numbers of one rectangular shape, got "
            f"{type(value).__name__}: {err}"
        ) from None


def fourier_box_embedding(boxes: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(B, N, 4) xyxy boxes -> (B, N, num_freqs * 2 * 4) sin/cos features.

    Frequencies are 100 ** (k / num_freqs), k = 0..num_freqs-1 (GLIGEN's embedder); the output is laid out
    as [freq][sin, cos][coordinate], the order GLIGEN's and diffusers' MLP weights expect.
    """
    freqs = 100 ** (torch.arange(num_freqs, device=boxes.device, dtype=boxes.dtype) / num_freqs)
    angles = boxes.unsqueeze(-1) * freqs  # (B, N, 4, F)
    features = torch.stack((angles.sin(), angles.cos()), dim=-1)  # (B, N, 4, F, 2)
    return features.permute(0, 1, 3, 4, 2).reshape(*boxes.shape[:2], num_freqs * 2 * 4)


def check_grounding_inputs(
    boxes: torch.Tensor,
    phrase_embeds: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    phrase_dim: int,
    max_objs: int,
    where: str = "GroundingTokenizer",
) -> None:
    """Raise a ValueError naming the offending input before any compute; never truncate silently.

    The box rule (:mod:`vlext.boxes`, ``BOX_RULE``) applies to live objects (mask > 0); padding slots may hold anything."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        hint = " (one layout of shape (objects, 4): wrap it in a batch, [boxes])" if boxes.ndim == 2 else ""
        raise ValueError(
            f"{where}: boxes must have shape (batch, objects, 4) in xyxy, got {tuple(boxes.shape)}{hint}"
        )
    batch, n_objs = boxes.shape[:2]
    if n_objs > max_objs:
        raise ValueError(
            f"{where}: {n_objs} objects given but max_objs is {max_objs}; drop or merge objects first "
            "(the training CLI keeps the largest max_objs boxes and reports how many it dropped)"
        )
    if phrase_embeds.ndim != 3 or phrase_embeds.shape[:2] != (batch, n_objs):
        raise ValueError(
            f"{where}: phrase features must have shape (batch, objects, dim) = ({batch}, {n_objs}, dim) to match "
            f"the boxes, got {tuple(phrase_embeds.shape)} (one phrase per box)"
        )
    if phrase_embeds.shape[-1] != phrase_dim:
        raise ValueError(
            f"{where}: phrase feature dim {phrase_embeds.shape[-1]} does not match the tokenizer's phrase_dim "
            f"{phrase_dim} (768 for SD1.5 CLIP-L, 2048 for SDXL, 4096 for Kolors' ChatGLM)"
        )
    if masks is not None and tuple(masks.shape) != (batch, n_objs):
        raise ValueError(f"{where}: masks must have shape ({batch}, {n_objs}), got {tuple(masks.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes contain NaN or inf")
    if not torch.isfinite(phrase_embeds).all():
        raise ValueError(f"{where}: phrase features contain NaN or inf")
    live = torch.ones(batch, n_objs, dtype=torch.bool, device=boxes.device) if masks is None else masks > 0
    broken = ~satisfies_box_rule(*boxes.unbind(-1)) & live
    if broken.any():
        bad = torch.nonzero(broken)[0].tolist()
        raise box_error(where, bad, boxes[bad[0], bad[1]].tolist())


class GroundingTokenizer(ModelMixin, ConfigMixin):
    """GLIGEN's position net: Fourier(box) + phrase feature -> MLP -> one grounding token per object.

    ``phrase_norm`` adds a LayerNorm on the phrase features before the MLP: ChatGLM's 4096-d hidden
    states (Kolors) have a much larger scale than CLIP's, and without it the MLP's first layer saturates.
    GLIGEN has no such norm, so converted GLIGEN weights set ``phrase_norm=False``.
    """

    @register_to_config
    def __init__(
        self,
        phrase_dim: int = 768,
        token_dim: int = 768,
        max_objs: int = 30,
        fourier_freqs: int = 8,
        hidden_dim: int = 512,
        phrase_norm: bool = True,
    ):
        super().__init__()
        self.position_dim = fourier_freqs * 2 * 4
        self.phrase_ln = nn.LayerNorm(phrase_dim) if phrase_norm else nn.Identity()
        self.linears = nn.Sequential(
            nn.Linear(phrase_dim + self.position_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, token_dim),
        )
        self.null_positive_feature = nn.Parameter(torch.zeros(phrase_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(self.position_dim))

    def forward(
        self, boxes: torch.Tensor, phrase_embeds: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """boxes (B, N, 4) normalized xyxy, phrase_embeds (B, N, phrase_dim), masks (B, N) with 1 for a real
        object and 0 for padding or a dropped object -> tokens (B, N, token_dim)."""
        cfg = self.config
        boxes, phrase_embeds = as_tensor(boxes, "boxes"), as_tensor(phrase_embeds, "phrase_embeds")
        masks = as_tensor(masks, "masks")
        check_grounding_inputs(boxes, phrase_embeds, masks, phrase_dim=cfg.phrase_dim, max_objs=cfg.max_objs)
        dtype = self.linears[0].weight.dtype
        boxes, phrase_embeds = boxes.to(dtype), phrase_embeds.to(dtype)
        if masks is None:
            masks = torch.ones(boxes.shape[:2], dtype=dtype, device=boxes.device)
        m = masks.to(dtype).unsqueeze(-1)
        position = fourier_box_embedding(boxes, cfg.fourier_freqs)
        position = position * m + (1 - m) * self.null_position_feature.view(1, 1, -1)
        phrase = self.phrase_ln(phrase_embeds)
        phrase = phrase * m + (1 - m) * self.null_positive_feature.view(1, 1, -1)
        return self.linears(torch.cat([phrase, position], dim=-1))

    def null_tokens(self, batch: int, n_objs: int | None = None) -> torch.Tensor:
        """Tokens of an all-padding input: what the unconditional half of a CFG batch sees."""
        n = self.config.max_objs if n_objs is None else n_objs
        p = self.null_positive_feature
        boxes = torch.zeros(batch, n, 4, device=p.device, dtype=p.dtype)
        phrases = torch.zeros(batch, n, self.config.phrase_dim, device=p.device, dtype=p.dtype)
        return self(boxes, phrases, torch.zeros(batch, n, device=p.device, dtype=p.dtype))
