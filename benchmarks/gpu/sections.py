"""Sections of ``benchmarks/gpu/run.sh``; each runs alone: ``python -m benchmarks.gpu.sections NAME [--tiny]``.

Random weights at published sizes (``diffusers_ext/testing/published_unets.py``), nothing downloaded:

* ``device``: torch, the device name (``torch.cuda.get_device_name``) and its memory.
* ``train-sd15``, ``train-sdxl``, ``train-kolors``: adapter training steps as the trainer runs them with
  ``--mixed-precision bf16 --gradient-checkpointing`` and cached conditioning: frozen bf16 UNet, fp32 adapter
  under bf16 autocast, AdamW, random prompt / pooled embeddings and phrase features of the real shapes (no
  text encoders, no VAE), 30 boxes; SD1.5 at 512 px, SDXL and Kolors at 1024 px; batch 1 and 4. Prints
  seconds per step (median of the timed steps after one warm-up step) and peak memory
  (``torch.cuda.max_memory_allocated``).
* ``generate-sd15``: images/s of a 512 px SD1.5-sized pipeline (random weights, a CLIP ViT-L/14-sized text
  encoder, the SD VAE) with and without the adapter, 20 DDIM steps, batch 4.

``--tiny``: the same code on tiny configs on CPU in seconds (a check that it runs, not a measurement).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run by path: the repository before fairscale's top-level `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_diffusers_train_memory import MODELS, SD_VAE, TINY_UNET  # noqa: E402

MAX_OBJS = 30
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


def _train(model: str, tiny: bool) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_ext.spatial_adapter import SpatialAdapter
    from diffusers_ext.training.grounded_denoiser import GroundedDenoiser

    device = _device(tiny)
    spec = dict(MODELS[model])
    latent = spec["latent"]
    if tiny:
        spec["unet"] = {**TINY_UNET, **({} if spec["pooled"] is None else {})}
        if spec["pooled"] is not None:  # SDXL-style added conditions at tiny width
            spec["unet"] = {**spec["unet"], "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                            "projection_class_embeddings_input_dim": 6 * 8 + 16}  # fmt: skip
            spec["pooled"] = 16
        spec["phrase_dim"], spec["seq"], latent = 16, 8, 16
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
    # bf16 as --mixed-precision bf16 on the GPU; --tiny stays fp32 (CPU bf16 kernels take seconds per tiny step)
    dtype = torch.float32 if tiny else torch.bfloat16
    unet.requires_grad_(False).to(dtype)
    with torch.device(device):
        adapter = SpatialAdapter.for_unet(unet, phrase_dim=spec["phrase_dim"])  # fp32, as the trainer's
    adapter.install(unet)
    unet.enable_gradient_checkpointing()
    unet.train()
    denoiser = GroundedDenoiser(unet, adapter)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=5e-5)
    n_adapter = sum(p.numel() for p in adapter.parameters())
    cross = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    side = latent * 8
    frozen = str(dtype).removeprefix("torch.")
    print(f"{model}: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M (frozen, {frozen}), adapter "
          f"{n_adapter / 1e6:.1f} M (fp32), {side} px, {'fp32' if tiny else 'bf16 autocast'}, gradient checkpointing")  # fmt: skip
    for batch in (1, 4):
        inputs = _train_inputs(spec, batch, latent, cross, device)

        def step(inputs=inputs):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=not tiny):
                out = denoiser(*inputs["args"], added_cond_kwargs=inputs["added"])
            loss = torch.nn.functional.mse_loss(out.float(), inputs["target"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(1 + (1 if tiny else TRAIN_STEPS)):
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "n/a (CPU)"
        median = statistics.median(times)
        print(f"train {model} {side}px batch {batch}: {median:.3f} s/step, {batch / median:.2f} samples/s, "
              f"peak memory {peak}, loss {float(loss):.4f}", flush=True)  # fmt: skip
        inputs = None


def _train_inputs(spec: dict, batch: int, latent: int, cross: int, device: str) -> dict:
    """Cached conditioning as the trainer reads it from --cache-dir: random tensors of the real shapes."""
    import torch

    g = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device)

    noisy = rand(batch, 4, latent, latent)
    timesteps = torch.randint(0, 1000, (batch,), generator=g, device=device)
    text = rand(batch, spec["seq"], cross)
    boxes = torch.rand(batch, MAX_OBJS, 4, generator=g, device=device).sort(dim=-1).values
    feats, masks = rand(batch, MAX_OBJS, spec["phrase_dim"]), torch.ones(batch, MAX_OBJS, device=device)
    added = None
    if spec["pooled"] is not None:
        added = {"text_embeds": rand(batch, spec["pooled"]), "time_ids": rand(batch, 6)}
    return {
        "args": (noisy, timesteps, text, boxes, feats, masks),
        "added": added,
        "target": rand(*noisy.shape),
    }


def _sd15_pipeline(tiny: bool, device: str):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from benchmarks.bench_diffusers_train_memory import CLIP_L
    from diffusers_ext.testing.published_unets import SD15
    from diffusers_ext.testing.tiny_pipelines import tiny_clip_tokenizer, tiny_sd_pipeline

    if tiny:
        return tiny_sd_pipeline().to(device)
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    with torch.device(device):
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
    return pipe.to(device, torch.float16)


def section_generate(tiny: bool) -> None:
    import torch

    from diffusers_ext.generation import generate, phrase_dim
    from diffusers_ext.spatial_adapter import SpatialAdapter, installed_adapter

    device = _device(tiny)
    pipe = _sd15_pipeline(tiny, device)
    pipe.set_progress_bar_config(disable=True)
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe)).to(device, pipe.unet.dtype)
    batch, steps = (2, 2) if tiny else (4, GEN_STEPS)
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

    rates = {}
    for name, fn in (("without adapter", plain), ("with adapter", grounded)):
        fn()  # warm-up
        _sync(device)
        start = time.perf_counter()
        images = fn()
        _sync(device)
        rates[name] = len(images) / (time.perf_counter() - start)
        print(
            f"generate sd15 {images[0].size[0]}px, {steps} steps, batch {batch} {name}: {rates[name]:.2f} images/s"
        )
    print(f"generate with / without adapter = {rates['with adapter'] / rates['without adapter']:.3f}")


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
