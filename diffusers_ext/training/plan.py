"""Rehearse a spatial-adapter training run on the meta device: ``python -m diffusers_ext.training.plan``.

The suite runs the trainer in fp32 on CPU with tiny models; what only a GPU used to see (a component the
placement forgot, the memory of a published-size step) is seen here without a GPU and without weights. The
published-size pipeline (SD1.5, SDXL or Kolors configs: the UNets of ``diffusers_ext/testing/published_unets.py``,
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, ChatGLM3-6B built with diffusers' own Kolors class, the
SD VAE) is built on the meta device, and the trainer's own code runs on it with the flags given: its
placement (``training.placement``), the cache pass's encoders (``encoders_on_device``), ``build_trainables``
(LoRA, adapter, AdamW or bitsandbytes' 8-bit AdamW, EMA) and two ``training_step`` calls (forward,
backward, clipping, optimizer, EMA).

How the meta device stands in for a GPU:

* every component starts "loaded on the host" as a CPU placeholder with no memory (one element expanded to
  the real shape); the placement moves it to the meta device. A component the placement leaves behind meets
  meta inputs in its first op and PyTorch raises a device mismatch, which the rehearsal reports naming the
  component (:class:`LeftOnHost`). Moving a tensor off the meta device (``.cpu()``, ``.to("cpu")``) gives a
  placeholder of the same shape, since a meta tensor has no data to copy.
* attention runs as the GPU kernels do: ``F.scaled_dot_product_attention`` is routed to
  ``aten._scaled_dot_product_efficient_attention`` (memory-efficient attention; it keeps the output and a
  log-sum-exp per query, linear in tokens), never to the math path, which on meta would allocate the
  quadratic score matrix that no GPU run holds.
* autocast is emulated (autocast has no meta kernel: on meta it does nothing): a function mode casts the
  inputs of the ops that CUDA's autocast runs in bf16/fp16 (linear, convolutions, matmuls, attention) and of
  those it runs in fp32 (group/layer norm, softmax, MSE), so activations are counted in the dtype a GPU keeps
  them in. ``--autocast-rules cpu`` uses CPU autocast's lists instead (the honesty check against a measured
  CPU step). Gradient checkpointing recomputes under the same emulation.
* memory is counted by PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker`` (parameters,
  buffers, gradients, activations, temporaries, optimizer state) over the second step, when AdamW's state
  exists, plus the EMA copy; ``--use-8bit-adam`` runs bitsandbytes' own AdamW8bit, whose quantization maps
  alone are made on the meta device (:func:`_meta_adamw8bit`); the cache pass is counted apart (its
  encoders never share the device with the UNet).

It prints the table, the peak, and a verdict for ``--gpu-memory`` (default: the visible GPU's); when the run
does not fit it rehearses the levers of :data:`LEVERS` in order, adding one at a time, and names the first
combination that fits. Honesty: tests/test_diffusers_plan_honesty.py compares the rehearsal's peak with the
step peak measured on CPU (benchmarks/peak_memory.py) at the tiny size and at a reduced-depth real-width
UNet; benchmarks/gpu/run.sh prints it beside ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LEVERS", "LeftOnHost", "Rehearsal", "main", "preflight", "rehearse"]

GiB = 2**30
# share of the card a run may use: the rest is the CUDA context, cuDNN/cuBLAS workspaces and allocator
# fragmentation, which no tracker of tensors sees
HEADROOM = 0.9
CARDS_GIB = (24, 48, 80)

# text encoders at their published sizes: CLIP ViT-L/14 text (openai/clip-vit-large-patch14),
# OpenCLIP ViT-bigG/14 text with projection (SDXL text_encoder_2), ChatGLM3-6B (THUDM/chatglm3-6b config)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}  # fmt: skip
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}  # fmt: skip
CHATGLM3_6B = {"num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096, "ffn_hidden_size": 13696,
               "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": True,
               "multi_query_group_num": 2, "add_qkv_bias": True, "seq_length": 32768, "original_rope": True}  # fmt: skip
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "latent_channels": 4}  # fmt: skip
# SD's training noise schedule (scheduler/scheduler_config.json of the three models)
SD_SCHEDULE = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
}


def _published(name: str):
    from diffusers_ext.testing import published_unets

    return {"sd15": published_unets.SD15, "sdxl": published_unets.SDXL, "kolors": published_unets.KOLORS}[
        name
    ]


# --model: pipeline class, text encoders (kind, config), tokenizer length
MODELS = {
    "sd15": {"kind": "sd", "text": [("clip", CLIP_L)], "max_length": 77},
    "sdxl": {"kind": "sdxl", "text": [("clip", CLIP_L), ("clip-proj", CLIP_BIGG)], "max_length": 77},
    "kolors": {"kind": "kolors", "text": [("chatglm", CHATGLM3_6B)], "max_length": 256},
}


class LeftOnHost(RuntimeError):
    """A component the placement did not put on the training device (PyTorch's device mismatch, named)."""


@dataclass
class Rehearsal:
    """What one rehearsal found: bytes by category at the step's peak (``step``), the cache pass's peak
    (``cache_pass``, 0 without ``--cache-dir``), the overall ``peak`` and the wall time."""

    flags: list[str]
    step: dict[str, int]
    cache_pass: int
    peak: int
    seconds: float
    cpu_seconds: float = 0.0  # CPU time (wall time counts the other jobs of a shared machine)
    step_rise: int = 0  # the step's peak over the memory in use before it (what a measured step peak sees)
    batch: dict = field(default_factory=dict, repr=False)  # the rehearsed batch (host placeholders)
    empty_prompt: dict | None = field(default=None, repr=False)  # the cached empty prompt's entry, if cached
    notes: list[str] = field(default_factory=list)

    def fits(self, gpu_gib: float, headroom: float = HEADROOM) -> bool:
        return self.peak <= headroom * gpu_gib * GiB


# ---------------------------------------------------------------------------------------------- pipeline
def _text_encoder(kind: str, config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "chatglm":
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

        return ChatGLMModel(ChatGLMConfig(**config))
    cls = CLIPTextModelWithProjection if kind == "clip-proj" else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def host_placeholders(module) -> None:
    """Give every parameter and buffer of ``module`` a CPU placeholder of its shape and dtype that holds one
    element (a zero expanded with stride 0): the module looks loaded on the host, costs no memory, and moves
    to the meta device with ``.to``."""
    import torch

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(_placeholder(p), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = _placeholder(b)


def _placeholder(t):
    import torch

    return torch.zeros((), dtype=t.dtype).expand(t.shape)


def meta_pipeline(model: str, workdir: str | Path | None = None):
    """The published-size pipeline of ``model`` (sd15, sdxl, kolors) with placeholder weights on the host."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from diffusers_ext.testing.tiny_pipelines import tiny_clip_tokenizer

    spec = MODELS[model]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_published(model))
        vae = AutoencoderKL(**SD_VAE, sample_size=unet.config.sample_size * 8)
        encoders = [_text_encoder(kind, config) for kind, config in spec["text"]]
    for module in (unet, vae, *encoders):
        host_placeholders(module)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    if spec["kind"] == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=tiny_clip_tokenizer(77), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    if spec["kind"] == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tiny_clip_tokenizer(77),
            tokenizer_2=tiny_clip_tokenizer(77), unet=unet, scheduler=scheduler,
        )  # fmt: skip
    from diffusers import KolorsPipeline

    from diffusers_ext.testing.tiny_pipelines import _chatglm_tokenizer

    folder = Path(workdir or tempfile.gettempdir()) / "vlext_plan_chatglm_tokenizer"
    return KolorsPipeline(vae=vae, text_encoder=encoders[0], tokenizer=_chatglm_tokenizer(folder), unet=unet,
                          scheduler=scheduler)  # fmt: skip


def folder_pipeline(folder: str | Path):
    """The pipeline of a ``--pretrained-model`` folder with no weights read: UNet, VAE and text encoders built
    from their ``config.json`` on the meta device (host placeholders), tokenizers and scheduler loaded as
    the trainer loads them."""
    import importlib
    import json

    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    index = json.loads((Path(folder) / "model_index.json").read_text())
    modules = {}
    with torch.device("meta"):
        modules["unet"] = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(folder, subfolder="unet")
        )
        modules["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        for name in ("text_encoder", "text_encoder_2"):
            library, cls_name = index.get(name, (None, None))
            if cls_name is None:
                continue
            package = "transformers" if library == "transformers" else f"diffusers.pipelines.{library}"
            cls = getattr(importlib.import_module(package), cls_name)
            modules[name] = cls(cls.config_class.from_pretrained(folder, subfolder=name))
    for module in modules.values():
        host_placeholders(module)
    return DiffusionPipeline.from_pretrained(folder, **modules)


def meta_copy(pipe):
    """A pipeline built from ``pipe`` (e.g. a tiny one with real weights) whose weights are host placeholders."""
    import copy

    out = copy.deepcopy(pipe)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(out, name, None)
        if module is not None:
            host_placeholders(module)
    return out


# -------------------------------------------------------------------------------- the meta device's modes
# CUDA autocast's op lists (torch/csrc/autocast_mode.cpp, "Autocast Op Reference" in torch.amp's docs) and
# CPU autocast's, as far as they touch a UNet step: ops cast to the low-precision dtype, ops cast to fp32
def _autocast_rules(device_type: str):
    import torch
    import torch.nn.functional as F

    low = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
           torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm,
           torch.Tensor.mm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm,
           F.scaled_dot_product_attention, F.prelu}  # fmt: skip
    if device_type == "cuda":
        low |= {torch.einsum}
        fp32 = {F.group_norm, F.layer_norm, F.mse_loss, F.softmax, torch.softmax, torch.Tensor.softmax,
                F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp,
                torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow}  # fmt: skip
    else:
        fp32 = {F.mse_loss}
    return low, fp32


def _cast_floats(args, dtype, cache: dict | None):
    import torch

    def cast(x):
        if (
            isinstance(x, torch.Tensor)
            and x.is_floating_point()
            and x.dtype != dtype
            and x.dtype != torch.float64
        ):
            if cache is not None and x.is_leaf and x.requires_grad:  # autocast caches casts of weights
                key = id(x)
                if key not in cache:
                    cache[key] = x.to(dtype)
                return cache[key]
            return x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v) for v in x)
        return x

    return cast(args)


def _emulated_autocast(dtype, device_type: str = "cuda"):
    """A context manager that does what ``torch.autocast(device_type, dtype)`` does to the ops of a UNet
    step, on any device (autocast has no meta dispatch key)."""
    from torch.overrides import TorchFunctionMode

    low, fp32 = _autocast_rules(device_type)

    class _Autocast(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.cache = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            import torch

            kwargs = kwargs or {}
            if func in low:
                args, kwargs = _cast_floats(args, dtype, self.cache), _cast_floats(kwargs, dtype, self.cache)
            elif func in fp32:
                args, kwargs = (
                    _cast_floats(args, torch.float32, None),
                    _cast_floats(kwargs, torch.float32, None),
                )
            return func(*args, **kwargs)

    return _Autocast()


class _MetaDevice:
    """The function mode under which a rehearsal runs (see the module docstring): linear-memory attention,
    placeholders for copies off the meta device."""

    def __new__(cls):
        import torch
        import torch.nn.functional as F
        from torch.overrides import TorchFunctionMode

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is F.scaled_dot_product_attention:
                    return _efficient_attention(*args, **kwargs)
                if func in _hooks() and not args[0].requires_grad:
                    # MemTracker hooks every parameter for its gradient; a frozen one never gets one
                    return _NoHook()
                if func in (torch.all, torch.Tensor.all, torch.any, torch.Tensor.any) and args[0].is_meta:
                    # a value check (finite boxes, no broken box) on data a meta tensor does not hold: the
                    # rehearsal's batch is valid by construction, so the check passes
                    return torch.tensor(func in (torch.all, torch.Tensor.all))
                if func == torch.Tensor.data.__set__ and args[0].is_meta != args[1].is_meta:
                    # ``p.data = moved``: a placeholder and a meta tensor cannot share storage types; swap
                    # the payload so that ``p`` (an object the caller keeps) is the moved tensor
                    target, moved = args[0], args[1]
                    if isinstance(target, torch.nn.Parameter):
                        moved = torch.nn.Parameter(moved, requires_grad=target.requires_grad)
                    torch.utils.swap_tensors(target, moved)
                    return None
                if func in (torch.Tensor.cpu, torch.Tensor.to) and args and isinstance(args[0], torch.Tensor):
                    source = args[0]
                    if source.is_meta and _target_is_host(func, args[1:], kwargs):
                        dtype = _target_dtype(args[1:], kwargs) or source.dtype
                        return torch.zeros((), dtype=dtype).expand(source.shape)
                return func(*args, **kwargs)

        return _Mode()


class _NoHook:
    def remove(self) -> None:
        pass


def _hooks():
    import torch

    return (torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook)


def _target_is_host(func, args, kwargs) -> bool:
    import torch

    if func is torch.Tensor.cpu:
        return True
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return torch.device(a).type == "cpu"
    return False


def _target_dtype(args, kwargs):
    import torch

    for a in (*args, kwargs.get("dtype")):
        if isinstance(a, torch.dtype):
            return a
    return None


def _efficient_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """SDPA as memory-efficient attention computes it: output and log-sum-exp, no (L, S) score matrix."""
    import torch

    if (
        enable_gqa and key.shape[-3] != query.shape[-3]
    ):  # ChatGLM's grouped keys: expand as the math path does
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype).expand(*query.shape[:-2], query.shape[-2], key.shape[-2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, torch.is_grad_enabled(), dropout_p, is_causal, scale=scale
    )
    return out[0]


def _checkpoint_under(autocast_factory):
    """diffusers' gradient checkpointing function, with the recomputation under the same emulated autocast as
    the forward (torch's checkpoint re-enters real autocast, not a function mode)."""
    import torch

    def fn(module, *args):
        active = _ACTIVE_AUTOCAST[-1] if _ACTIVE_AUTOCAST else None

        def contexts():
            return contextlib.nullcontext(), _recompute_context(active)

        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=contexts
        )

    return fn


_ACTIVE_AUTOCAST: list = []


@contextlib.contextmanager
def _recompute_context(autocast_factory):
    # the backward pass may run outside the rehearsal's function modes: enter them again
    with _MetaDevice(), autocast_factory() if autocast_factory is not None else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _tracked_autocast(factory):
    _ACTIVE_AUTOCAST.append(factory)
    try:
        with factory():
            yield
    finally:
        _ACTIVE_AUTOCAST.pop()


# ------------------------------------------------------------------------------------------- rehearsal
def trainer_argv(opts: argparse.Namespace) -> list[str]:
    """The trainer's flags for a rehearsal's options (data and output paths are never read)."""
    argv = ["--mixed-data", "rehearsal.jsonl", "--pretrained-model", getattr(opts, "pretrained_model", None) or opts.model,
            "--output-dir", "rehearsal", "--batch-size", str(opts.batch_size),
            "--mixed-precision", opts.mixed_precision, "--max-objs", str(opts.max_objs)]  # fmt: skip
    if opts.resolution:
        argv += ["--resolution", str(opts.resolution)]
    if opts.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if opts.cache_dir:
        argv += ["--cache-dir", "rehearsal-cache"]
    if opts.cache_latents:
        argv.append("--cache-latents")
    if opts.lora_rank:
        argv += ["--lora-rank", str(opts.lora_rank)]
    if opts.ema:
        argv.append("--ema")
    if opts.layers:
        argv += ["--layers", *opts.layers]
    if getattr(opts, "accumulation", 1) > 1:  # memory of one micro-batch; the trainer records the flag
        argv += ["--gradient-accumulation-steps", str(opts.accumulation)]
    return argv + list(opts.trainer_flags or [])


def _components(pipe) -> dict:
    return {n: getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}


def _left_on_host(pipe, adapter=None) -> list[str]:
    mods = {**_components(pipe), "adapter": adapter}
    return [
        name
        for name, m in mods.items()
        if m is not None and any(t.device.type == "cpu" for t in (*m.parameters(), *m.buffers()))
    ]


def _device_bytes(snapshot) -> dict[str, int]:
    import torch

    cats = snapshot.get(torch.device("meta"), {})
    return {str(getattr(k, "value", k)): int(v) for k, v in cats.items()}


def _ema_bytes(ema) -> int:
    if ema is None:
        return 0
    return sum(p.numel() * p.element_size() for p in ema.shadow_params)


def _meta_adamw8bit():
    """bitsandbytes' ``AdamW8bit`` as the rehearsal runs it (Dettmers et al. 2022, 8-bit optimizers via
    block-wise quantization). Everything but the quantization maps is bitsandbytes' own: ``init_state`` gives
    each parameter of at least ``min_8bit_size`` values uint8 ``state1``/``state2`` of its shape and fp32
    ``absmax1``/``absmax2`` per block of 256, smaller ones fp32 32-bit moments, and ``update_step`` calls the
    fused kernel, whose meta registration allocates nothing, as the CUDA kernel updates in place. Only
    ``fill_qmap`` differs: bitsandbytes computes its two 256-value fp32 maps with ``.tolist()``, which has no
    data to read on the meta device, so the stand-in makes maps of the same shape and dtype there.
    tests/test_diffusers_plan.py checks its state bytes against the real optimizer's after a CPU step."""
    import torch

    from diffusers_ext.training.optimizers import import_bitsandbytes

    bnb = import_bitsandbytes()

    class MetaAdamW8bit(bnb.optim.AdamW8bit):
        def fill_qmap(self):
            for name in ("dynamic", "udynamic"):
                self.name2qmap[name] = torch.zeros(256, dtype=torch.float32, device="meta")

    return MetaAdamW8bit


@contextlib.contextmanager
def _rehearsed_8bit_adam(enabled: bool):
    """While the rehearsal builds its trainables, ``--use-8bit-adam`` builds :func:`_meta_adamw8bit` through
    the trainer's own ``build_optimizer`` (its lever tag and stochastic rounding included)."""
    if not enabled:
        yield
        return
    from diffusers_ext.training import optimizers

    bnb = optimizers.import_bitsandbytes()

    real, cached = bnb.optim.AdamW8bit, dict(optimizers._CLASSES)
    bnb.optim.AdamW8bit = _meta_adamw8bit()
    optimizers._CLASSES.clear()
    try:
        yield
    finally:
        bnb.optim.AdamW8bit = real
        optimizers._CLASSES.clear()
        optimizers._CLASSES.update(cached)


def _prime_optimizer(optimizer) -> None:
    """Leave AdamW's state as a first step leaves it (both moments of every parameter), so the rehearsed
    step is any later one: an optimizer step over zero gradients, which cost nothing on the meta device."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _cache_pass(pipe, kind, placement, targs, batch_size: int, resolution: int):
    """The cache pass's encoders as ``fill_conditioning_cache`` runs them (``encoders_on_device``: one
    encoder kind on the device at a time), one batch of texts and, with ``--cache-latents``, one batch of
    images. Returns its peak bytes and the cached entries a training batch then carries (host placeholders)."""
    import torch

    from diffusers_ext.generation import encode_phrases
    from diffusers_ext.training.conditioning_cache import _encode_prompts
    from diffusers_ext.training.dataset import to_unit_range
    from diffusers_ext.training.placement import encoders_on_device

    text_batch = 16  # fill_cache's text_batch_size
    texts = [_caption(i) for i in range(text_batch)]
    phrases = [_phrase(i) for i in range(text_batch)]
    entries = {}
    tracker = _tracker()
    tracker.track_external(*[m for m in _components(pipe).values() if m is not None])
    with tracker:
        with encoders_on_device(pipe, placement, ("text_encoder", "text_encoder_2")):
            prompts = _encode_prompts(pipe, kind, texts, placement.device)
            feats = encode_phrases(pipe, phrases)
            entries["prompt"] = {k: v.cpu() for k, v in prompts[0].items()}
            entries["phrase"] = feats[0].cpu()
            del prompts, feats
        if placement.cache_latents:
            pixels = torch.zeros((), dtype=torch.float32).expand(batch_size, 3, resolution, resolution)
            with encoders_on_device(pipe, placement, ("vae",)), torch.no_grad():
                dist = pipe.vae.encode(
                    to_unit_range(pixels.to(placement.device)).to(placement.vae_dtype)
                ).latent_dist
                entries["latent"] = (dist.mean[0].cpu(), dist.std[0].cpu())
                del dist
    return _device_bytes(tracker.get_tracker_snapshot("peak")).get("Total", 0), entries


def _caption(i: int) -> str:
    return f"a photo of scene {i} with many objects on a table in a bright room"


def _phrase(i: int) -> str:
    return f"object number {i}"


def _expand(t, n: int):
    return t.unsqueeze(0).expand(n, *t.shape)


def synthetic_batch(kind: str, targs, resolution: int, entries: dict | None) -> dict:
    """A batch with the keys ``collate_samples`` gives: ``--max-objs`` boxes and phrases per sample, pixels or
    cached latents, cached prompt embeddings and phrase features when ``entries`` (from the cache pass) are
    given. Tensors are host placeholders (the loader's output)."""
    import torch

    b, n = targs.batch_size, targs.max_objs
    side = 1.0 / (n + 1)
    batch = {
        "caption": [_caption(i) for i in range(b)],
        "phrases": [[_phrase(k) for k in range(n)] for _ in range(b)],
        "boxes": [[[k * side, k * side, (k + 1) * side, (k + 1) * side] for k in range(n)] for _ in range(b)],
    }
    if kind != "sd":
        batch["original_size"] = [(resolution, resolution)] * b
        batch["crop_top_left"] = [(0, 0)] * b
    if entries:
        batch["prompt_embeds"] = _expand(entries["prompt"]["prompt_embeds"], b)
        if "pooled" in entries["prompt"]:
            batch["pooled"] = _expand(entries["prompt"]["pooled"], b)
        batch["phrase_feats"] = [_expand(entries["phrase"], n) for _ in range(b)]
    if entries and "latent" in entries:
        batch["latent_mean"] = _expand(entries["latent"][0], b)
        batch["latent_std"] = _expand(entries["latent"][1], b)
    else:
        batch["pixels"] = torch.zeros((), dtype=torch.float32).expand(b, 3, resolution, resolution)
    return batch


def _tracker():
    """PyTorch's MemTracker, counting device totals only: a top-level module may run twice in one tracked
    region (the text encoder for prompts, then for phrases), and per-module peaks are not kept (they cost a
    pass over every module at every op: minutes for SDXL's 70 transformer blocks)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _Tracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state):
            # the device peak only: the per-module peaks cost a pass over every module at every op
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return _Tracker()


@contextlib.contextmanager
def _swap_on_conversion():
    import torch

    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def rehearse(opts: argparse.Namespace, pipeline=None) -> Rehearsal:
    """Run the trainer's placement, cache pass, ``build_trainables`` and two ``training_step`` calls on the
    meta device with ``opts`` (the options of :func:`build_parser`); ``pipeline``: a pipeline whose weights
    are host placeholders (default: the published-size ``--model``). Raises :class:`LeftOnHost` naming a
    component the placement left on the host."""
    import torch

    from diffusers_ext.generation import phrase_dim, pipeline_kind
    from diffusers_ext.training import train_spatial_adapter as trainer
    from diffusers_ext.training.placement import plan_placement

    started, cpu_started = time.perf_counter(), time.process_time()
    argv = trainer_argv(opts)
    targs = trainer.parse_args(argv)
    if pipeline is not None:
        pipe = pipeline
    elif getattr(opts, "pretrained_model", None):
        pipe = folder_pipeline(opts.pretrained_model)
    else:
        pipe = meta_pipeline(opts.model)
    kind = pipeline_kind(pipe)
    placement = plan_placement(
        targs.mixed_precision,
        "meta",
        cache_dir=bool(targs.cache_dir),
        cache_latents=targs.cache_latents,
        vae_force_upcast=bool(getattr(pipe.vae.config, "force_upcast", True)),
        bf16_adapter=getattr(targs, "bf16_adapter", False),
    )
    resolution = targs.resolution or trainer.default_resolution(pipe)
    scaling = pipe.vae.config.scaling_factor
    low = placement.weight_dtype
    autocast_factory = (
        (lambda: _emulated_autocast(low, opts.autocast_rules))
        if low != torch.float32
        else contextlib.nullcontext
    )
    trainables = None
    phrase_width = phrase_dim(pipe)  # before the cache pass frees the text encoders, as train() does
    with _MetaDevice():
        try:
            cache_peak, entries, empty = 0, None, None
            if targs.cache_dir:
                cache_peak, entries = _cache_pass(
                    pipe, kind, placement, targs, getattr(targs, "cache_batch_size", 4), resolution
                )
                empty = entries["prompt"]
                for name in ("text_encoder", "text_encoder_2") + (("vae",) if targs.cache_latents else ()):
                    if getattr(pipe, name, None) is not None:
                        setattr(pipe, name, None)
            batch = synthetic_batch(kind, targs, resolution, entries)
            gc.collect()  # the cache pass's tracker holds weak references that would block the swap below
            # LoRA and the adapter are created where they train, not on the host; Module.to keeps each
            # Parameter object and swaps its payload (host placeholders and meta tensors cannot share storage
            # types, and the placement holds on to the adapter's parameters while it moves the UNet)
            with (
                torch.device("meta"),
                _swap_on_conversion(),
                _rehearsed_8bit_adam(getattr(targs, "optimizer", "adamw") == "adamw8bit"),
            ):
                trainables = trainer.build_trainables(targs, pipe, placement, phrase_width=phrase_width)
            if targs.gradient_checkpointing:
                pipe.unet.enable_gradient_checkpointing(_checkpoint_under(autocast_factory))
            state = trainer.RunState(
                args=targs, pipe=pipe, kind=kind, placement=placement, trainables=trainables,
                resolution=resolution, empty_prompt=empty, scaling=scaling,
                autocast=lambda: _tracked_autocast(autocast_factory),
            )  # fmt: skip
            _prime_optimizer(trainables.optimizer)
            tracker = _tracker()
            modules = [m for m in _components(pipe).values() if m is not None]
            tracker.track_external(*modules, trainables.adapter, trainables.optimizer)
            with tracker:
                start = _device_bytes(tracker.get_tracker_snapshot("current"))
                trainer.training_step(state, batch, 0)
                peak = _device_bytes(tracker.get_tracker_snapshot("peak"))
        except RuntimeError as e:
            left = _left_on_host(pipe, trainables.adapter if trainables is not None else None)
            if left:  # PyTorch's first complaint is the device or, for an uncast module, the dtype
                raise LeftOnHost(
                    f"rehearsal: {', '.join(left)} left on the host while the step runs on the device "
                    f"(the placement rule did not place {'it' if len(left) == 1 else 'them'}); PyTorch said: "
                    f"{str(e).splitlines()[0]}"
                ) from e
            raise
    ema = _ema_bytes(trainables.ema)
    step = {k: v for k, v in peak.items() if k != "Total"}
    step["EMA"] = ema
    total = peak.get("Total", sum(step.values())) + ema
    step_rise = peak.get("Total", 0) - start.get("Total", 0)
    return Rehearsal(
        flags=argv[6:], step=step, cache_pass=cache_peak, peak=max(total, cache_peak),
        seconds=time.perf_counter() - started, step_rise=step_rise,
        cpu_seconds=time.process_time() - cpu_started, batch=batch, empty_prompt=empty,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- levers, CLI
@dataclass(frozen=True)
class Lever:
    """One way to need less memory: ``applies`` says whether it can still be added to ``opts``, ``apply``
    returns the options with it (and the flags a user adds). Adding a lever is one entry in :data:`LEVERS`."""

    name: str
    applies: object  # (opts) -> bool
    apply: object  # (opts) -> argparse.Namespace


def _with(opts, **changes):
    return argparse.Namespace(**{**vars(opts), **changes})


def _halve_batch(opts):
    accumulation = opts.accumulation * 2
    return _with(opts, batch_size=opts.batch_size // 2, accumulation=accumulation)


def _trainer_has(flag: str) -> bool:
    from diffusers_ext.training.train_spatial_adapter import build_parser

    return any(flag in a.option_strings for a in build_parser()._actions)


# tried in this order, each added to the ones before, until the run fits
LEVERS = (
    Lever("--cache-dir", lambda o: not o.cache_dir, lambda o: _with(o, cache_dir=True)),
    Lever("--cache-latents", lambda o: o.cache_dir and not o.cache_latents, lambda o: _with(o, cache_latents=True)),
    Lever("--gradient-checkpointing", lambda o: not o.gradient_checkpointing,
          lambda o: _with(o, gradient_checkpointing=True)),
    Lever("smaller --batch-size with gradient accumulation", lambda o: o.batch_size > 1, _halve_batch),
    # 8-bit moments and bf16 weights cost no capacity, so they come before the lighter presets
    Lever("--use-8bit-adam", lambda o: _trainer_has("--use-8bit-adam") and not _uses_8bit_adam(o.trainer_flags),
          lambda o: _with(o, trainer_flags=[*o.trainer_flags, "--use-8bit-adam"])),
    Lever("--bf16-adapter", lambda o: o.mixed_precision == "bf16" and _trainer_has("--bf16-adapter")
          and "--bf16-adapter" not in o.trainer_flags,
          lambda o: _with(o, trainer_flags=[*o.trainer_flags, "--bf16-adapter"])),
    # lighter fuser placements (diffusers_ext/fuser_presets.py) change the model, so they come last
    *(Lever(f"--layers {preset}", lambda o, p=preset: _presets_exist() and _lighter(o.layers, p),
            lambda o, p=preset: _with(o, layers=[p])) for preset in ("migc", "migc-one-per-stack")),
)  # fmt: skip


_LIGHTER = ("all", "migc", "migc-one-per-stack")


def _uses_8bit_adam(flags) -> bool:
    flags = list(flags)
    pairs = zip(flags, [*flags[1:], None])
    return any(f in ("--use-8bit-adam", "--optimizer=adamw8bit") or (f, n) == ("--optimizer", "adamw8bit")
               for f, n in pairs)  # fmt: skip


def _presets_exist() -> bool:
    try:
        from diffusers_ext.fuser_presets import FUSER_PRESETS
    except ImportError:
        return False
    return all(p in FUSER_PRESETS for p in _LIGHTER)


def _lighter(layers, preset: str) -> bool:
    """Whether ``preset`` adapts fewer blocks than ``layers`` (None: all); prefix lists are left as given."""
    current = "all" if not layers else (layers[0] if len(layers) == 1 and layers[0] in _LIGHTER else None)
    return current is not None and _LIGHTER.index(preset) > _LIGHTER.index(current)


def user_flags(opts) -> str:
    """The trainer flags of ``opts`` that decide memory, as a user types them."""
    flags = [f"--mixed-precision {opts.mixed_precision}", f"--batch-size {opts.batch_size}"]
    if opts.accumulation > 1:
        flags.append(f"--gradient-accumulation-steps {opts.accumulation}")
    if opts.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if opts.cache_dir:
        flags.append("--cache-dir DIR")
    if opts.cache_latents:
        flags.append("--cache-latents")
    if opts.lora_rank:
        flags.append(f"--lora-rank {opts.lora_rank}")
    if opts.ema:
        flags.append("--ema")
    if opts.layers:
        flags.append("--layers " + " ".join(opts.layers))
    return " ".join(flags + list(opts.trainer_flags))


def advise(opts, gpu_gib: float, headroom: float = HEADROOM, rehearse_fn=None):
    """Add the levers of :data:`LEVERS` one at a time, in order, rehearsing each combination; return the
    first (options, rehearsal) that fits ``gpu_gib``, or (None, the last rehearsal) when none does."""
    rehearse_fn = rehearse_fn or rehearse
    current, last = opts, None
    for lever in LEVERS:
        while lever.applies(current):
            current = lever.apply(current)
            last = rehearse_fn(current)
            if last.fits(gpu_gib, headroom):
                return current, last
            if lever.name.startswith("smaller --batch-size"):
                continue  # halve again
            break
    return None, last


def visible_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


def format_table(opts, result: Rehearsal) -> str:
    """The category table of one rehearsal (GiB at the step's peak), its cache pass and its peak."""
    rows = [f"| {k.lower()} | {v / GiB:.2f} |" for k, v in result.step.items() if v or k in ("Activation",)]
    lines = [
        f"{getattr(opts, 'pretrained_model', None) or opts.model} at {opts.resolution or 'its default'} px: "
        f"{user_flags(opts)}",
        "| at the step's peak | GiB |",
        "|---|---|",
        *rows,
        f"| **step peak** | **{(sum(result.step.values())) / GiB:.2f}** |",
    ]
    if opts.cache_dir:
        lines.append(f"| cache pass peak (before training) | {result.cache_pass / GiB:.2f} |")
    lines.append(f"peak {result.peak / GiB:.2f} GiB (rehearsed in {result.cpu_seconds:.0f} s of CPU time)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusers_ext.training.plan",
        description="Rehearse spatial-adapter training on the meta device (no weights, no GPU): peak memory by "
        "category, a verdict for --gpu-memory and, when it does not fit, the flags that make it fit.",
        allow_abbrev=False,
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--model", choices=sorted(MODELS), default="sdxl", help="published configs, no weights"
    )
    model.add_argument("--pretrained-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the UNet's)")
    p.add_argument("--batch-size", type=int, default=1, help="per process, as the trainer's")
    p.add_argument("--gradient-accumulation-steps", dest="accumulation", type=int, default=1,
                   help="steps per optimizer update (memory as one step of --batch-size)")  # fmt: skip
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cache-dir", action="store_true", help="as the trainer's --cache-dir DIR (text cached)")
    p.add_argument("--cache-latents", action="store_true", help="as the trainer's (VAE latents cached too)")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--ema", action="store_true")
    p.add_argument("--layers", nargs="*", default=None, help="as the trainer's --layers")
    p.add_argument("--max-objs", type=int, default=30, help="objects per sample (every slot filled)")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GiB of the card to judge against (default: the visible GPU's)")  # fmt: skip
    p.add_argument("--headroom", type=float, default=HEADROOM,
                   help="share of --gpu-memory a run may use (the rest: CUDA context, workspaces, fragmentation)")  # fmt: skip
    p.add_argument(
        "--no-advice", dest="advice", action="store_false", help="do not search for flags that fit"
    )
    p.add_argument("--autocast-rules", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--trainer-flag", dest="trainer_flags", action="append", default=[],
                   help="any other trainer flag, passed as is (repeatable, e.g. --trainer-flag=--use-8bit-adam)")  # fmt: skip
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    opts = p.parse_args(argv)
    if opts.cache_latents and not opts.cache_dir:
        p.error("--cache-latents needs --cache-dir (the trainer caches latents in the cache folder)")
    for name in ("batch_size", "accumulation", "max_objs"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.gpu_memory is not None and not opts.gpu_memory > 0:
        p.error(f"--gpu-memory must be > 0 GiB, got {opts.gpu_memory}")
    if not 0 < opts.headroom <= 1:
        p.error(f"--headroom must be in (0, 1], got {opts.headroom}")
    return opts


def verdict(opts, result: Rehearsal, gpu_gib: float | None) -> str:
    if gpu_gib is None:
        return "verdict: no GPU visible; pass --gpu-memory GiB to judge this run against a card"
    budget = opts.headroom * gpu_gib
    word = "fits" if result.fits(gpu_gib, opts.headroom) else "does NOT fit"
    return (f"verdict: {word} on {gpu_gib:g} GiB (peak {result.peak / GiB:.2f} GiB, budget {budget:.1f} GiB "
            f"= {opts.headroom:.0%} of the card)")  # fmt: skip


def _preflight_flags(trainer_args) -> list[str]:
    """The trainer's memory flags that this module's options pass on as ``--trainer-flag``."""
    flags = ["--bf16-adapter"] if getattr(trainer_args, "bf16_adapter", False) else []
    if getattr(trainer_args, "optimizer", "adamw") == "adamw8bit":
        flags.append("--use-8bit-adam")
    return flags


def preflight(trainer_args, gpu_gib: float | None = None) -> tuple[bool, str]:
    """For the trainer, before it loads weights: rehearse its flags on the ``--pretrained-model`` folder's
    configs (:func:`folder_pipeline`, no weights read) and judge them against ``gpu_gib`` (default: the
    visible GPU; without one everything passes). Returns (fits, a verdict line naming the flags that would fit
    when it does not)."""
    gpu_gib = gpu_gib if gpu_gib is not None else visible_gpu_gib()
    opts = _with(
        parse_args([]),
        pretrained_model=trainer_args.pretrained_model,
        resolution=trainer_args.resolution,
        batch_size=trainer_args.batch_size,
        mixed_precision=trainer_args.mixed_precision,
        gradient_checkpointing=trainer_args.gradient_checkpointing,
        cache_dir=bool(trainer_args.cache_dir),
        cache_latents=trainer_args.cache_latents,
        lora_rank=trainer_args.lora_rank,
        ema=trainer_args.ema,
        layers=trainer_args.layers,
        max_objs=trainer_args.max_objs,
        trainer_flags=_preflight_flags(trainer_args),
    )
    if gpu_gib is None:
        return True, "verdict: no GPU visible, nothing to judge against"
    result = rehearse(opts)
    if result.fits(gpu_gib, opts.headroom):
        return True, verdict(opts, result, gpu_gib)
    fix, _ = advise(opts, gpu_gib, opts.headroom)
    hint = f"; {user_flags(fix)} fits" if fix is not None else "; no combination of the levers fits"
    return False, verdict(opts, result, gpu_gib) + hint


def main(argv=None) -> int:
    opts = parse_args(argv)
    gpu_gib = opts.gpu_memory if opts.gpu_memory is not None else visible_gpu_gib()
    result = rehearse(opts)
    print(format_table(opts, result))
    print(verdict(opts, result, gpu_gib))
    if gpu_gib is not None and not result.fits(gpu_gib, opts.headroom) and opts.advice:
        fix, found = advise(opts, gpu_gib, opts.headroom)
        if fix is None:
            print(f"advice: no combination of {', '.join(lever.name for lever in LEVERS)} fits {gpu_gib:g} GiB "
                  f"(the last tried peaks at {found.peak / GiB:.2f} GiB)")  # fmt: skip
        else:
            print(f"advice: {user_flags(fix)} fits (peak {found.peak / GiB:.2f} GiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
