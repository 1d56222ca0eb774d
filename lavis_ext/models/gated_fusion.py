"""Gated fusion of the modification text into the reference image tokens, before the Q-Former reads them.

fused_i = v_i + alpha * sigmoid(W_g [v_i; t]) * tanh(W_b t), with t the masked mean of the caption's token
embeddings. The idea comes from a public SPRC fork (aizhao/SPRC-); three of its defects are fixed here:

- it pooled the caption including PAD tokens, so the text vector depended on ``max_txt_len``; we average
  real tokens only;
- its scalar gate started at 0.5, so switching fusion on over an SPRC checkpoint changed every score at
  step 0; ``alpha`` starts at 0 here, making the module an exact identity at init;
- it trained the module but never applied it at inference; the model calls this one module in ``forward``
  and in every inference path.

Only ``alpha`` starts at zero; the branch output ``W_b`` keeps its default (non-zero) init. Zeroing both
would be a saddle: d/d alpha = <grad, gate * tanh(W_b t)> = 0 and d/d W_b is scaled by alpha = 0, so nothing
would ever learn (the zero-init trap GLIGEN and ControlNet each avoid by zeroing exactly one factor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedFusion"]


class GatedFusion(nn.Module):
    def __init__(self, vision_width: int, text_width: int, alpha_init: float = 0.0):
        super().__init__()
        for name, value in (("vision_width", vision_width), ("text_width", text_width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GatedFusion: {name} must be a positive int, got {value!r}")
        self.text_in = nn.Linear(text_width, vision_width)
        self.gate = nn.Linear(2 * vision_width, vision_width)
        self.branch = nn.Linear(vision_width, vision_width)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    @staticmethod
    def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over positions where ``mask`` is 1 (PAD ignored); (B, L, D), (B, L) -> (B, D), in fp32.

        The count and the sum stay fp32 whatever the tokens' dtype: in bf16 a count above 256 is rounded
        (257 -> 256) and a long sum loses its small terms."""
        weights = mask.to(torch.float32).unsqueeze(-1)
        count = weights.sum(1).clamp_min(1.0)
        return (tokens.float() * weights).sum(1) / count

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor):
        """image_embeds (B, N, Dv), text_embeds (B, L, Dt) token embeddings, text_mask (B, L) -> (B, N, Dv)."""
        if image_embeds.dim() != 3 or text_embeds.dim() != 3 or text_mask.shape != text_embeds.shape[:2]:
            raise ValueError(
                "GatedFusion expects image_embeds (B, N, Dv), text_embeds (B, L, Dt) and text_mask (B, L); got "
                f"{tuple(image_embeds.shape)}, {tuple(text_embeds.shape)}, {tuple(text_mask.shape)}"
            )
        if image_embeds.size(0) != text_embeds.size(0):
            raise ValueError(
                f"GatedFusion: {image_embeds.size(0)} reference images but {text_embeds.size(0)} captions"
            )
        image, text, gate = self._gate(image_embeds, text_embeds, text_mask)
        fused = image + self.alpha * gate * torch.tanh(self.branch(text)).unsqueeze(1)
        return fused.to(image_embeds.dtype)

    def _gate(self, image_embeds, text_embeds, text_mask):
        text = self.text_in(self.masked_mean(text_embeds, text_mask).to(self.text_in.weight.dtype))
        image = image_embeds.to(text.dtype)
        # W_g [v_i; t] = W_v v_i + W_t t: the text half and the branch are computed once per caption, not
        # once per image token (257 tokens for EVA ViT-g), which keeps the fusion's training-step cost small.
        weight_image, weight_text = self.gate.weight.split(image.size(-1), dim=1)
        gate_text = F.linear(text, weight_text, self.gate.bias).unsqueeze(1)
        return image, text, torch.sigmoid(F.linear(image, weight_image) + gate_text)

    @torch.no_grad()
    def token_gate(self, image_embeds, text_embeds, text_mask) -> torch.Tensor:
        """Per-token gate (B, N): the channel mean of sigmoid(W_g [v_i; t]), i.e. how much of the caption's
        branch each image token lets in (scaled by ``alpha`` in :meth:`forward`). Used for the gate heatmap."""
        return self._gate(image_embeds, text_embeds, text_mask)[2].mean(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
