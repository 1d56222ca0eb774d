"""Layout-grounded generation with an installed spatial adapter on SD, SDXL and Kolors pipelines.

Phrases are encoded with the pipeline's own text encoder, as GLIGEN does with its CLIP text encoder: the
pooled CLIP feature for SD (width 768 on SD1.5); the two pooled CLIP features concatenated for SDXL (768 +
1280 = 2048: the first encoder's pooled hidden state, the second's projected text embedding); the last
layer's last-token hidden state for Kolors' ChatGLM (4096), the same vector Kolors uses as its pooled
prompt. ``phrase_dim(pipe)`` gives the width to build the adapter with.

Classifier-free guidance. The pipelines run the UNet on ``[unconditional; conditional]`` halves with one
``cross_attention_kwargs``; the unconditional half must see no layout (only the tokenizer's null tokens,
as in GLIGEN, where its masks are zeroed), otherwise guidance would push away from the layout too. The
grounding tokens are therefore built for the whole doubled batch here, in the pipeline's order (prompt
``i`` repeated ``num_images_per_prompt`` times).

Slots. The grounding tokens always fill the adapter's ``max_objs`` slots (30 for GLIGEN): the layout's
objects first, masked null tokens after, and ``max_objs`` null tokens for the unconditional half, exactly as
diffusers' ``StableDiffusionGLIGENPipeline`` and GLIGEN's sampler feed them and as training pads. The null
tokens take part in the fused attention, so fewer slots would change the image
(tests/test_diffusers_gligen_pipeline_parity.py compares with diffusers' GLIGEN pipeline to 1e-4).

Scheduled sampling (``scheduled_sampling.grounding_schedule``) is applied per denoising step by a forward
pre-hook on the UNet that rescales ``grounding_scale`` on each call, so it works the same in every
pipeline and leaves ``callback_on_step_end`` to the user. The default is GLIGEN's: grounding for the first
30 % of the steps (``beta=0.3``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from diffusers import KolorsPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusers_ext.gated_self_attention import check_gate_scale
from diffusers_ext.scheduled_sampling import GLIGEN_BETA, grounding_schedule

__all__ = ["encode_phrases", "generate", "grounding_cross_attention_kwargs", "phrase_dim", "pipeline_kind"]

SUPPORTED = (StableDiffusionPipeline, StableDiffusionXLPipeline, KolorsPipeline)
GROUNDING_KEYS = ("grounding_tokens", "grounding_scale")


def pipeline_kind(pipe) -> str:
    if isinstance(pipe, KolorsPipeline):
        return "kolors"
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    raise TypeError(
        f"grounded generation supports {', '.join(p.__name__ for p in SUPPORTED)}; got {type(pipe).__name__}"
    )


def phrase_dim(pipe) -> int:
    """Width of the phrase features :func:`encode_phrases` returns for this pipeline.

    Args:
        pipe: a Stable Diffusion, SDXL or Kolors pipeline.

    Returns:
        The text encoder's width (SD: CLIP pooled output; SDXL: both encoders concatenated; Kolors: ChatGLM).

    Example:
        >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
        >>> phrase_dim(tiny_sd_pipeline())
        32
    """
    kind = pipeline_kind(pipe)
    if kind == "sdxl":
        return pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.projection_dim
    return pipe.text_encoder.config.hidden_size


def _clip_ids(tokenizer, phrases: list[str], device) -> torch.Tensor:
    """Token ids padded to the tokenizer's length; warns (never silently cuts) when a phrase is longer."""
    limit = tokenizer.model_max_length
    for phrase in phrases:
        n = len(tokenizer(phrase).input_ids)
        if n > limit:
            warnings.warn(
                f"phrase {phrase!r} has {n} tokens; the text encoder reads {limit}, the rest is cut",
                stacklevel=3,
            )
    ids = tokenizer(phrases, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    return ids.input_ids.to(device)


@torch.no_grad()
def encode_phrases(pipe, phrases: Sequence[str]) -> torch.Tensor:
    """Phrase features from the pipeline's own text encoder(s), as GLIGEN feeds its grounding tokenizer.

    Args:
        pipe: a Stable Diffusion, SDXL or Kolors pipeline.
        phrases: N non-empty strings (a phrase longer than the encoder reads is cut with a warning).

    Returns:
        A float32 tensor of shape (N, :func:`phrase_dim` (pipe)).

    Example:
        >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
        >>> encode_phrases(tiny_sd_pipeline(), ["a red circle", "a blue square"]).shape
        torch.Size([2, 32])
    """
    kind = pipeline_kind(pipe)
    phrases = list(phrases)
    bad = [p for p in phrases if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"phrases must be non-empty strings, got {bad[:3]}")
    if not phrases:
        return torch.zeros(0, phrase_dim(pipe), device=pipe.text_encoder.device)
    encoder = pipe.text_encoder
    if kind == "kolors":
        inputs = pipe.tokenizer(phrases, padding=True, return_tensors="pt").to(encoder.device)
        out = encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            output_hidden_states=True,
        )
        # ChatGLM is sequence-first and pads on the left: the last position is every phrase's last token.
        return out.hidden_states[-1][-1].float()
    pooled = encoder(_clip_ids(pipe.tokenizer, phrases, encoder.device)).pooler_output
    if kind == "sd":
        return pooled.float()
    encoder_2 = pipe.text_encoder_2
    projected = encoder_2(_clip_ids(pipe.tokenizer_2, phrases, encoder_2.device)).text_embeds
    return torch.cat([pooled.float(), projected.float().to(pooled.device)], dim=-1)


def _layouts(phrases, boxes, n_prompts: int) -> list[tuple[list[str], list]]:
    """One (phrases, boxes) layout per prompt: a single layout is shared by every prompt."""
    from diffusers_ext.layout_rows import check_layout_shape

    if isinstance(phrases, str):
        check_layout_shape(phrases, boxes)  # refuses, naming the fix
    nested = bool(phrases) and not isinstance(phrases[0], str)
    if not nested:
        phrases, boxes = [phrases] * n_prompts, [boxes] * n_prompts
    if len(phrases) != n_prompts or len(boxes) != n_prompts:
        raise ValueError(
            f"{n_prompts} prompt(s) but {len(phrases)} phrase lists and {len(boxes)} box lists; give one layout "
            "(list of phrases, list of boxes) for all prompts or one per prompt"
        )
    layouts = []
    for i, (ps, bs) in enumerate(zip(phrases, boxes, strict=True)):
        check_layout_shape(ps, bs.tolist() if hasattr(bs, "tolist") else bs, f"layout {i}")
        ps, bs = list(ps), [list(map(float, b)) for b in bs]
        if len(ps) != len(bs):
            raise ValueError(
                f"layout {i}: {len(ps)} phrases but {len(bs)} boxes; each phrase needs exactly one xyxy box"
            )
        wrong = [b for b in bs if len(b) != 4]
        if wrong:
            raise ValueError(
                f"layout {i}: boxes must be 4 numbers (x0, y0, x1, y1) in [0, 1], got {wrong[0]}"
            )
        layouts.append((ps, bs))
    return layouts


def _check_adapter_on(pipe, adapter) -> None:
    fusers = {id(f) for f in adapter.fusers}
    if not any(id(p) in fusers for p in pipe.unet.attn_processors.values()):
        raise RuntimeError(
            "the spatial adapter is not installed on this pipeline's UNet; call adapter.install(pipe) first"
        )
    adapter.check_installed()
    if adapter.config.phrase_dim != phrase_dim(pipe):
        raise ValueError(
            f"the adapter expects {adapter.config.phrase_dim}-d phrase features but this "
            f"{type(pipe).__name__}'s text encoder gives {phrase_dim(pipe)}-d ones; build the adapter with "
            "phrase_dim=phrase_dim(pipe)"
        )


def grounding_cross_attention_kwargs(
    pipe,
    adapter,
    phrases,
    boxes,
    *,
    n_prompts: int = 1,
    num_images_per_prompt: int = 1,
    classifier_free_guidance: bool = True,
    gate_scale: float = 1.0,
) -> dict:
    """``cross_attention_kwargs`` carrying grounding tokens for the pipeline's UNet batch.

    ``phrases``/``boxes``: one layout (list of str, list of xyxy boxes in [0, 1]) shared by all prompts, or a
    list of layouts, one per prompt; boxes may be lists or tensors. Every layout fills the adapter's
    ``max_objs`` slots (masked null tokens after its objects, as in GLIGEN); with
    ``classifier_free_guidance`` the first half of the batch gets ``max_objs`` null tokens.
    """
    _check_adapter_on(pipe, adapter)
    scale = check_gate_scale(gate_scale)
    layouts = _layouts(phrases, boxes, n_prompts)
    n_objs = max(len(ps) for ps, _ in layouts)
    max_objs = adapter.config.max_objs
    if n_objs > max_objs:
        raise ValueError(
            f"a layout has {n_objs} objects but the adapter takes at most max_objs={max_objs}; "
            "drop or merge objects (nothing is truncated silently)"
        )
    device, dtype = pipe.unet.device, pipe.unet.dtype
    width = adapter.config.phrase_dim
    box_t = torch.zeros(n_prompts, max_objs, 4)
    feat_t = torch.zeros(n_prompts, max_objs, width)
    mask_t = torch.zeros(n_prompts, max_objs)
    for i, (ps, bs) in enumerate(layouts):
        if ps:
            box_t[i, : len(bs)] = torch.tensor(bs)
            feat_t[i, : len(ps)] = encode_phrases(pipe, ps).cpu()
            mask_t[i, : len(ps)] = 1
    adapter_dtype = next(adapter.parameters()).dtype
    with torch.no_grad():
        tokens = adapter(box_t.to(device, adapter_dtype), feat_t.to(device, adapter_dtype), mask_t.to(device))
        tokens = tokens.repeat_interleave(num_images_per_prompt, dim=0)
        if classifier_free_guidance:
            null = adapter.position_net.null_tokens(tokens.shape[0], max_objs)
            tokens = torch.cat([null, tokens])
    return {"grounding_tokens": tokens.to(dtype), "grounding_scale": scale}


class _PerStepScale:
    """UNet forward pre-hook: step ``i`` runs with ``grounding_scale = base * schedule[i]``."""

    def __init__(self, schedule: list[float]):
        self.schedule = schedule
        self.step = 0
        self.seen: list[float] = []

    def __call__(self, module, args, kwargs):
        kw = kwargs.get("cross_attention_kwargs") or {}
        if "grounding_tokens" not in kw:
            return None
        if self.step >= len(self.schedule):
            raise RuntimeError(
                f"the UNet ran more than the {len(self.schedule)} scheduled steps; pass the pipeline's "
                "num_inference_steps to generate() and avoid denoising_end/timesteps overrides with a schedule"
            )
        scale = kw["grounding_scale"] * self.schedule[self.step]
        self.step += 1
        self.seen.append(scale)
        return args, {**kwargs, "cross_attention_kwargs": {**kw, "grounding_scale": scale}}


def _min_steps(schedule, beta) -> int | None:
    """Fewest denoising steps at which the schedule grounds at least one step (None: it never does)."""
    for steps in range(1, 1001):
        if any(grounding_schedule(steps, abc=schedule, beta=beta)):
            return steps
    return None


def zero_grounding_message(num_steps: int, schedule, beta) -> str | None:
    """A sentence when the schedule grounds none of ``num_steps`` steps (the layout would have no effect)."""
    if any(grounding_schedule(num_steps, abc=schedule, beta=beta)):
        return None
    form = f"abc={list(schedule)}" if schedule is not None else f"beta={beta}"
    fewest = _min_steps(schedule, beta)
    fix = f"use at least {fewest} steps for this schedule" if fewest else "this schedule never grounds"
    return (
        f"the grounding schedule ({form}) grounds none of the {num_steps} denoising steps (int(fraction x "
        f"steps) = 0), so the layout has no effect; {fix}, or ground every step (schedule=None / --schedule none)"
    )


def generate(
    pipe,
    adapter,
    prompt: str | list[str],
    phrases,
    boxes,
    *,
    gate_scale: float = 1.0,
    schedule: Sequence[float] | str | None = "gligen",
    beta: float | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    num_images_per_prompt: int = 1,
    return_scales: bool = False,
    **pipe_kwargs,
):
    """Run ``pipe`` with the layout: ``phrases[i]`` should appear inside ``boxes[i]`` (normalized xyxy).

    ``gate_scale`` multiplies every gate at run time (1.0 is the trained model; compare 0.5, 1, 2).
    Scheduled sampling: by default (``schedule="gligen"``) GLIGEN's, grounding on for the first
    ``int(0.3 * steps)`` steps and off after (diffusers' GLIGEN pipeline ``beta=0.3``, equal to GLIGEN's
    box-text ``[0.3, 0.0, 0.7]``). ``schedule=[a, b, c]`` (GLIGEN's form) or ``beta`` (diffusers' form)
    choose another; ``schedule=None`` or ``beta=1.0`` keep the grounding on every step. A schedule that
    grounds none of the steps (the default below 4 steps: ``int(0.3 * 3) = 0``) warns: the output would be
    the base model's. ``prompt`` may be None when ``prompt_embeds=`` is given.
    Other keyword arguments go to the pipeline unchanged. With ``return_scales`` it returns
    ``(output, scales)``, the grounding scale each denoising step actually ran with.
    ``num_inference_steps`` and ``guidance_scale`` default to the pipeline's own defaults.

    Args:
        pipe: a Stable Diffusion, SDXL or Kolors pipeline with ``adapter`` installed.
        adapter: the :class:`~diffusers_ext.SpatialAdapter` on ``pipe``.
        prompt: one prompt or a list of prompts.
        phrases: per prompt, the object phrases (one list for all prompts when given once).
        boxes: per prompt, one normalized xyxy box per phrase (the box rule of :mod:`vlext.boxes`).
        gate_scale: multiplies every gate for this call.
        schedule: ``"gligen"``, three fractions ``[a, b, c]`` or None (grounding on every step).
        beta: diffusers' form of the schedule, the share of steps with grounding.
        num_inference_steps: denoising steps (default: the pipeline's).
        guidance_scale: classifier-free guidance scale (default: the pipeline's).
        num_images_per_prompt: images per prompt.
        return_scales: also return the grounding scale of every step.
        **pipe_kwargs: passed to the pipeline unchanged (``generator``, ``height``, ``output_type``, ...).

    Returns:
        The pipeline's output (``.images``), or ``(output, scales)`` with ``return_scales``.

    Example:
        >>> import torch
        >>> from diffusers_ext import SpatialAdapter, generate, phrase_dim
        >>> from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim(pipe), hidden_dim=32)
        >>> adapter.install(pipe)
        >>> out = generate(pipe, adapter, "a red circle", ["a red circle"], [[0.1, 0.1, 0.5, 0.5]],
        ...                num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        >>> len(out.images)
        1
    """
    pipeline_kind(pipe)
    defaults = inspect.signature(pipe.__call__).parameters
    if num_inference_steps is None:
        num_inference_steps = defaults["num_inference_steps"].default
    if guidance_scale is None:
        guidance_scale = defaults["guidance_scale"].default
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if isinstance(schedule, str):
        if schedule != "gligen":
            raise ValueError(
                f"schedule must be 'gligen' (the default: beta={GLIGEN_BETA}), three fractions [a, b, c] or None "
                f"(grounding on every step), got {schedule!r}"
            )
        schedule, beta = None, (GLIGEN_BETA if beta is None else beta)
    steps = grounding_schedule(num_inference_steps, abc=schedule, beta=beta)
    zero = zero_grounding_message(num_inference_steps, schedule, beta)
    if zero:  # int(0.3 * steps) is 0 below 4 steps: the output would be the base model's
        warnings.warn(zero, stacklevel=2)
    user_kwargs = dict(pipe_kwargs.pop("cross_attention_kwargs", None) or {})
    clash = [k for k in GROUNDING_KEYS if k in user_kwargs]
    if clash:
        raise ValueError(
            f"cross_attention_kwargs {clash} are set by generate(); pass phrases/boxes/gate_scale"
        )
    if prompt is None:
        embeds = pipe_kwargs.get("prompt_embeds")
        if embeds is None:
            raise ValueError("generate() needs a prompt (a string or a list) or prompt_embeds=")
        prompts = [None] * int(embeds.shape[0])
    else:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    grounding = grounding_cross_attention_kwargs(
        pipe,
        adapter,
        phrases,
        boxes,
        n_prompts=len(prompts),
        num_images_per_prompt=num_images_per_prompt,
        classifier_free_guidance=cfg,
        gate_scale=gate_scale,
    )
    per_step = _PerStepScale(steps)
    handle = pipe.unet.register_forward_pre_hook(per_step, with_kwargs=True)
    try:
        out = pipe(
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            cross_attention_kwargs={**user_kwargs, **grounding},
            **pipe_kwargs,
        )
    finally:
        handle.remove()
    return (out, per_step.seen) if return_scales else out
