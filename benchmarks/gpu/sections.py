"""Sections of ``benchmarks/gpu/run.sh``; each runs alone: ``python -m benchmarks.gpu.sections NAME [--tiny]``.

Random weights at published sizes (``diffusers_ext/testing/published_unets.py``), nothing downloaded:

* ``device``: torch, the device name (``torch.cuda.get_device_name``) and its memory.
* ``train-sd15``, ``train-sdxl``, ``train-kolors``: the trainer's own ``build_trainables`` and
  ``training_step`` with ``--mixed-precision bf16 --gradient-checkpointing --cache-dir --cache-latents``: the
  placement rule, the frozen UNet built directly on the device in bf16 (never in fp32 then cast), the fp32
  adapter created on the device, bf16 autocast, AdamW, 30 objects, the batch the rehearsal used with random
  values; SD1.5 at 512 px, SDXL and Kolors at 1024 px; batch 1 and 4. Prints seconds per step (median of the
  timed steps after one warm-up step) and the rehearsal's predicted peak
  (``diffusers_ext/training/plan.py``) beside ``torch.cuda.max_memory_allocated``.
* ``generate-sd15``: images/s of a 512 px SD1.5-sized pipeline (random weights built in fp16 on the device, a
  CLIP ViT-L/14-sized text encoder, the SD VAE), 20 DDIM steps, batch 4: without the adapter, with GLIGEN's
  schedule (the number of grounded steps in the label) and grounded on every step (the per-step cost).

``--tiny``: the same code on tiny pipelines on CPU with bf16 autocast (generation in bf16): a check that the
GPU path runs, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run by path: the repository before fairscale's top-level `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusers_ext.training.plan import CLIP_L, SD_VAE  # noqa: E402

TRAIN_STEPS = 4  # timed, after one warm-up step
GEN_STEPS = 20


def _device(tiny: bool) -> str:
    import torch

    if tiny:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on CPU")
    return "cuda"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def section_device(tiny: bool) -> None:
    import torch

    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("GPU: none (CPU)")


@contextlib.contextmanager
def _built_as(device: str, dtype):
    """Modules created inside are created on ``device`` in ``dtype``: a published-size UNet is never built in
    fp32 and then cast (SDXL's would hold 10 GB of fp32 weights for a moment)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def _tiny_pipeline(model: str):
    import tempfile

    from diffusers_ext.testing import tiny_pipelines

    if model == "sd15":
        return tiny_pipelines.tiny_sd_pipeline()
    if model == "sdxl":
        return tiny_pipelines.tiny_sdxl_pipeline()
    return tiny_pipelines.tiny_kolors_pipeline(tempfile.mkdtemp(prefix="gpu_bench_kolors_"))


def _random_like(value):
    import torch

    if isinstance(value, torch.Tensor):
        return torch.randn(value.shape, dtype=value.dtype)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [_random_like(v) for v in value]
    return value


def _train(model: str, tiny: bool) -> None:
    """The trainer's own steps (``build_trainables``, ``training_step``) with ``--mixed-precision bf16
    --gradient-checkpointing --cache-dir --cache-latents``, the rehearsal's prediction beside the measured
    peak. ``--tiny``: the same code on tiny pipelines on CPU, bf16 autocast included."""
    import torch

    from diffusers_ext.generation import phrase_dim, pipeline_kind
    from diffusers_ext.training import plan
    from diffusers_ext.training import train_spatial_adapter as trainer
    from diffusers_ext.training.placement import plan_placement

    device = _device(tiny)
    for batch_size in (1, 4):
        argv = ["--model", model, "--batch-size", str(batch_size), "--mixed-precision", "bf16",
                "--gradient-checkpointing", "--cache-dir", "--cache-latents"]  # fmt: skip
        opts = plan.parse_args(argv)
        if tiny:  # judged by CPU autocast's op lists, as the CPU runs it
            opts = plan._with(opts, autocast_rules="cpu")
        predicted = plan.rehearse(opts, pipeline=plan.meta_copy(_tiny_pipeline(model)) if tiny else None)
        targs = trainer.parse_args(plan.trainer_argv(opts))
        placement = plan_placement("bf16", device, cache_dir=True, cache_latents=True)
        torch.manual_seed(0)
        if tiny:
            pipe = _tiny_pipeline(model)
        else:  # published configs: the UNet built on the device in bf16, the cached encoders never built
            from diffusers import UNet2DConditionModel

            pipe = plan.meta_pipeline(model)
            with _built_as(device, placement.weight_dtype):
                pipe.unet = UNet2DConditionModel(**plan._published(model))
        kind, width, scaling = pipeline_kind(pipe), phrase_dim(pipe), pipe.vae.config.scaling_factor
        resolution = trainer.default_resolution(pipe)
        for name in ("text_encoder", "text_encoder_2", "vae"):
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        batch = {k: _random_like(v) for k, v in predicted.batch.items()}
        empty = {k: _random_like(v) for k, v in predicted.empty_prompt.items()}
        with torch.device(device):  # the adapter is created where it trains
            trainables = trainer.build_trainables(targs, pipe, placement, phrase_width=width)
        state = trainer.RunState(args=targs, pipe=pipe, kind=kind, placement=placement, trainables=trainables,
                                 resolution=resolution, empty_prompt=empty, scaling=scaling)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(1 + (1 if tiny else TRAIN_STEPS)):
            _sync(device)
            start = time.perf_counter()
            loss = trainer.training_step(state, batch, step)
            _sync(device)
            if step:
                times.append(time.perf_counter() - start)
        measured = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "n/a (CPU)"
        median = statistics.median(times)
        adapter = sum(p.numel() for p in trainables.params)
        unet = sum(p.numel() for p in pipe.unet.parameters()) - adapter
        print(f"train {model} {resolution}px batch {batch_size}: UNet {unet / 1e6:.1f} M bf16, adapter "
              f"{adapter / 1e6:.1f} M fp32, bf16 autocast, checkpointing, cached conditioning: "
              f"{median:.3f} s/step, {batch_size / median:.2f} samples/s, loss {float(loss):.4f}", flush=True)  # fmt: skip
        print(f"memory {model} batch {batch_size}: rehearsal {predicted.peak / 2**30:.2f} GiB, "
              f"measured max_memory_allocated {measured}", flush=True)  # fmt: skip
        del state, trainables, pipe, batch
        if device == "cuda":
            torch.cuda.empty_cache()


def _sd15_pipeline(tiny: bool, device: str):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusers_ext.testing.published_unets import SD15
    from diffusers_ext.testing.tiny_pipelines import tiny_clip_tokenizer, tiny_sd_pipeline

    dtype = _half(device)
    if tiny:
        return tiny_sd_pipeline().to(device, dtype)
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    with _built_as(device, dtype):
        tokenizer = tiny_clip_tokenizer(max_length=77)  # a byte-level vocabulary; the model is CLIP-L sized
        config = {**CLIP_L, "vocab_size": max(CLIP_L["vocab_size"], len(tokenizer)),
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE, sample_size=512),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config)).eval(),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**SD15),
            scheduler=DDIMScheduler(
                beta_schedule="scaled_linear",
                beta_start=0.00085,
                beta_end=0.012,
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),  # fmt: skip
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe


def _half(device: str):
    """The half type a pipeline generates in: fp16 on the GPU, bf16 on the CPU (which has no fast fp16)."""
    import torch

    return torch.float16 if device == "cuda" else torch.bfloat16


def section_generate(tiny: bool) -> None:
    import torch

    from diffusers_ext.generation import generate, phrase_dim
    from diffusers_ext.spatial_adapter import SpatialAdapter, installed_adapter

    device = _device(tiny)
    pipe = _sd15_pipeline(tiny, device)
    pipe.set_progress_bar_config(disable=True)
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe)).to(device, pipe.unet.dtype)
    batch, steps = (2, 4) if tiny else (4, GEN_STEPS)  # 4: the fewest steps GLIGEN's schedule grounds one of
    prompts = ["a photo of a red cube and a blue ball on a table"] * batch
    phrases = [["a red cube", "a blue ball"]] * batch
    boxes = [[[0.1, 0.2, 0.45, 0.6], [0.55, 0.3, 0.9, 0.8]]] * batch
    common = {"num_inference_steps": steps, "output_type": "pil"}

    def plain():  # the pipeline alone, as evaluate's baseline row
        if installed_adapter(pipe) is not None:
            adapter.remove()
        return pipe(prompt=prompts, generator=torch.Generator(device).manual_seed(0), **common).images

    def grounded():
        if installed_adapter(pipe) is None:
            adapter.install(pipe)
        gen = torch.Generator(device).manual_seed(0)
        return generate(pipe, adapter, prompts, phrases, boxes, generator=gen, **common).images

    grounded_steps = int(0.3 * steps)  # GLIGEN's default schedule grounds the first 30 % of the steps

    def every_step():
        if installed_adapter(pipe) is None:
            adapter.install(pipe)
        gen = torch.Generator(device).manual_seed(0)
        return generate(pipe, adapter, prompts, phrases, boxes, generator=gen, schedule=None, **common).images

    rates = {}
    runs = (
        ("without adapter", plain),
        (f"with adapter, GLIGEN schedule ({grounded_steps} of {steps} steps grounded)", grounded),
        (f"with adapter, grounded on every step ({steps} of {steps})", every_step),
    )
    for name, fn in runs:
        fn()  # warm-up
        _sync(device)
        start = time.perf_counter()
        images = fn()
        _sync(device)
        rates[name] = len(images) / (time.perf_counter() - start)
        print(
            f"generate sd15 {images[0].size[0]}px, {steps} steps, batch {batch} {name}: {rates[name]:.2f} images/s"
        )
    base = rates["without adapter"]
    scheduled, every = rates[runs[1][0]], rates[runs[2][0]]
    print(
        f"generate with / without adapter = {scheduled / base:.3f} ({grounded_steps} of {steps} steps grounded)"
    )
    # time per denoising step, grounded vs not: (1/every - 1/base) over the steps, relative to a plain step
    print(f"per grounded step / plain step = {base / every:.3f} (grounding on every step)")


SECTIONS = {
    "device": section_device,
    "train-sd15": lambda tiny: _train("sd15", tiny),
    "train-sdxl": lambda tiny: _train("sdxl", tiny),
    "train-kolors": lambda tiny: _train("kolors", tiny),
    "generate-sd15": section_generate,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.sections", allow_abbrev=False)
    p.add_argument("name", choices=list(SECTIONS))
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU: a check that it runs")
    args = p.parse_args(argv)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    SECTIONS[args.name](args.tiny)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
