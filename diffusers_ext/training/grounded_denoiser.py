"""UNet + spatial adapter as one module, the unit the trainer hands to ``accelerator.prepare``.

The adapter's fusers run inside the UNet's attention processors, but its grounding tokenizer runs before
the UNet; wrapping both in one ``nn.Module`` lets DDP see every trainable parameter take part in the
forward (otherwise it would wait forever for the tokenizer's gradients) and lets accelerate's autocast
cover the tokenizer too.
"""

from __future__ import annotations

from torch import nn

__all__ = ["GroundedDenoiser"]


class GroundedDenoiser(nn.Module):
    def __init__(self, unet, adapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, noisy, timesteps, text, boxes, phrase_feats, masks, added_cond_kwargs=None):
        tokens = self.adapter(boxes, phrase_feats, masks)
        kwargs = {"grounding_tokens": tokens, "grounding_scale": 1.0}
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs=kwargs,
        ).sample
