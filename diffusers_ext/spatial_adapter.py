"""SpatialAdapter: the grounding tokenizer plus one gated self-attention processor per chosen block.

One ``ModelMixin``/``ConfigMixin`` holds every adapter weight, so ``save_pretrained``/``from_pretrained``
store the adapter alone in safetensors; ``install`` puts the processors into a UNet (or a pipeline's UNet)
with ``set_attn_processor`` and ``remove`` restores exactly the processors that were there before.

Zero-init. The adapter adds ``tanh(alpha) * W h`` to the residual stream. Exactly one factor may start
at zero: with ``alpha = 0`` the gradient reaches ``alpha`` through ``W h != 0`` (GLIGEN's ``gate`` mode);
with ``W = 0`` it reaches ``W`` through ``tanh(alpha) != 0`` (``zero_out`` mode, as in ControlNet /
IP-Adapter). If both start at zero, d/dalpha = (1 - tanh^2) W h = 0 and d/dW = tanh(alpha) h^T = 0: every
gradient is zero forever and training silently stalls (a user's "fix" zeroed the output layer while
keeping the gate at 0 and got exactly that). A zero gate that is also frozen can never open either.
Both configurations are refused at construction.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from diffusers_ext.fuser_presets import resolve_layers
from diffusers_ext.gated_self_attention import GROUNDING_KEYS, GatedSelfAttnProcessor, check_gate_scale
from diffusers_ext.grounding_tokenizer import GroundingTokenizer, as_tensor, check_grounding_inputs

__all__ = ["SpatialAdapter", "install", "installed_adapter", "transformer_blocks"]

INIT_MODES = ("gate", "zero_out")

# UNet -> the SpatialAdapter installed on it. Weak keys: a dropped UNet takes its entry with it. Kept
# outside the UNet so the adapter is not registered as a second submodule (its weights already appear
# under the processors).
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Transformer2DModel calls its blocks positionally under gradient checkpointing:
# (hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, timestep,
#  cross_attention_kwargs, class_labels).
_CKA_POSITION = 5


def installed_adapter(target) -> SpatialAdapter | None:
    """The SpatialAdapter installed on ``target`` (a UNet or a pipeline), or None."""
    return _INSTALLED.get(_unet_of(target))


def transformer_blocks(unet) -> dict[str, BasicTransformerBlock]:
    """Name -> block for every ``BasicTransformerBlock`` of a UNet (the places a fuser can sit)."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}


def _unet_of(target):
    unet = getattr(target, "unet", target)
    if not hasattr(unet, "set_attn_processor"):
        raise TypeError(
            f"expected a diffusers UNet2DConditionModel or a pipeline with a .unet, got {type(target).__name__}"
        )
    return unet


class SpatialAdapter(ModelMixin, ConfigMixin):
    """GLIGEN-style gated spatial adapter for a diffusers UNet (Li et al., CVPR 2023).

    One gated self-attention fuser (:class:`~diffusers_ext.gated_self_attention.GatedSelfAttnProcessor`) per
    transformer block and one grounding tokenizer (box + phrase feature -> token). Saved and loaded like any
    diffusers model (``save_pretrained`` / ``from_pretrained``, safetensors); build a new one from a UNet with
    :meth:`for_unet`, load a trained one onto a pipeline with :func:`diffusers_ext.load_spatial_adapter`.

    Args:
        layers: ``[block_name, dim, heads, dim_head]`` for each fuser (:meth:`for_unet` fills it).
        phrase_dim: size of a phrase feature (768 for SD1.5's CLIP-L, 2048 for SDXL, 4096 for Kolors).
        token_dim: size of a grounding token (the UNet's cross-attention dim).
        max_objs: the most objects one layout may hold.
        fourier_freqs: Fourier frequencies of the box embedding (GLIGEN: 8).
        hidden_dim: width of the tokenizer's MLP.
        phrase_norm: LayerNorm on the phrase features before the MLP.
        init_mode: ``"gate"`` (gate ``gate_init`` = 0, normal weights: GLIGEN) or ``"zero_out"`` (output
            layers 0, gate ``gate_init`` = 1); exactly one of the two starts at zero, so the adapter is the
            identity at init and still receives gradients.
        gate_init: the gates' start value (default by ``init_mode``).
        freeze_gate: keep the gates fixed during training.

    Example:
        >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> from diffusers_ext import SpatialAdapter, phrase_dim
        >>> adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim(pipe), hidden_dim=32)
        >>> adapter.install(pipe)
        >>> len(adapter.layer_names) > 0
        True
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        layers: list | None = None,
        phrase_dim: int = 768,
        token_dim: int = 768,
        max_objs: int = 30,
        fourier_freqs: int = 8,
        hidden_dim: int = 512,
        phrase_norm: bool = True,
        init_mode: str = "gate",
        gate_init: float | None = None,
        freeze_gate: bool = False,
    ):
        super().__init__()
        if init_mode not in INIT_MODES:
            raise ValueError(f"init_mode must be one of {INIT_MODES}, got {init_mode!r}")
        gate = (0.0 if init_mode == "gate" else 1.0) if gate_init is None else float(gate_init)
        if init_mode == "zero_out" and gate == 0.0:
            raise ValueError(
                "init_mode='zero_out' with gate_init=0 can never learn: with both the output layers and the "
                "gate at zero every gradient of the adapter is zero (d/dgate = W h = 0, d/dW = tanh(0) h = 0). "
                "Use init_mode='gate' (gate 0, normal weights) or a non-zero gate_init (default 1.0)."
            )
        if freeze_gate and gate == 0.0:
            raise ValueError(
                "freeze_gate=True with gate_init=0 can never learn: tanh(0) = 0 multiplies the adapter's "
                "output, so no gradient reaches its weights and the frozen gate never opens. Unfreeze the "
                "gate or start it at a non-zero value."
            )
        if not layers:
            raise ValueError(
                "SpatialAdapter needs at least one layer; build it with SpatialAdapter.for_unet(unet)"
            )
        self.position_net = GroundingTokenizer(
            phrase_dim=phrase_dim,
            token_dim=token_dim,
            max_objs=max_objs,
            fourier_freqs=fourier_freqs,
            hidden_dim=hidden_dim,
            phrase_norm=phrase_norm,
        )
        self.fusers = nn.ModuleList(
            GatedSelfAttnProcessor(dim, heads, dim_head, token_dim) for _, dim, heads, dim_head in layers
        )
        with torch.no_grad():
            for fuser in self.fusers:
                fuser.num_slots = max_objs
                fuser.alpha_attn.fill_(gate)
                fuser.alpha_dense.fill_(gate)
                fuser.alpha_attn.requires_grad_(not freeze_gate)
                fuser.alpha_dense.requires_grad_(not freeze_gate)
                if init_mode == "zero_out":
                    for out in (fuser.to_out, fuser.ff_out):
                        nn.init.zeros_(out.weight)
                        nn.init.zeros_(out.bias)
        self._installed: dict | None = None

    @classmethod
    def for_unet(
        cls, unet, phrase_dim: int, layers: str | list[str] | None = None, **config
    ) -> SpatialAdapter:
        """An adapter shaped for ``unet``: one fuser per ``BasicTransformerBlock`` chosen by ``layers``.

        ``layers`` names a placement preset of :data:`diffusers_ext.fuser_presets.FUSER_PRESETS` (``"all"``,
        ``"migc"``, ``"one-per-stack"``, ...), or lists presets and block-name prefixes (matched on dot
        boundaries). The chosen blocks are stored by name in the adapter's config, so a saved adapter loads
        without knowing the preset.

        Args:
            unet: a ``UNet2DConditionModel`` or a pipeline carrying one.
            phrase_dim: size of the phrase features (:func:`diffusers_ext.phrase_dim` of the pipeline).
            layers: a preset name, or presets and block-name prefixes to adapt, e.g. ``"migc"`` or
                ``["mid_block", "up_blocks.1"]``; None adapts all (GLIGEN).
            **config: other :class:`SpatialAdapter` arguments; ``token_dim`` defaults to the UNet's
                cross-attention dim.

        Returns:
            A new, not yet installed :class:`SpatialAdapter` (identity at init).

        Example:
            >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
            >>> pipe = tiny_sd_pipeline()
            >>> adapter = SpatialAdapter.for_unet(pipe.unet, 32, layers=["mid_block"], hidden_dim=32)
            >>> adapter.layer_names
            ['mid_block.attentions.0.transformer_blocks.0']
        """
        unet = _unet_of(unet)
        blocks = transformer_blocks(unet)
        if not blocks:
            raise ValueError(
                f"{type(unet).__name__} has no BasicTransformerBlock: a spatial adapter needs a UNet with "
                "cross-attention blocks (CrossAttnDownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D)"
            )
        chosen = resolve_layers(list(blocks), layers)
        blocks = {n: blocks[n] for n in chosen}
        spec = []
        for name, block in blocks.items():
            if block.norm_type != "layer_norm":
                raise ValueError(
                    f"block {name} uses norm_type={block.norm_type!r}; the gated fuser's residual placement is "
                    "exact only for 'layer_norm' blocks (UNet2DConditionModel)"
                )
            attn = block.attn1
            spec.append([name, attn.to_q.in_features, attn.heads, attn.inner_dim // attn.heads])
        token_dim = config.pop("token_dim", unet.config.cross_attention_dim)
        if isinstance(token_dim, (list, tuple)):
            token_dim = token_dim[0]
        return cls(layers=spec, phrase_dim=phrase_dim, token_dim=token_dim, **config)

    @property
    def layer_names(self) -> list[str]:
        return [spec[0] for spec in self.config.layers]

    def install(self, target) -> None:
        """Put the fusers into ``target``'s UNet as ``attn1`` processors and hook every transformer block.

        The block pre-hooks hand each fuser its block input and take ``grounding_tokens``/``grounding_scale``
        out of the block's ``cross_attention_kwargs``, so ``attn2`` keeps whatever processor diffusers put
        there (IP-Adapter included). Given a pipeline, its ``load_ip_adapter``/``unload_ip_adapter`` are
        wrapped to take the adapter out and put it back around diffusers' processor rebuild, so IP-Adapter
        can be loaded or unloaded in either order. A UNet takes one adapter; a second one is refused.

        Args:
            target: a diffusers pipeline with a ``unet`` (preferred: IP-Adapter stays compatible) or a UNet.

        Example:
            >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
            >>> pipe = tiny_sd_pipeline()
            >>> adapter = SpatialAdapter.for_unet(pipe.unet, 32, hidden_dim=32)
            >>> adapter.install(pipe)
            >>> adapter.remove()  # the UNet's own processors come back
        """
        if self._installed is not None:
            raise RuntimeError("this SpatialAdapter is already installed; call remove() first")
        unet = _unet_of(target)
        other = _INSTALLED.get(unet)
        carried = [n for n, p in unet.attn_processors.items() if isinstance(p, GatedSelfAttnProcessor)]
        if other is not None or carried:
            raise RuntimeError(
                "this UNet already carries a SpatialAdapter "
                f"({len(carried)} gated processors, first {carried[0] if carried else '?'}); one UNet takes one "
                "adapter. Remove it first (adapter.remove() or unload_spatial_adapter(pipe))."
            )
        blocks = transformer_blocks(unet)
        missing = [n for n in self.layer_names if n not in blocks]
        if missing:
            raise ValueError(
                f"the UNet lacks the adapter's blocks {missing[:3]}...; was it built for another UNet?"
            )
        fusers = dict(zip(self.layer_names, self.fusers, strict=True))
        for name, fuser in fusers.items():
            width = blocks[name].attn1.to_q.in_features
            if width != fuser.norm1.normalized_shape[0]:
                raise ValueError(
                    f"block {name} has width {width}, the fuser was built for {fuser.norm1.normalized_shape[0]}"
                )
        previous = dict(unet.attn_processors)
        new = dict(previous)
        for name, fuser in fusers.items():
            new[f"{name}.attn1.processor"] = fuser
        hooks = [
            block.register_forward_pre_hook(self._block_hook(name, fusers.get(name)), with_kwargs=True)
            for name, block in blocks.items()
        ]
        device = next(unet.parameters()).device
        self.to(device)
        unet.set_attn_processor(new)
        pipe = target if target is not unet else None
        self._installed = {"unet": unet, "previous": previous, "hooks": hooks, "pipe": pipe}
        _INSTALLED[unet] = self
        if pipe is not None:
            self._wrap_ip_adapter_methods(pipe)

    def _wrap_ip_adapter_methods(self, pipe) -> None:
        """diffusers' ``load_ip_adapter``/``unload_ip_adapter`` rebuild every processor by calling its class
        with no arguments, which a processor holding weights cannot survive. Around those calls on this
        pipeline, the adapter steps out (its processors go back to what was there before) and back in."""
        wrapped = []
        for method in ("load_ip_adapter", "unload_ip_adapter"):
            original = getattr(type(pipe), method, None)
            if original is None:
                continue

            def around(*args, _original=original, **kwargs):
                self.remove()
                try:
                    return _original(pipe, *args, **kwargs)
                finally:
                    self.install(pipe)

            around.__doc__ = original.__doc__
            pipe.__dict__[method] = around
            wrapped.append(method)
        self._installed["wrapped"] = wrapped

    @staticmethod
    def _block_hook(name: str, fuser: GatedSelfAttnProcessor | None):
        def hook(block, args, kwargs):
            positional = "cross_attention_kwargs" not in kwargs and len(args) > _CKA_POSITION
            cka = args[_CKA_POSITION] if positional else kwargs.get("cross_attention_kwargs")
            grounding = None
            if cka and any(k in cka for k in GROUNDING_KEYS):
                if "grounding_tokens" in cka:
                    grounding = (cka["grounding_tokens"], cka.get("grounding_scale", 1.0))
                cka = {k: v for k, v in cka.items() if k not in GROUNDING_KEYS}
                if positional:
                    args = (*args[:_CKA_POSITION], cka, *args[_CKA_POSITION + 1 :])
                else:
                    kwargs = {**kwargs, "cross_attention_kwargs": cka}
            if fuser is not None:
                if block.attn1.processor is not fuser:
                    warnings.warn(
                        f"the spatial adapter's processor on {name}.attn1 was replaced by "
                        f"{type(block.attn1.processor).__name__} (enable_xformers_memory_efficient_attention, "
                        "attention slicing, fuse_qkv_projections or set_default_attn_processor do this); the "
                        "adapter is inactive there. Call adapter.remove() and adapter.install() after changing "
                        "processors.",
                        stacklevel=2,
                    )
                else:
                    fuser.stash_residual(args[0] if args else kwargs["hidden_states"], grounding)
            return args, kwargs

        return hook

    def check_installed(self) -> None:
        """Raise if any fuser was swapped out of the UNet after install (e.g. by xformers)."""
        if self._installed is None:
            raise RuntimeError("the SpatialAdapter is not installed; call adapter.install(unet_or_pipeline)")
        procs = self._installed["unet"].attn_processors
        swapped = [
            n
            for n, f in zip(self.layer_names, self.fusers, strict=True)
            if procs.get(f"{n}.attn1.processor") is not f
        ]
        if swapped:
            raise RuntimeError(
                f"{len(swapped)} spatial-adapter processors were replaced after install (first: {swapped[0]}.attn1, "
                f"now {type(procs[f'{swapped[0]}.attn1.processor']).__name__}); xformers, attention slicing, "
                "fuse_qkv_projections and set_default_attn_processor replace processors. "
                "Call adapter.remove() and adapter.install() afterwards."
            )

    def remove(self) -> None:
        """Put back the ``attn1`` processors that were there before, drop the hooks and the pipeline wrappers.
        Every other processor (``attn2``: IP-Adapter, LoRA, ...) is left exactly as it is now."""
        if self._installed is None:
            raise RuntimeError("the SpatialAdapter is not installed")
        unet, pipe = self._installed["unet"], self._installed["pipe"]
        for hook in self._installed["hooks"]:
            hook.remove()
        fusers = set(map(id, self.fusers))
        previous = self._installed["previous"]
        unet.set_attn_processor(
            {n: previous[n] if id(p) in fusers else p for n, p in unet.attn_processors.items()}
        )
        for method in self._installed.get("wrapped", ()):
            pipe.__dict__.pop(method, None)
        _INSTALLED.pop(unet, None)
        self._installed = None

    def set_scale(self, scale: float) -> None:
        """A standing multiplier of every gate (GLIGEN's runtime strength, like ``set_ip_adapter_scale``):
        0 switches the grounding off, 1 is the trained model. It multiplies ``grounding_scale``."""
        scale = check_gate_scale(scale, "spatial adapter scale")
        for fuser in self.fusers:
            fuser.scale = scale

    def gate_stats(self) -> dict:
        """Effective gates tanh(alpha) over all layers (attention and dense): mean/std/min/max, plus each
        layer's pair, the numbers to watch while training (a gate stuck at 0 means nothing learns)."""
        gates = torch.stack([f.gates().detach().float() for f in self.fusers])  # (L, 2)
        flat = gates.flatten()
        return {
            "mean": flat.mean().item(),
            "abs_mean": flat.abs().mean().item(),
            "std": flat.std().item() if flat.numel() > 1 else 0.0,
            "min": flat.min().item(),
            "max": flat.max().item(),
            "per_layer": {n: g.tolist() for n, g in zip(self.layer_names, gates, strict=True)},
        }

    def forward(self, boxes, phrase_embeds, masks=None) -> torch.Tensor:
        """Grounding tokens (batch, max_objs, token_dim) for ``cross_attention_kwargs={"grounding_tokens": ...}``.

        ``boxes`` (batch, n, 4) normalized xyxy, ``phrase_embeds`` (batch, n, phrase_dim), ``masks`` (batch, n)
        (1 = object, 0 = padding/dropped); tensors or nested lists. Fewer than ``max_objs`` objects are padded
        with masked null tokens: GLIGEN and diffusers' GLIGEN pipeline always attend over ``max_objs`` slots,
        and training pads the same way, so the slot count never differs between training and sampling.
        """
        p = self.position_net.null_positive_feature
        boxes = as_tensor(boxes, "boxes", device=p.device)
        phrase_embeds = as_tensor(phrase_embeds, "phrase_embeds", device=p.device)
        masks = as_tensor(masks, "masks", device=p.device)
        cfg = self.config
        check_grounding_inputs(
            boxes,
            phrase_embeds,
            masks,
            phrase_dim=cfg.phrase_dim,
            max_objs=cfg.max_objs,
            where="SpatialAdapter",
        )
        b, n = boxes.shape[:2]
        masks = torch.ones(b, n, device=boxes.device) if masks is None else masks
        pad = cfg.max_objs - n
        if pad:
            boxes = torch.cat([boxes, boxes.new_zeros(b, pad, 4)], 1)
            phrase_embeds = torch.cat([phrase_embeds, phrase_embeds.new_zeros(b, pad, cfg.phrase_dim)], 1)
            masks = torch.cat([masks.to(boxes.dtype), boxes.new_zeros(b, pad)], 1)
        return self.position_net(boxes, phrase_embeds, masks)

    def cross_attention_kwargs(self, boxes, phrase_embeds, masks=None, gate_scale: float = 1.0) -> dict:
        """``{"grounding_tokens": (batch, max_objs, token_dim), "grounding_scale": gate_scale}`` for the UNet.

        The batch must match the UNet's: with classifier-free guidance give the unconditional rows masks 0
        (or use ``generation.generate``, which does)."""
        scale = check_gate_scale(gate_scale)
        return {"grounding_tokens": self(boxes, phrase_embeds, masks), "grounding_scale": scale}


def install(unet) -> None:
    """Registry hook: shape a default adapter for ``unet`` (phrase dim = cross-attention dim) and install it."""
    dim = unet.config.cross_attention_dim
    SpatialAdapter.for_unet(unet, phrase_dim=dim if isinstance(dim, int) else dim[0]).install(unet)
