"""GLIGEN's gated self-attention as a diffusers attention processor for ``attn1``.

Placement. GLIGEN's fuser acts on the un-normalized residual stream after self-attention and before
cross-attention: ``x1 = x + SelfAttn(norm1(x))``, ``x2 = x1 + g_a * Attn(LN([x1; Linear(objs)]))[:n]``,
``x3 = x2 + g_d * FF(LN(x2))``. An ``attn1`` processor only sees ``norm1(x)`` and returns a value that
``BasicTransformerBlock`` adds to ``x``. Both facts together give an exact form: a forward pre-hook on the
block stashes ``x`` (the block's ``hidden_states`` argument) on the processor; the processor computes the
self-attention output ``a``, then ``x1 = x + a`` and the two gated deltas ``d_a``, ``d_d`` from ``x1``, and
returns ``a + d_a + d_d``. The block then forms ``x + a + d_a + d_d = x3``: the same residual stream as
GLIGEN, with no change to diffusers' block code (the identity is checked to 1e-5 against diffusers'
native ``attention_type="gated"`` UNet in tests/test_diffusers_gligen_compat.py).

Gates are ``gate_scale * tanh(alpha)``: GLIGEN's scheduled sampling multiplies the same factor.
Grounding tokens arrive through ``cross_attention_kwargs={"grounding_tokens": ..., "grounding_scale": ...}``
(``gligen`` is popped by the block and ``scale`` is deprecated there, so neither is used). The same block
pre-hook takes both keys out of the block's ``cross_attention_kwargs`` and hands them to this processor, so
``attn2`` never sees them: its processor (default SDPA, IP-Adapter's, ...) stays exactly what diffusers
installed, and ``set_ip_adapter_scale`` still finds IP-Adapter's processors.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GROUNDING_KEYS", "GatedSelfAttnProcessor", "check_gate_scale"]

GROUNDING_KEYS = ("grounding_tokens", "grounding_scale")


def check_gate_scale(value, where: str = "gate_scale") -> float:
    """A finite real number as a float, else a ValueError naming the value: a NaN scale would silently turn
    every image into NaN, and a string or None would fail deep inside the UNet."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{where} must be a finite real number (1.0 = the trained strength, 0.0 = no grounding), "
            f"got {value!r} of type {type(value).__name__}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"{where} must be a finite real number (1.0 = the trained strength, 0.0 = no grounding), got {value}"
        )
    return value


def _multihead_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    b = q.shape[0]
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])


class GatedSelfAttnProcessor(nn.Module):
    """Self-attention of ``attn1`` plus GLIGEN's gated self-attention and gated feed-forward.

    Without ``grounding_tokens`` (or with ``grounding_scale=0``) it is exactly the plain self-attention, so
    a UNet carrying the adapter behaves as before wherever no layout is given. ``num_slots`` (set by
    ``SpatialAdapter`` to its ``max_objs``) is the number of grounding tokens it accepts: GLIGEN always
    attends over ``max_objs`` slots, masked nulls included, and a different count changes the output.
    ``scale`` is a standing multiplier (``set_spatial_adapter_scale``), applied on top of ``grounding_scale``.

    Args:
        dim: the block's hidden size (``attn1``'s query width).
        heads: attention heads of the gated self-attention.
        dim_head: width of one head.
        token_dim: width of the grounding tokens (the adapter's ``token_dim``).

    Example:
        >>> import torch
        >>> fuser = GatedSelfAttnProcessor(dim=32, heads=2, dim_head=16, token_dim=32)
        >>> fuser.alpha_attn.item(), fuser.alpha_dense.item()  # closed gates: identity at init
        (0.0, 0.0)
    """

    def __init__(
        self,
        dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        token_dim: int = 768,
        ff_mult: int = 4,
    ):
        if dim is None:
            raise TypeError(
                "GatedSelfAttnProcessor holds trained weights and cannot be rebuilt without them. diffusers' "
                "load_ip_adapter/unload_ip_adapter rebuild every processor by calling its class: install the "
                "spatial adapter on the pipeline (load_spatial_adapter(pipe, ...) or adapter.install(pipe)), "
                "which takes itself out around those calls, or remove it first."
            )
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.linear = nn.Linear(token_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 2 * ff_mult * dim)  # GEGLU: value and gate halves
        self.ff_out = nn.Linear(ff_mult * dim, dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))
        self._residual: torch.Tensor | None = None
        self._grounding: tuple | None = None
        self.num_slots: int | None = None
        self.scale = 1.0

    def stash_residual(self, hidden_states: torch.Tensor, grounding: tuple | None = None) -> None:
        """Called by the block's forward pre-hook with the un-normalized block input and the
        ``(grounding_tokens, grounding_scale)`` it took out of ``cross_attention_kwargs`` (None if absent)."""
        self._residual = hidden_states
        self._grounding = grounding

    def gates(self) -> torch.Tensor:
        return torch.stack([self.alpha_attn.tanh(), self.alpha_dense.tanh()])

    def _self_attention(self, attn, hidden_states, attention_mask):
        if hidden_states.ndim != 3:
            raise ValueError(
                f"GatedSelfAttnProcessor expects (batch, tokens, dim) hidden states from a BasicTransformerBlock, "
                f"got shape {tuple(hidden_states.shape)}"
            )
        b, n, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None or attn.norm_k is not None:
            hd = q.shape[-1] // attn.heads
            q = q.view(b, -1, attn.heads, hd)
            k = k.view(b, -1, attn.heads, hd)
            q = (attn.norm_q(q) if attn.norm_q is not None else q).reshape(b, -1, attn.heads * hd)
            k = (attn.norm_k(k) if attn.norm_k is not None else k).reshape(b, -1, attn.heads * hd)
        out = _multihead_sdpa(q, k, v, attn.heads, attention_mask).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        grounding_tokens: torch.Tensor | None = None,
        grounding_scale: float = 1.0,
        **kwargs,
    ) -> torch.Tensor:
        residual, self._residual = self._residual, None
        stashed, self._grounding = self._grounding, None
        if grounding_tokens is None and stashed is not None:
            grounding_tokens, grounding_scale = stashed
        attn_out = self._self_attention(attn, hidden_states, attention_mask)
        if grounding_tokens is None:
            return attn_out
        grounding_scale = check_gate_scale(grounding_scale, "cross_attention_kwargs['grounding_scale']")
        grounding_scale = grounding_scale * self.scale
        if grounding_scale == 0:
            return attn_out
        if residual is None:
            raise RuntimeError(
                "GatedSelfAttnProcessor got grounding tokens but no block input: the forward pre-hook that "
                "stashes it is missing. Install the adapter with SpatialAdapter.install(unet), not by "
                "set_attn_processor alone."
            )
        if grounding_tokens.shape[0] not in (1, hidden_states.shape[0]):
            raise ValueError(
                f"grounding_tokens batch {grounding_tokens.shape[0]} does not match the UNet batch "
                f"{hidden_states.shape[0]} (for classifier-free guidance pass null tokens for the "
                "unconditional half)"
            )
        if grounding_tokens.ndim != 3 or (
            self.num_slots is not None and grounding_tokens.shape[1] != self.num_slots
        ):
            raise ValueError(
                f"grounding_tokens must have shape (batch, {self.num_slots}, dim): the adapter always uses its "
                f"max_objs={self.num_slots} slots, padded with masked null tokens as in GLIGEN; got "
                f"{tuple(grounding_tokens.shape)}. Build them with adapter(boxes, phrases, masks) or "
                "adapter.cross_attention_kwargs(...), which pad."
            )
        tokens = grounding_tokens.to(hidden_states.dtype)
        if tokens.shape[0] == 1:
            tokens = tokens.expand(hidden_states.shape[0], -1, -1)
        n_visual = hidden_states.shape[1]
        x = residual + attn_out
        z = self.norm1(torch.cat([x, self.linear(tokens)], dim=1))
        fused = self.to_out(_multihead_sdpa(self.to_q(z), self.to_k(z), self.to_v(z), self.heads))
        delta_attn = grounding_scale * self.alpha_attn.tanh() * fused[:, :n_visual]
        value, gate = self.ff_in(self.norm2(x + delta_attn)).chunk(2, dim=-1)
        delta_dense = grounding_scale * self.alpha_dense.tanh() * self.ff_out(value * F.gelu(gate))
        return attn_out + delta_attn + delta_dense
