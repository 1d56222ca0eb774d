"""Memory plan of spatial-adapter training on SD1.5, SDXL and Kolors: what fits on a 24, 48 or 80 GB GPU.

Parameter bytes are counted on the meta device (no weights, nothing downloaded) from the published configs:
the UNets of ``diffusers_ext/testing/published_unets.py``, the text encoders (CLIP ViT-L/14 text for SD1.5;
CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text with projection for SDXL; ChatGLM3-6B for Kolors, built with
diffusers' own Kolors ``ChatGLMModel`` class at ChatGLM3-6B's published config) and the SD VAE, and the
adapter as the trainer builds it (``SpatialAdapter.for_unet`` with ``--layers``). What the trainer keeps on
the GPU (``diffusers_ext/training/train_spatial_adapter.py``):

* frozen UNet, text encoders and VAE in the weight dtype: 4 bytes a parameter with ``--mixed-precision no``,
  2 with bf16 or fp16 (accelerate autocasts; fp16's gradient scaler keeps no master copy);
* the adapter in fp32 in every mode (4 bytes), its fp32 gradients (4) and AdamW's two fp32 moments (8);
* ``--cache-dir``: the text encoders are not moved to the GPU (their outputs are cached); with
  ``--cache-latents`` the VAE is not either.

Activations of one training step (forward, MSE loss, backward) are measured, not estimated: the real-width
UNet with the adapter installed runs on CPU at small latents (``--latents``, default 8 and 16, i.e. 64 and
128 px) and ``benchmarks/peak_memory.py`` gives the rise of memory in use at the step's peak. To fit
SDXL's 4.4 B UNet + adapter parameters into this machine's memory, every parameter of the same shape shares
one tensor (the activations, which depend on shapes only, are those of the real model; the weights in
memory are a fraction, and the parameter bytes come from the meta count above). The measured bytes are
fitted as ``a + b * (latent pixels x batch)`` (attention through PyTorch's SDPA keeps memory linear in
tokens) and extrapolated to the training resolution (512 px = 64x64 latent for SD1.5, 1024 px = 128x128 for
SDXL and Kolors). They are measured in fp32; with bf16/fp16 autocast the saved activations are taken as half
(an assumption, stated in the table). Gradient checkpointing (``--gradient-checkpointing``, diffusers'
per-block checkpointing) is measured the same way: it keeps only each block's input and recomputes the
rest in the backward pass. The activations are measured with every block adapted; the mid/up subset's
(``--layers mid_block up_blocks``, fewer fusers) are bounded by those unless ``--measure-subset`` measures
them too.

A configuration "fits" when parameters + gradients + AdamW states + activations stay within 90 % of the GPU
(the rest for the CUDA context, cuDNN workspaces and allocator fragmentation, which this plan does not
measure). GPU figures (``benchmarks/gpu/run.sh``) are the check of this plan.

Usage: ``python -m benchmarks.bench_diffusers_train_memory [--models sd15 sdxl kolors] [--latents 8 16] [--measure-subset] [--no-activations]``;
``--tiny`` runs the same code on tiny configs in seconds (a check that it runs, not a plan).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

if not __package__:  # run by path: the repository before fairscale's top-level `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_ext.testing.published_unets import KOLORS, SD15, SDXL  # noqa: E402  (dicts: no torch)

GB = 1e9
GPUS_GB = (24, 48, 80)
HEADROOM = 0.9
SUBSET = ["mid_block", "up_blocks"]  # --layers mid_block up_blocks
MAX_OBJS = 30
# bytes per frozen parameter; fp16 and bf16 keep the same bytes (fp16 adds a gradient scaler, no master copy)
PRECISIONS = {"no": 4, "bf16/fp16": 2}
CACHES = ("none", "cache-dir", "cache-dir+latents")

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

TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 32, "vocab_size": 100, "max_position_embeddings": 77}  # fmt: skip
TINY_VAE = {"block_out_channels": (8,), "down_block_types": ("DownEncoderBlock2D",),
            "up_block_types": ("UpDecoderBlock2D",), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4}  # fmt: skip

# name: UNet config, text encoders, phrase dim, text sequence, pooled width, training latent side
MODELS = {
    "sd15": {"unet": SD15, "text": [("clip", CLIP_L)], "phrase_dim": 768, "seq": 77, "pooled": None, "latent": 64},
    "sdxl": {"unet": SDXL, "text": [("clip", CLIP_L), ("clip-proj", CLIP_BIGG)], "phrase_dim": 2048, "seq": 77,
             "pooled": 1280, "latent": 128},
    "kolors": {"unet": KOLORS, "text": [("chatglm", CHATGLM3_6B)], "phrase_dim": 4096, "seq": 256, "pooled": 4096,
               "latent": 128},
}  # fmt: skip
TINY = {"tiny": {"unet": TINY_UNET, "text": [("clip", TINY_CLIP)], "phrase_dim": 32, "seq": 77, "pooled": None,
                 "latent": 16, "vae": TINY_VAE}}  # fmt: skip


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _text_encoder(kind: str, config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind == "chatglm":
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

        return ChatGLMModel(ChatGLMConfig(**config))
    cls = CLIPTextModelWithProjection if kind == "clip-proj" else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def parameter_counts(spec: dict) -> dict[str, int]:
    """Parameters of each component, built on the meta device (no memory, no download)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffusers_ext.spatial_adapter import SpatialAdapter

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        counts = {"unet": _numel(unet)}
        counts["text_encoders"] = sum(_numel(_text_encoder(k, c)) for k, c in spec["text"])
        counts["vae"] = _numel(AutoencoderKL(**spec.get("vae", SD_VAE)))
        counts["adapter_all"] = _numel(SpatialAdapter.for_unet(unet, phrase_dim=spec["phrase_dim"]))
        counts["adapter_subset"] = _numel(
            SpatialAdapter.for_unet(unet, phrase_dim=spec["phrase_dim"], layers=SUBSET)
        )
    return counts


def _shared_weights(module, pool: dict) -> None:
    """Materialize a meta module with one tensor per parameter shape (one Parameter object, so one grad)."""
    import torch
    from torch import nn

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            key = (tuple(p.shape), p.requires_grad)
            if key not in pool:
                pool[key] = nn.Parameter(torch.randn(p.shape) * 0.02, requires_grad=p.requires_grad)
            sub._parameters[name] = pool[key]
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_meta:
                sub._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)


def activation_bytes(spec: dict, layers, latent: int, batch: int, checkpointing: bool) -> int:
    """Peak rise of memory in use during one training step (fp32, CPU), gradients of the adapter excluded:
    ``peak_bytes`` runs the step twice and measures the second, whose backward accumulates into the
    gradients the first one allocated."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.peak_memory import peak_bytes
    from diffusers_ext.spatial_adapter import SpatialAdapter
    from diffusers_ext.training.grounded_denoiser import GroundedDenoiser

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        adapter = SpatialAdapter.for_unet(unet, phrase_dim=spec["phrase_dim"], layers=layers)
    unet.requires_grad_(False)
    _shared_weights(unet, {})
    _shared_weights(adapter, {})
    adapter.install(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    denoiser = GroundedDenoiser(unet, adapter)
    cross = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    b, c = batch, unet.config.in_channels
    noisy = torch.randn(b, c, latent, latent)
    text = torch.randn(b, spec["seq"], cross)
    boxes = torch.rand(b, MAX_OBJS, 4).sort(dim=-1).values
    feats, masks = torch.randn(b, MAX_OBJS, spec["phrase_dim"]), torch.ones(b, MAX_OBJS)
    added = None
    if spec["pooled"] is not None:
        added = {"text_embeds": torch.randn(b, spec["pooled"]), "time_ids": torch.randn(b, 6)}
    timesteps = torch.randint(0, 1000, (b,))
    target = torch.randn_like(noisy)

    def step():
        out = denoiser(noisy, timesteps, text, boxes, feats, masks, added_cond_kwargs=added)
        torch.nn.functional.mse_loss(out.float(), target).backward()

    return peak_bytes(step)


def _fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least squares a + b * x over (x, bytes); one point: a line through the origin."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def plan_rows(name: str, spec: dict, counts: dict, act: dict) -> list[dict]:
    """One row per precision x layers x cache: bytes of each part and the total at each batch/checkpointing."""
    rows = []
    for precision, frozen in PRECISIONS.items():
        act_scale = 1.0 if precision == "no" else 0.5
        for layers in ("all", "subset"):
            adapter = counts[f"adapter_{layers}"]
            for cache in CACHES:
                part = {
                    "unet": counts["unet"] * frozen,
                    "text_encoders": 0 if cache != "none" else counts["text_encoders"] * frozen,
                    "vae": 0 if cache == "cache-dir+latents" else counts["vae"] * frozen,
                    "adapter": adapter * 4,
                    "grads": adapter * 4,
                    "adamw": adapter * 8,
                }
                static = sum(part.values())
                totals = {}
                for batch in (1, 4):
                    for ckpt in (False, True):
                        a, b = act[(layers, ckpt)]
                        pixels = spec["latent"] ** 2 * batch
                        totals[(batch, ckpt)] = static + act_scale * (a + b * pixels)
                rows.append({"model": name, "precision": precision, "layers": layers, "cache": cache,
                             **part, "static": static, "totals": totals})  # fmt: skip
    return rows


def _fits(row: dict, gb: int, activations: bool = True) -> str:
    """The largest setting within HEADROOM of the GPU: batch 4, then batch 1, without then with checkpointing.
    Without measured activations only whether the parameters and their states fit ("params only") is known."""
    budget = HEADROOM * gb * GB
    if not activations:
        return "params only" if row["static"] <= budget else "no"
    for batch, ckpt in ((4, False), (4, True), (1, False), (1, True)):
        if row["totals"][(batch, ckpt)] <= budget:
            return f"b{batch}" + ("+ckpt" if ckpt else "")
    return "no"


def _g(v: float) -> str:
    return f"{v / GB:.2f}"


def _print_plan(rows: list[dict], activations: bool = True) -> None:
    print(f"\n## {rows[0]['model']}: bytes on the GPU (GB) and what fits (activations at the training resolution; "
          "bf16/fp16 activations = half the fp32 measurement)")  # fmt: skip
    print("| model | precision | layers | cache | UNet | text enc. | VAE | adapter | grads | AdamW | "
          "b1 | b1+ckpt | b4 | b4+ckpt | 24 GB | 48 GB | 80 GB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["totals"]
        print(f"| {r['model']} | {r['precision']} | {r['layers']} | {r['cache']} | {_g(r['unet'])} | "
              f"{_g(r['text_encoders'])} | {_g(r['vae'])} | {_g(r['adapter'])} | {_g(r['grads'])} | "
              f"{_g(r['adamw'])} | {_g(t[(1, False)])} | {_g(t[(1, True)])} | {_g(t[(4, False)])} | "
              f"{_g(t[(4, True)])} | " + " | ".join(_fits(r, gb, activations) for gb in GPUS_GB) + " |", flush=True)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_diffusers_train_memory",
        description="Memory plan of spatial-adapter training on SD1.5, SDXL and Kolors (published sizes, meta "
        "device) with activations measured on CPU at small latents; prints what fits on 24 / 48 / 80 GB.",
        allow_abbrev=False,
    )
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--latents", type=int, nargs="+", default=[8, 16], help="latent sides measured on CPU")
    p.add_argument("--tiny", action="store_true", help="tiny configs: a check that the script runs")
    p.add_argument(
        "--no-activations",
        action="store_true",
        help="skip the CPU measurement: parameters, gradients and AdamW states only (seconds)",
    )
    p.add_argument(
        "--measure-subset",
        action="store_true",
        help="also measure the activations with --layers mid_block up_blocks (default: bounded by all layers)",
    )
    args = p.parse_args(argv)
    if any(s < 8 or s % 8 for s in args.latents):
        p.error(f"--latents {args.latents}: each must be a multiple of 8 (the UNets downsample 3 times)")

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = TINY if args.tiny else {m: MODELS[m] for m in args.models}
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"--layers subset = {' '.join(SUBSET)}; activations measured at latents {args.latents}, batch 1",
        flush=True,
    )
    for name, spec in models.items():
        counts = parameter_counts(spec)
        print(f"\n## {name}: parameters (meta device)")
        print("| part | parameters | fp32 GB | bf16/fp16 GB |")
        print("|---|---|---|---|")
        for part, n in counts.items():
            print(f"| {part} | {n:,} | {_g(4 * n)} | {_g(2 * n)} |", flush=True)
        act = {}
        if args.no_activations:
            act = {(layers, ckpt): (0.0, 0.0) for layers in ("all", "subset") for ckpt in (False, True)}
            print(
                "\n(--no-activations: activations counted as 0; parameters, gradients and AdamW states only)"
            )
        else:
            print(f"\n## {name}: activations of one step (fp32, CPU, measured), fitted a + b * latent pixels")
            print("| layers | checkpointing | " + " | ".join(f"latent {s} MB" for s in args.latents)
                  + f" | a MB | b bytes/pixel | at {spec['latent']}x{spec['latent']} b1 GB |")  # fmt: skip
            print("|---|---|" + "---|" * (len(args.latents) + 3))
        for layers in () if args.no_activations else ("all", "subset") if args.measure_subset else ("all",):
            for ckpt in (False, True):
                measured = [
                    (s * s, activation_bytes(spec, None if layers == "all" else SUBSET, s, 1, ckpt))
                    for s in args.latents
                ]
                a, b = _fit(measured)
                act[(layers, ckpt)] = (a, b)
                cells = " | ".join(f"{m / 1e6:.1f}" for _, m in measured)
                full = a + b * spec["latent"] ** 2
                print(
                    f"| {layers} | {'yes' if ckpt else 'no'} | {cells} | {a / 1e6:.1f} | {b:,.0f} | {_g(full)} |",
                    flush=True,
                )
        if (
            not args.measure_subset and not args.no_activations
        ):  # fewer fusers save less: the all-layer figures bound the subset's
            for ckpt in (False, True):
                act[("subset", ckpt)] = act[("all", ckpt)]
            print(
                "(subset activations: the all-layers figures, an upper bound; --measure-subset measures them)"
            )
        # after each model: a partial run still gives its plan
        _print_plan(plan_rows(name, spec, counts, act), activations=not args.no_activations)
    print(f"\nfits: the largest of b4, b4+ckpt, b1, b1+ckpt within {HEADROOM:.0%} of the GPU; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
