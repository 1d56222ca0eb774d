"""Train the spatial adapter on grounding rows with accelerate: ``python -m diffusers_ext.training.train_spatial_adapter``.

GLIGEN's recipe (Li et al., CVPR 2023): the base model stays frozen and only the gated layers and the
grounding tokenizer learn (optionally LoRA on the UNet too), with the ordinary denoising loss; whole
layouts are dropped with ``--box-dropout`` and captions with ``--caption-dropout`` so the model also
learns the null condition that classifier-free guidance uses. ``--pretrained-model`` is an SD, SDXL or
Kolors folder; the text conditioning comes from the pipeline's own ``encode_prompt`` and the phrase
features from its text encoder (``diffusers_ext.generation.encode_phrases``).

Data recipe (``training.dataset``): GLIGEN's aspect-preserving resize + centre crop (``--random-crop``,
``--no-crop``), ``--random-flip`` with the boxes, boxes recomputed and cleaned in the crop, at most 30;
SDXL/Kolors get each sample's true ``original_size`` and ``crop_top_left``. Images are decoded and cropped
in ``--dataloader-num-workers`` loader processes. ``--cache-dir`` (``training.conditioning_cache``)
computes the prompt embeddings, phrase features and, with ``--cache-latents``, the VAE latents once; the
text encoders (and the VAE) then stay off the accelerator. docs/diffusers_training_at_scale.md has it all.

Exact resume. Data order is a permutation seeded by (seed, epoch), each sample's crop and flip come from
(seed, epoch, index) (so any number of loader workers gives the same samples), and every random draw of a
sample (noise, timestep, dropouts, VAE sampling) comes from a generator seeded by (seed, optimizer step, the
sample's position in the step's global batch), so it does not depend on how the batch is split into
processes or ``--gradient-accumulation-steps`` micro-batches, and a
run resumed from ``checkpoint-<step>`` (model, optimizer, LR scheduler, EMA, step and RNG states via
``accelerator.save_state``) computes the same next loss as an uninterrupted one. Checkpoints hold only
the trainable weights (adapter, LoRA), not the frozen base model.

No work lost (``run_folder``): a used ``--output-dir`` is refused unless ``--resume`` or ``--overwrite``
says what to do with it; checkpoints and the exported adapter are written under a temporary name and
renamed when complete; ``--resume latest`` takes the newest complete checkpoint. Nothing silently wrong
(``grounding_data``): boxes outside [0, 1] and unreadable images are refused naming the file before
training starts (``--skip-bad-images`` leaves such images out and logs each one).

Only the standard library is imported before the arguments are parsed, so ``--help`` and argument
errors answer without loading torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from diffusers_ext.fuser_presets import PRESETS_HELP
from diffusers_ext.training.init_adapter import (
    INIT_DECIDED,
    adapter_for_resume,
    given_flags,
    load_init_adapter,
)
from diffusers_ext.training.init_adapter import check_before_loading as check_init_adapter_before_loading
from diffusers_ext.training.resume_check import (
    FIXED,
    OVERRIDABLE,
    RESOLVED,
    RUN_FACTS,
    apply_optimizer_overrides,
    check_resumed_flags,
    data_fingerprint,
    recorded_flags,
)
from diffusers_ext.training.run_folder import (
    STATE,
    clear_previous_run,
    find_latest_checkpoint,
    publish_folder,
    refuse_reused_output_dir,
    staging_folder,
    truncate_metrics,
    write_json_atomic,
)
from vlext.atomic_files import atomic_write_bytes, staging_name
from vlext.test_hooks import hook

__all__ = [
    "RunState",
    "Trainables",
    "build_parser",
    "build_trainables",
    "load_checkpoint",
    "load_pipeline",
    "main",
    "parse_args",
    "run_steps",
    "save_adapter",
    "save_checkpoint",
    "train",
    "training_step",
]

# Test hook point (vlext.test_hooks): checkpoint-<step>'s first file written, the others not;
# tests/test_diffusers_train_crash.py SIGKILLs the trainer there to check that resume survives.
CHECKPOINT_HOOK = "diffusers-train:checkpoint-first-file"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_spatial_adapter", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--mixed-data", required=True, help="JSONL rows: image, caption, boxes (xyxy in [0,1]), phrases"
    )
    data.add_argument(
        "--image-dir",
        default=None,
        help="folder the rows' image paths are relative to (default: the JSONL's)",
    )
    data.add_argument(
        "--min-area",
        type=float,
        default=0.01,
        help="drop boxes under this area fraction of the crop (GLIGEN: 1%%)",
    )
    data.add_argument(
        "--min-side", type=float, default=0.0, help="drop boxes with a side under this fraction"
    )
    data.add_argument(
        "--max-objs", type=int, default=30, help="keep the largest this many boxes per image (GLIGEN: 30)"
    )
    crop = data.add_mutually_exclusive_group()
    crop.add_argument(
        "--center-crop",
        dest="crop",
        action="store_const",
        const="center",
        help="resize the shorter side to --resolution and crop the centre square (default; GLIGEN's "
        "random_crop: False); boxes are recomputed in the crop and cleaned by --min-area/--min-side there",
    )
    crop.add_argument(
        "--random-crop",
        dest="crop",
        action="store_const",
        const="random",
        help="crop a random square instead",
    )
    crop.add_argument(
        "--no-crop",
        dest="crop",
        action="store_const",
        const="none",
        help="resize to a square without cropping (squashes non-square images; the behaviour before the crop)",
    )
    data.set_defaults(crop="center")
    data.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mirror half of the images with their boxes (GLIGEN's default). The phrases and caption are "
        "not changed, so words like 'left' and 'right' then mean the opposite side for those samples; "
        "turn it off (--no-random-flip) for data whose text names sides",
    )
    data.add_argument(
        "--dataloader-num-workers",
        type=int,
        default=0,
        help="loader worker processes that decode and crop images (0: in the training process)",
    )
    data.add_argument(
        "--cache-dir",
        default=None,
        help="precompute prompt embeddings and phrase features once into this folder (reused by later runs, "
        "keyed by their content); the text encoders then stay off the accelerator",
    )
    data.add_argument(
        "--cache-latents",
        action="store_true",
        help="with --cache-dir, also cache the VAE latents (both orientations with --random-flip; "
        "not with --random-crop); the VAE then stays off the accelerator",
    )
    data.add_argument(
        "--cache-batch-size",
        type=int,
        default=4,
        help="images per VAE call in the cache pass (VAE activations are about 2.5 GiB per 1024 px image "
        "in fp32; the UNet is not on the device then)",
    )
    data.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out rows whose image cannot be read fully (each is logged and counted); default: refuse",
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image size (default: the UNet's sample size x VAE scale)",
    )
    data.add_argument(
        "--phrase-dropout", type=float, default=0.0, help="probability of replacing one object by null tokens"
    )
    data.add_argument(
        "--box-dropout", type=float, default=0.1, help="probability of dropping a whole layout (GLIGEN: 0.1)"
    )
    data.add_argument(
        "--caption-dropout",
        type=float,
        default=0.5,
        help="probability of an empty caption (GLIGEN's code: 0.5)",
    )
    model = p.add_argument_group("model")
    model.add_argument("--pretrained-model", required=True, help="SD, SDXL or Kolors pipeline folder")
    model.add_argument(
        "--init-adapter",
        default=None,
        metavar="SOURCE",
        help="start from these adapter weights instead of a fresh adapter: anything load_spatial_adapter "
        "accepts (a folder our trainer saved, e.g. <output-dir>/adapter; a diffusers gated UNet such as "
        "GLIGEN-XL's, jiuntian/gligen-xl-1024 with --init-adapter-subfolder unet; an official GLIGEN .pth; "
        "a hub id). Its config decides --layers, --hidden-dim and --max-objs (given, they must equal it); "
        "--init-mode and --gate-init-value are refused. Only the grounding is taken: --pretrained-model's "
        "UNet stays (see --init-adapter-base-unet). docs/gligen_xl.md",
    )
    model.add_argument(
        "--init-adapter-subfolder",
        default=None,
        metavar="SUB",
        help="the folder inside --init-adapter's repo or folder that holds the weights (GLIGEN-XL: unet)",
    )
    model.add_argument(
        "--init-adapter-base-unet",
        action="store_true",
        help="with a GLIGEN checkpoint or gated UNet as --init-adapter, also load the base UNet stored with "
        "its fusers into --pretrained-model's UNet (for fusers trained against another base, e.g. GLIGEN's "
        "SD1.4 checkpoints on SD1.5); default: keep --pretrained-model's UNet (GLIGEN-XL's base is SDXL's own)",
    )
    model.add_argument("--init-mode", choices=("gate", "zero_out"), default="gate")
    model.add_argument(
        "--gate-init-value",
        type=float,
        default=None,
        help="initial alpha (default: 0 for gate, 1 for zero_out)",
    )
    model.add_argument("--freeze-gate", action="store_true")
    model.add_argument(
        "--hidden-dim", type=int, default=512, help="grounding tokenizer MLP width (GLIGEN: 512)"
    )
    model.add_argument("--layers", nargs="*", default=None, help=PRESETS_HELP.replace("%", "%%"))
    model.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA on the UNet attention projections via peft (0: off)"
    )
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    optim = p.add_argument_group("optimization")
    optim.add_argument("--output-dir", required=True)
    optim.add_argument("--batch-size", type=int, default=4, help="per process")
    optim.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=1,
        help="micro-batches of --batch-size per optimizer step (accelerate's accumulate): the update of N x B "
        "samples in the memory of B; --max-train-steps, checkpoints and the LR schedule count optimizer steps",
    )
    optim.add_argument("--epochs", type=int, default=1)
    optim.add_argument(
        "--max-train-steps", type=int, default=None, help="stop after this many steps in total"
    )
    optim.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (GLIGEN: 5e-5)")
    optim.add_argument(
        "--optimizer",
        choices=("adamw", "adamw8bit"),
        default="adamw",
        help="adamw: torch AdamW (8 bytes of state per parameter); adamw8bit: bitsandbytes' 8-bit AdamW "
        "(about 2 bytes; diffusers' --use_8bit_adam). training/optimizers.py",
    )
    optim.add_argument(
        "--use-8bit-adam",
        dest="optimizer",
        action="store_const",
        const="adamw8bit",
        help="the same as --optimizer adamw8bit (the name diffusers' training scripts use)",
    )
    optim.add_argument(
        "--bf16-adapter",
        action="store_true",
        help="keep the adapter (and LoRA) weights and gradients in bf16, updated with stochastic rounding "
        "(half the weight and gradient memory; needs --mixed-precision bf16); the EMA stays fp32",
    )
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--lr-scheduler", default="constant", help="diffusers.optimization.get_scheduler name")
    optim.add_argument("--lr-warmup-steps", type=int, default=0)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    optim.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    optim.add_argument("--gradient-checkpointing", action="store_true")
    optim.add_argument("--ema", action="store_true", help="keep an EMA of the adapter, saved as adapter_ema")
    optim.add_argument("--ema-decay", type=float, default=0.9999)
    optim.add_argument("--seed", type=int, default=0)
    logs = p.add_argument_group("saving and logging")
    logs.add_argument("--save-epoch", type=int, default=1, help="save the adapter every N epochs")
    logs.add_argument(
        "--checkpointing-steps", type=int, default=0, help="resumable checkpoint every N steps (0: off)"
    )
    logs.add_argument(
        "--resume",
        default=None,
        help="a checkpoint-<step> folder, or 'latest': the newest complete one in --output-dir",
    )
    logs.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a used --output-dir, deleting the previous run's checkpoints, adapter, metrics",
    )
    logs.add_argument(
        "--log-gate-stats", type=int, default=0, help="print per-layer and overall gates every N steps"
    )
    logs.add_argument(
        "--log-tensorboard", action="store_true", help="TensorBoard scalars under <output-dir>/logs"
    )
    logs.add_argument(
        "--no-memory-check",
        action="store_true",
        help="train even when the memory rehearsal (python -m diffusers_ext.training.plan, run on the model's "
        "configs before any weights load) says these flags will not fit the visible GPU",
    )
    return p


def adapter_config(args) -> dict:
    """The adapter's flags as ``SpatialAdapter.for_unet`` keywords: the early ``--layers`` check on the meta
    device and the real build use the same ones."""
    return {
        "layers": args.layers,
        "max_objs": args.max_objs,
        "hidden_dim": args.hidden_dim,
        "init_mode": args.init_mode,
        "gate_init": args.gate_init_value,
        "freeze_gate": args.freeze_gate,
    }


def check_memory_before_loading(args, say) -> None:
    """On a GPU, rehearse these flags on the model's configs (``training.plan.preflight``: the trainer's own
    step on the meta device, no weights read) and refuse a run that would run out of memory, naming the flags
    that would fit, before minutes of loading (8-bit Adam's state included, as bitsandbytes allocates it)."""
    if args.no_memory_check:
        return
    from diffusers_ext.training import plan

    gpu_gib = plan.visible_gpu_gib()
    if gpu_gib is None:
        return
    fits, message = plan.preflight(args, gpu_gib)
    say(message)
    if fits:
        return
    raise SystemExit(f"{message}; --no-memory-check trains anyway")


_FLOAT_FLAGS = (
    "min_area", "min_side", "phrase_dropout", "box_dropout", "caption_dropout", "gate_init_value", "lora_alpha",
    "lr", "weight_decay", "max_grad_norm", "ema_decay",
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_args(args) -> None:
    """Every numeric flag in its range (NaN and infinity refused first: they pass ``<``/``>`` checks
    silently), and the combinations that cannot work, before anything is loaded or deleted."""
    import math

    for name in _FLOAT_FLAGS:
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise SystemExit(f"{_flag(name)} must be a finite number, got {v}")
    for name in ("phrase_dropout", "box_dropout", "caption_dropout", "min_area", "min_side"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise SystemExit(f"{_flag(name)} must be in [0, 1], got {v}")
    for name in (
        "batch_size", "epochs", "max_objs", "save_epoch", "cache_batch_size", "hidden_dim",
        "gradient_accumulation_steps",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            raise SystemExit(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in (
        "dataloader_num_workers", "weight_decay", "max_grad_norm", "lr_warmup_steps", "checkpointing_steps",
        "lora_rank", "log_gate_stats", "seed",
    ):  # fmt: skip
        if getattr(args, name) < 0:
            raise SystemExit(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if args.init_adapter is None:
        for name in ("init_adapter_subfolder", "init_adapter_base_unet"):
            if getattr(args, name):
                raise SystemExit(f"{_flag(name)} needs --init-adapter SOURCE (the weights it applies to)")
    if args.cache_latents and not args.cache_dir:
        raise SystemExit("--cache-latents needs --cache-dir DIR (the folder the latents are cached in)")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise SystemExit(
            f"--cache-dir {args.cache_dir} is a file; give a folder for the conditioning cache (it is created if "
            "absent, and reused by later runs)"
        )
    if args.cache_latents and args.crop == "random":
        raise SystemExit(
            "--cache-latents with --random-crop: the crop offset is drawn anew every epoch, so the VAE "
            "latents cannot be computed once; use --center-crop (or --no-crop) with --cache-latents, or "
            "drop --cache-latents (prompt embeddings and phrase features are still cached)"
        )
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise SystemExit(f"--max-train-steps must be >= 1, got {args.max_train_steps}")
    if not args.lr > 0:  # 0 trains nothing; a negative lr used to fail only after the pipeline loaded
        raise SystemExit(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise SystemExit(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.lora_alpha is not None:
        if not args.lora_rank:
            raise SystemExit(
                f"--lora-alpha {args.lora_alpha} without --lora-rank: LoRA is off (--lora-rank 0), so the alpha "
                "would be ignored; give --lora-rank N to train LoRA, or drop --lora-alpha"
            )
        if not args.lora_alpha > 0:
            raise SystemExit(
                f"--lora-alpha must be > 0 (LoRA scales its update by alpha / rank), got {args.lora_alpha}; "
                "leave it out for alpha = the rank"
            )
    if args.bf16_adapter and args.mixed_precision != "bf16":
        raise SystemExit(
            f"--bf16-adapter needs --mixed-precision bf16 (got {args.mixed_precision}): bf16 adapter weights "
            "meet the UNet's activations in bf16 only under bf16 autocast"
        )
    if args.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise SystemExit(
                "--optimizer adamw8bit / --use-8bit-adam needs bitsandbytes (pip install 'bitsandbytes>=0.50'); "
                "or use --optimizer adamw"
            )
    if args.resolution is not None and args.resolution < 1:
        raise SystemExit(
            f"--resolution must be a positive number of pixels (a multiple of the VAE's scale factor, 8 for "
            f"SD, SDXL and Kolors), got {args.resolution}; leave it out for the UNet's own size"
        )


def resolve_defaults(args, pipe) -> None:
    """Put the values the defaults stand for into ``args`` (``--resolution``: the UNet's size,
    ``--lora-alpha``: the rank, ``--gate-init-value``: 0 for ``gate``, 1 for ``zero_out``), so that a
    checkpoint records what was trained and a resume compares values, not ``None``. Refuses a resolution
    that is not a multiple of the VAE's scale factor (the latents would not cover the image)."""
    scale = pipe.vae_scale_factor
    if args.resolution is None:
        args.resolution = default_resolution(pipe)
    elif args.resolution % scale:
        raise SystemExit(
            f"--resolution {args.resolution} is not a multiple of the VAE's scale factor {scale} (the latent is "
            f"resolution / {scale} wide); use e.g. {max(scale, args.resolution // scale * scale)}, or leave it "
            f"out for the UNet's own size {default_resolution(pipe)}"
        )
    if args.lora_rank and args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.gate_init_value is None:
        args.gate_init_value = 0.0 if args.init_mode == "gate" else 1.0


def check_layers_before_loading(args, pipeline=None) -> None:
    """``--layers`` (presets or block-name prefixes) against the UNet that ``--pretrained-model``'s
    ``unet/config.json`` describes, built on the meta device: refused naming the presets and this UNet's
    prefixes before any weights load (it used to be a traceback after the pipeline had loaded)."""
    if args.layers is None:
        return
    from diffusers_ext.fuser_presets import layers_for_config

    if pipeline is not None:
        config = dict(pipeline.unet.config)
    else:
        from diffusers_ext.training.conditioning_cache import model_folder

        try:
            path = model_folder(args.pretrained_model) / "unet" / "config.json"
            config = json.loads(path.read_text())
        except Exception:  # noqa: BLE001  (no local config, e.g. a hub id not yet downloaded)
            return  # the check after loading (check_layers) then says what is wrong
    try:
        layers_for_config(config, args.layers)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_layers(args, pipe, phrase_width: int) -> None:
    """Build the adapter ``--layers`` and the model flags ask for on the meta device (no memory, no random
    draws), so a bad placement or flag combination is refused, saying what is accepted, before anything is
    deleted or computed."""
    import torch

    from diffusers_ext.spatial_adapter import SpatialAdapter

    try:
        with torch.device("meta"):
            SpatialAdapter.for_unet(
                pipe.unet,
                phrase_dim=phrase_width,
                **adapter_config(args),
            )
    except ValueError as e:
        if str(e).startswith("--layers"):  # fuser_presets.resolve_layers names the flag, presets and prefixes
            raise SystemExit(str(e)) from None
        raise SystemExit(f"--init-mode / --gate-init-value / --freeze-gate / --layers: {e}") from None


def sample_generators(seed: int, step: int, positions) -> list:
    """One generator per sample, seeded by (seed, optimizer step, the sample's position in the step's global
    batch): every random draw of a sample (caption dropout, VAE sampling, layout dropouts, noise, timestep)
    comes from its own, so a step sees the same draws however its global batch is split into processes and
    accumulated micro-batches, and a resumed run the same as an uninterrupted one."""
    import torch

    return [torch.Generator().manual_seed(seed + 1_000_003 * step + 7919 * p) for p in positions]


def _time_ids(pipe, batch: dict, resolution: int, dtype, projection_dim: int):
    """SDXL micro-conditioning per sample, as diffusers' SDXL training script computes it: the image's
    ``original_size`` (h, w) before the resize, the crop's ``(top, left)``, the target ``(res, res)``."""
    import torch

    return torch.cat(
        [
            pipe._get_add_time_ids(
                tuple(size),
                tuple(top_left),
                (resolution, resolution),
                dtype,
                text_encoder_projection_dim=projection_dim,
            )
            for size, top_left in zip(batch["original_size"], batch["crop_top_left"], strict=True)
        ]
    )


def _encode_text(pipe, kind: str, captions: list[str], device, batch: dict, resolution: int, empty=None):
    """Prompt embeddings (and SDXL/Kolors added conditions) from the pipeline's own ``encode_prompt``, or
    from the batch's cached ones (``empty``: the cached empty prompt, for dropped captions)."""
    import torch

    with torch.no_grad():
        if "prompt_embeds" in batch:
            keep = torch.tensor([c != "" for c in captions])
            text = torch.where(keep[:, None, None], batch["prompt_embeds"], empty["prompt_embeds"][None]).to(
                device
            )
            pooled = None
            if kind != "sd":
                pooled = torch.where(keep[:, None], batch["pooled"], empty["pooled"][None]).to(device)
        elif kind == "sd":
            text, _ = pipe.encode_prompt(captions, device, 1, False)
        else:
            text, _, pooled, _ = pipe.encode_prompt(
                prompt=captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        if kind == "sd":
            return text, None
        time_ids = _time_ids(pipe, batch, resolution, text.dtype, pooled.shape[-1]).to(device)
        return text, {"text_embeds": pooled, "time_ids": time_ids}


def _batch_layouts(pipe, batch: dict, max_objs: int, phrase_dim: int, gens, args, device):
    """Boxes, phrase features (the batch's cached ones, or encoded now) and masks (B, max_objs, ...) with
    GLIGEN's object and layout dropout."""
    import torch

    from diffusers_ext.generation import encode_phrases

    b = len(batch["phrases"])
    boxes = torch.zeros(b, max_objs, 4)
    feats = torch.zeros(b, max_objs, phrase_dim, device=device)  # features stay where they were encoded
    masks = torch.zeros(b, max_objs)
    if "phrase_feats" in batch:
        cached = [f for f in batch["phrase_feats"] if f is not None]
        encoded = torch.cat(cached).float() if cached else None
    else:
        phrases = [p for row in batch["phrases"] for p in row]
        encoded = encode_phrases(pipe, phrases) if phrases else None
    if encoded is not None:
        encoded = encoded.to(device, torch.float32)
    k = 0
    for i, row_boxes in enumerate(batch["boxes"]):
        n = len(row_boxes)
        if n:
            boxes[i, :n] = torch.tensor(row_boxes)
            feats[i, :n] = encoded[k : k + n]
        masks[i, :n] = 1
        k += n
    masks = masks * (torch.stack([torch.rand(max_objs, generator=g) for g in gens]) >= args.phrase_dropout)
    masks = masks * (torch.stack([torch.rand(1, generator=g) for g in gens]) >= args.box_dropout)
    return boxes.to(device), feats, masks.to(device)


def _resume_folder(args, output_dir: Path, say) -> Path:
    """The checkpoint ``--resume`` names: 'latest' is the newest complete one in ``--output-dir``; an
    explicit folder must be complete too."""
    from diffusers_ext.training.run_folder import checkpoint_problem

    if args.resume != "latest":
        ckpt = Path(args.resume)
        if not ckpt.is_dir():
            raise SystemExit(f"--resume {ckpt}: no such folder; give a checkpoint-<step> folder or 'latest'")
        problem = checkpoint_problem(ckpt)
        if problem:
            raise SystemExit(
                f"--resume {ckpt} is not a complete checkpoint: {problem}; "
                f"--resume latest picks the newest complete one in {output_dir}"
            )
        return ckpt
    ckpt, skipped = find_latest_checkpoint(output_dir)
    for folder, problem in skipped:
        say(f"warning: skipping incomplete checkpoint {folder}: {problem}")
    if ckpt is None:
        raise SystemExit(
            f"--resume latest: no complete checkpoint-<step> folder in {output_dir}"
            + (f" ({len(skipped)} incomplete ones skipped, named above)" if skipped else "")
            + "; start without --resume (into an empty --output-dir) or pass --overwrite"
        )
    return ckpt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The trainer's flags, parsed and checked (ranges, NaN, combinations) before anything is loaded."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    return args


def load_pipeline(args):
    """The pipeline ``--pretrained-model`` names, on the host in its stored dtype: the only place the trainer
    reads weights (a rehearsal hands ``train``/``build_trainables`` its own pipeline instead)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(args.pretrained_model)


def default_resolution(pipe) -> int:
    """The image size the UNet was trained at: its sample size times the VAE's scale factor."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@dataclass
class Trainables:
    """What one training run updates, and the modules and schedules it updates them with."""

    adapter: object
    params: list
    names: list[str]
    lora_params: list
    optimizer: object
    lr_scheduler: object
    ema: object | None
    denoiser: object
    noise_scheduler: object


@dataclass
class RunState:
    """Everything :func:`training_step` reads. ``accelerator`` is optional: without it the step runs its own
    backward, clipping and autocast (``autocast``: a callable returning the forward's context manager;
    default: ``torch.autocast`` on the placement's device in its weight dtype when that is not fp32)."""

    args: argparse.Namespace
    pipe: object
    kind: str
    placement: object
    trainables: Trainables
    resolution: int
    empty_prompt: dict | None = None
    accelerator: object | None = None
    rank: int = 0
    world: int = 1
    autocast: object | None = None
    scaling: float | None = None  # the VAE's latent scale; give it when the VAE was freed (cached latents)

    def __post_init__(self):
        if self.scaling is None:
            self.scaling = self.pipe.vae.config.scaling_factor


def freeze_pipeline(pipe) -> None:
    """The base model does not learn: every pipeline module without gradients, in eval mode."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()


def build_trainables(
    args,
    pipe,
    placement,
    *,
    total_steps: int = 1,
    world: int = 1,
    phrase_width: int | None = None,
    init_adapter=None,
) -> Trainables:
    """LoRA (``--lora-rank``), the spatial adapter, both initialised after ``torch.manual_seed(--seed)``
    (so two runs with one seed start equal), installed into the UNet (``init_adapter``: the adapter
    ``--init-adapter`` loaded, :func:`~diffusers_ext.training.init_adapter.load_init_adapter`, used instead
    of a fresh one; the EMA then starts from its weights); every component placed by
    ``placement`` (:func:`~diffusers_ext.training.placement.place_for_training`); AdamW over the trainable
    parameters, the LR schedule (``world`` processes each step it once per step, as accelerate does), the
    EMA copy and the noise scheduler. The encoders the cache serves must already be freed (then give
    ``phrase_width``, :func:`~diffusers_ext.generation.phrase_dim` of the pipeline before it)."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_ext.generation import phrase_dim
    from diffusers_ext.spatial_adapter import SpatialAdapter
    from diffusers_ext.training.grounded_denoiser import GroundedDenoiser
    from diffusers_ext.training.optimizers import build_optimizer
    from diffusers_ext.training.placement import check_placement, place_for_training

    unet = pipe.unet
    freeze_pipeline(pipe)
    torch.manual_seed(args.seed)
    lora_params = []
    if args.lora_rank:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha or args.lora_rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.requires_grad_(True)
    if init_adapter is not None:
        adapter = init_adapter
    else:
        adapter = SpatialAdapter.for_unet(
            unet,
            phrase_dim=phrase_width if phrase_width is not None else phrase_dim(pipe),
            **adapter_config(args),
        )
    adapter.install(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    place_for_training(pipe, placement, adapter=adapter, lora_params=lora_params)
    params = [p for p in adapter.parameters() if p.requires_grad] + lora_params
    trainable_ids = {id(p) for p in params}
    names = [f"adapter.{n}" for n, p in adapter.named_parameters() if id(p) in trainable_ids]
    names += [n for n, p in unet.named_parameters() if "lora_" in n and id(p) in trainable_ids]
    optimizer = build_optimizer(
        params,
        name=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        bf16_stochastic_rounding=args.bf16_adapter,
        seed=args.seed,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=total_steps * world,
    )
    ema = None
    if args.ema:
        ema = EMAModel(list(adapter.parameters()), decay=args.ema_decay)
        ema.to(*placement.table()["ema"])
    check_placement(pipe, placement, adapter=adapter, ema=ema)
    return Trainables(
        adapter=adapter,
        params=params,
        names=names,
        lora_params=lora_params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ema=ema,
        denoiser=GroundedDenoiser(unet, adapter),
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
    )


def _forward_context(state: RunState):
    import contextlib

    import torch

    if state.autocast is not None:
        return state.autocast()
    if state.accelerator is not None:  # accelerator.prepare wrapped the denoiser's forward in its autocast
        return contextlib.nullcontext()
    placement = state.placement
    if placement.weight_dtype == torch.float32:
        return contextlib.nullcontext()
    # torch has no autocast for the meta device: a rehearsal there passes RunState(autocast=...)
    return torch.autocast(placement.device.type, dtype=placement.weight_dtype)


def batch_latents(state: RunState, batch: dict, gens):
    """The step's VAE latents: sampled from the batch's cached distribution, or encoded now by the VAE in
    its placement dtype (fp32 under fp16 for a ``force_upcast`` VAE), then scaled. The sample is drawn in
    fp32 (the forward's autocast casts the UNet's input)."""
    import torch

    from diffusers_ext.training.dataset import to_unit_range

    placement = state.placement
    device, weight_dtype = placement.device, placement.weight_dtype
    with torch.no_grad():
        if "latent_mean" in batch:
            mean = batch["latent_mean"].to(device, weight_dtype)
            std = batch["latent_std"].to(device, weight_dtype)
        else:
            pixels = to_unit_range(batch["pixels"].to(device, non_blocking=True)).to(placement.vae_dtype)
            dist = state.pipe.vae.encode(pixels).latent_dist
            mean, std = dist.mean.to(weight_dtype), dist.std.to(weight_dtype)
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
        return (mean.float() + std.float() * eps) * state.scaling


def training_step(state: RunState, batch: dict, step: int, *, micro: int = 0):
    """One micro-batch of optimizer step ``step`` on ``batch`` (the keys
    :func:`~diffusers_ext.training.dataset.collate_samples` gives, with or without the cache's entries):
    caption dropout, latents, text, layouts with their dropouts, noise and timesteps (each sample's from its
    own generator, :func:`sample_generators`), the grounded UNet's forward, the loss, backward, and, when the
    gradients are complete (always without gradient accumulation), clipping, the optimizer and LR scheduler
    steps and the EMA update. ``micro`` is the micro-batch's index within the step
    (``--gradient-accumulation-steps``; run it inside ``accelerator.accumulate``). Returns the loss (a 0-dim
    tensor with no graph)."""
    import torch
    import torch.nn.functional as F

    args, t_ = state.args, state.trainables
    device = state.placement.device
    accelerator = state.accelerator
    b = len(batch["caption"])
    first = micro * args.batch_size * state.world + state.rank * args.batch_size
    gens = sample_generators(args.seed, step, range(first, first + b))
    captions = [
        "" if torch.rand(1, generator=g).item() < args.caption_dropout else c
        for g, c in zip(gens, batch["caption"], strict=True)
    ]
    latents = batch_latents(state, batch, gens)
    with torch.no_grad():
        text, added = _encode_text(
            state.pipe, state.kind, captions, device, batch, state.resolution, state.empty_prompt
        )
    boxes, feats, masks = _batch_layouts(
        state.pipe, batch, args.max_objs, t_.adapter.config.phrase_dim, gens, args, device
    )
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(device, latents.dtype)
    scheduler = t_.noise_scheduler
    t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens])
    t = t.to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = (
        scheduler.get_velocity(latents, noise, t)
        if scheduler.config.prediction_type == "v_prediction"
        else noise
    )
    with _forward_context(state):
        pred = t_.denoiser(noisy, t, text, boxes, feats, masks, added)
    loss = F.mse_loss(pred.float(), target.float())
    complete = accelerator is None or accelerator.sync_gradients
    if accelerator is not None:
        accelerator.backward(loss)  # divides by the accumulation steps
        if complete and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(t_.params, args.max_grad_norm)
    else:
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(t_.params, args.max_grad_norm)
    # accelerate's optimizer and scheduler wrappers skip these until the accumulated gradients are complete
    t_.optimizer.step()
    t_.lr_scheduler.step()
    t_.optimizer.zero_grad(set_to_none=True)
    if complete and t_.ema is not None:
        t_.ema.step(t_.adapter.parameters())
    return loss.detach()


def trainable_state(trainables: Trainables, unet) -> dict:
    """The trained weights a checkpoint holds (adapter and LoRA), fp32 on the host."""
    named = {f"adapter.{k}": v for k, v in trainables.adapter.state_dict().items()}
    named.update({n: p for n, p in unet.named_parameters() if "lora_" in n})
    return {k: v.detach().float().cpu().contiguous() for k, v in named.items()}


def register_checkpoint_hooks(accelerator, trainables: Trainables, unet) -> None:
    """``accelerator.save_state``/``load_state`` write and read only the trainable weights
    (``trainable.safetensors``), not the frozen base model the denoiser wraps."""
    import torch
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, out_dir):
        if accelerator.is_main_process:
            save_file(trainable_state(trainables, unet), str(Path(out_dir) / "trainable.safetensors"))
            hook(CHECKPOINT_HOOK, Path(out_dir).name.removeprefix(".").removesuffix(".tmp"))
        weights.clear()

    def load_hook(models, in_dir):
        state = load_file(str(Path(in_dir) / "trainable.safetensors"))
        own = {f"adapter.{k}": v for k, v in trainables.adapter.state_dict(keep_vars=True).items()}
        lora = dict(unet.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                target = own[k] if k.startswith("adapter.") else lora[k]
                target.copy_(v.to(target.dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: Path, step: int, args) -> Path:
    """Every process writes into ``.checkpoint-<step>.tmp``; the main one seals it (marker last) and
    renames it to ``checkpoint-<step>``, with the step and the run's flags in ``trainer_state.json``."""
    final = output_dir / f"checkpoint-{step}"
    staging = staging_name(final)
    if accelerator.is_main_process:
        staging_folder(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(staging / STATE, {"global_step": step, "flags": recorded_flags(args)})
        publish_folder(staging, final, marker={"global_step": step})
    accelerator.wait_for_everyone()
    return final


def _export(final: Path, write) -> None:
    staging = staging_folder(final)
    write(staging)
    publish_folder(staging, final)


def save_adapter(folder: Path, trainables: Trainables, unet, *, lora: bool) -> None:
    """The adapter (``adapter/``, ``from_pretrained``-loadable), its EMA (``adapter_ema/``) and the UNet's
    LoRA weights (``unet_lora.safetensors``) under ``folder``, each written whole or not at all. Call it on
    the main process only."""
    from safetensors.torch import save

    adapter, ema = trainables.adapter, trainables.ema
    folder.mkdir(parents=True, exist_ok=True)
    _export(folder / "adapter", adapter.save_pretrained)
    if ema is not None:
        ema.store(adapter.parameters())
        ema.copy_to(adapter.parameters())
        _export(folder / "adapter_ema", adapter.save_pretrained)
        ema.restore(adapter.parameters())
    if lora:
        weights = {
            n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if "lora_" in n
        }
        atomic_write_bytes(folder / "unet_lora.safetensors", save(weights))


def _make_accelerator(args, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.log_tensorboard else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )


def _refuse_fp16_without_gpu(args) -> None:
    import torch

    if args.mixed_precision == "fp16" and not (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    ):
        raise SystemExit(
            "--mixed-precision fp16 needs a GPU (CUDA or MPS): on the CPU half-precision training fails in its "
            "first step. Use --mixed-precision bf16 or no"
        )


def read_rows(args):
    """The grounding rows of ``--mixed-data``, their boxes checked (not yet cleaned) and the image folder."""
    from diffusers_ext.layout_rows import read_grounding_rows

    # boxes are only checked here; --min-area, --min-side and --max-objs apply in the crop (prepare_rows)
    rows, report = read_grounding_rows(args.mixed_data, min_area=0.0, min_side=0.0, max_objs=2**31)
    image_dir = Path(args.image_dir) if args.image_dir else Path(args.mixed_data).parent
    return rows, report, image_dir


def check_images(args, rows, report, image_dir: Path, accelerator, say) -> list[dict]:
    """Every image decoded once before training, each process its share (``--skip-bad-images``)."""
    from accelerate.utils import gather_object

    from diffusers_ext.training.dataset import verify_images

    return verify_images(
        rows,
        image_dir,
        skip_bad=args.skip_bad_images,
        report=report,
        log=say,
        progress=accelerator.is_local_main_process,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        gather=gather_object,
    )


def build_dataset(args, rows, image_dir: Path, resolution: int, report):
    """The training samples in GLIGEN's recipe, rows left without a box in their crop dropped."""
    from diffusers_ext.training.dataset import GroundingCrops, prepare_rows

    dataset = GroundingCrops(
        rows,
        image_dir,
        resolution,
        crop=args.crop,
        flip=args.random_flip,
        seed=args.seed,
        min_area=args.min_area,
        min_side=args.min_side,
        max_objs=args.max_objs,
    )
    prepare_rows(dataset, report)
    if not dataset.rows:
        raise SystemExit(f"no rows left after cleaning {args.mixed_data}: {report.summary()}")
    return dataset


def schedule_length(args, n_rows: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for ``n_rows`` samples, ``world`` processes and
    ``--gradient-accumulation-steps`` micro-batches per step."""
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = n_rows // (args.batch_size * world * accumulation)
    if steps_per_epoch == 0:
        raise SystemExit(
            f"{n_rows} rows after cleaning is fewer than one global batch ({args.batch_size} x {world} processes"
            + (f" x {accumulation} accumulated micro-batches" if accumulation > 1 else "")
            + ")"
        )
    total = steps_per_epoch * args.epochs
    if args.max_train_steps is not None:
        total = min(total, args.max_train_steps)
    return steps_per_epoch, total


def fill_conditioning_cache(args, pipe, kind: str, dataset, placement, accelerator, *, resolution: int):
    """The cache pass (``--cache-dir``), before the UNet goes to the device: each encoder is on the device
    only while it encodes (:func:`~diffusers_ext.training.placement.encoders_on_device`); afterwards the
    cached encoders are freed from the pipeline. Returns the cache, this rank's counts and the empty
    prompt's entry."""
    import torch

    from diffusers_ext.training.conditioning_cache import (
        ConditioningCache,
        file_digest,
        fill_cache,
        model_folder,
    )
    from diffusers_ext.training.placement import encoders_on_device

    rank, world = accelerator.process_index, accelerator.num_processes
    cache = ConditioningCache(
        args.cache_dir,
        model=model_folder(args.pretrained_model),
        kind=kind,
        dtype=str(placement.weight_dtype),
        latent_dtype=str(placement.vae_dtype),
        cache_latents=args.cache_latents,
        resolution=resolution,
        crop=args.crop,
    )
    if args.cache_latents:  # each process hashes its share of the images; all learn every digest
        from accelerate.utils import gather_object

        rows = dataset.rows
        mine = [(i, file_digest(dataset.image_dir / rows[i]["image"])) for i in range(rank, len(rows), world)]
        for i, digest in gather_object(mine) if world > 1 else mine:
            rows[i]["sha256"] = digest
    counts = fill_cache(
        cache,
        pipe,
        kind,
        dataset,
        device=placement.device,
        dtype=placement.vae_dtype,
        rank=rank,
        world=world,
        progress=accelerator.is_local_main_process,
        batch_size=args.cache_batch_size,
        encoders=lambda names: encoders_on_device(pipe, placement, names),
    )
    accelerator.wait_for_everyone()
    accelerator.print(
        f"conditioning cache {args.cache_dir}: {counts['entries']} entries, "
        f"{counts['found']} found, {counts['written']} computed"
        + (f" (process {rank}'s share)" if world > 1 else "")
    )
    empty_prompt = cache.read("prompt", {"text": ""})
    dataset.cache = cache
    for name in ("text_encoder", "text_encoder_2") + (("vae",) if args.cache_latents else ()):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cache, counts, empty_prompt


def _log_step(
    accelerator, args, state: RunState, step: int, epoch: int, mean_loss: float, metrics_path: Path
):
    stats = state.trainables.adapter.gate_stats()
    record = {
        "step": step,
        "epoch": epoch,
        "loss": mean_loss,
        "lr": state.trainables.lr_scheduler.get_last_lr()[0],
        "gate_mean": stats["mean"],
        "gate_std": stats["std"],
        "gate_min": stats["min"],
        "gate_max": stats["max"],
    }
    if accelerator.is_main_process:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log(
        {
            "train/loss": mean_loss,
            "train/gate_mean": stats["mean"],
            "train/gate_std": stats["std"],
            "train/lr": record["lr"],
        },
        step=step,
    )
    if args.log_gate_stats and step % args.log_gate_stats == 0:
        accelerator.print(
            f"step {step} gates mean={stats['mean']:.5f} std={stats['std']:.5f} "
            f"min={stats['min']:.5f} max={stats['max']:.5f}"
        )
        for name, (g_attn, g_dense) in stats["per_layer"].items():
            accelerator.print(f"  {name}: attn={g_attn:.5f} dense={g_dense:.5f}")
    return stats


def load_checkpoint(
    accelerator, folder: Path, saved_flags, args, trainables: Trainables, metrics_path: Path, say
) -> int:
    """Resume from ``folder``: the trainable weights, optimizer, LR scheduler, EMA and RNG states, the flags a
    resume may change put in (:func:`apply_optimizer_overrides`), and the metrics after the checkpoint's step
    removed (they are trained again). Returns the step to continue from."""
    accelerator.load_state(str(folder))
    apply_optimizer_overrides(saved_flags, args, trainables.optimizer, trainables.lr_scheduler)
    step = json.loads((folder / STATE).read_text())["global_step"]
    accelerator.print(f"resumed from {folder} at step {step}")
    if accelerator.is_main_process:
        dropped = truncate_metrics(metrics_path, step)
        if dropped:
            say(f"{metrics_path}: removed {dropped} rows after step {step}; they are trained again")
    return step


def run_steps(
    state: RunState, dataset, output_dir: Path, global_step: int, total_steps: int, steps_per_epoch: int
):
    """The loop: this process's batches from ``global_step`` on (:class:`EpochBatchSampler`, the loader
    workers), :func:`training_step` per micro-batch inside ``accelerator.accumulate``, and per optimizer step
    the metrics row, checkpoints (``--checkpointing-steps``) and epoch exports (``--save-epoch``). Returns
    the mean loss of each optimizer step taken."""
    import torch
    from tqdm.auto import tqdm

    from diffusers_ext.training.dataset import EpochBatchSampler, collate_samples

    args, accelerator, trainables = state.args, state.accelerator, state.trainables
    unet, metrics_path = state.pipe.unet, output_dir / "metrics.jsonl"
    accumulation = args.gradient_accumulation_steps
    sampler = EpochBatchSampler(
        len(dataset),
        args.batch_size,
        world=state.world,
        rank=state.rank,
        seed=args.seed,
        accumulation=accumulation,
    )
    workers = args.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=workers,
        pin_memory=state.placement.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    losses = []
    bar = tqdm(
        total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    while global_step < total_steps:
        epoch = global_step // steps_per_epoch
        sampler.set_epoch(epoch, (global_step % steps_per_epoch) * accumulation)
        micro_losses = []
        for batch in loader:
            with accelerator.accumulate(trainables.denoiser):
                micro_losses.append(training_step(state, batch, global_step, micro=len(micro_losses)))
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            mean_loss = accelerator.gather(torch.stack(micro_losses).mean().reshape(1)).mean().item()
            micro_losses = []
            losses.append(mean_loss)
            stats = _log_step(accelerator, args, state, global_step, epoch, mean_loss, metrics_path)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", gate=f"{stats['mean']:.4f}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args)
            if global_step % steps_per_epoch == 0 and (epoch + 1) % args.save_epoch == 0:
                if accelerator.is_main_process:
                    save_adapter(
                        output_dir / f"epoch-{epoch + 1}", trainables, unet, lora=bool(args.lora_rank)
                    )
            if global_step >= total_steps:
                break
    bar.close()
    return losses


def train(argv: list[str] | None = None, *, pipeline=None) -> dict:
    """Run training from command-line arguments: parse and check (flags, resume, rows, ``--layers``, images),
    load the pipeline (or take ``pipeline``: the only weights read), resolve the defaults and check the rest,
    clear the previous run (``--overwrite``, only now), plan the placement, fill the cache, build the
    trainables, load a checkpoint, then :func:`run_steps` (:func:`training_step` with checkpoints and
    exports) and export the adapter. Returns steps, per-step losses, final gate stats, the cleaning report,
    the names of the trained parameters, the UNet's dtype, whether it recomputes activations (gradient
    checkpointing), the modules on the device and the cache counts."""
    args = parse_args(argv)
    given = given_flags(sys.argv[1:] if argv is None else argv)
    output_dir = Path(args.output_dir)
    refuse_reused_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite)
    _refuse_fp16_without_gpu(args)

    from diffusers_ext.generation import phrase_dim, pipeline_kind
    from diffusers_ext.training.placement import plan_placement

    accelerator = _make_accelerator(args, output_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    def say(message: str) -> None:
        accelerator.print(message, file=sys.stderr, flush=True)

    # every check before anything is deleted (--overwrite) or computed: flags, resume, rows, images, layers
    resume_from = _resume_folder(args, output_dir, say) if args.resume else None
    rows, report, image_dir = read_rows(args)
    args.world_size, args.data_fingerprint = world, data_fingerprint(rows)
    saved_flags = None
    if resume_from is not None:
        saved_flags = json.loads((resume_from / STATE).read_text()).get("flags")
        # with --init-adapter, the shape flags are known for certain once it has loaded: compared then
        early = [
            n for n in (*FIXED, *RUN_FACTS, *OVERRIDABLE) if not (args.init_adapter and n in INIT_DECIDED)
        ]
        for line in check_resumed_flags(saved_flags, args, resume_from, names=early):
            say(line)
    described = (
        None  # --init-adapter's config, where files tell it: it decides --layers/--hidden-dim/--max-objs
    )
    if args.init_adapter:
        described = check_init_adapter_before_loading(args, given, pipeline)
    check_layers_before_loading(args, pipeline)
    rows = check_images(args, rows, report, image_dir, accelerator, say)
    if pipeline is None:
        check_memory_before_loading(args, say)
    pipe = pipeline if pipeline is not None else load_pipeline(args)
    kind = pipeline_kind(pipe)
    scaling, phrase_width = pipe.vae.config.scaling_factor, phrase_dim(pipe)  # before the cache frees them
    init_adapter = None
    if described is not None and resume_from is not None and not args.init_adapter_base_unet:
        # the checkpoint's adapter weights win: shaped from the config, the init weights are not read
        init_adapter = adapter_for_resume(args, described, phrase_width, resume_from)
    if args.init_adapter and init_adapter is None:  # checked before --overwrite deletes anything
        init_adapter = load_init_adapter(args, pipe, phrase_width, given)
    resolve_defaults(args, pipe)
    if resume_from is not None:  # the defaults' values (and --init-adapter's shape) are known now
        names = RESOLVED + (INIT_DECIDED if args.init_adapter else ())
        check_resumed_flags(saved_flags, args, resume_from, names=names)
    if init_adapter is None:
        check_layers(args, pipe, phrase_width)
    resolution = args.resolution
    dataset = build_dataset(args, rows, image_dir, resolution, report)
    accelerator.print(f"data cleaning: {report.summary()}")
    steps_per_epoch, total_steps = schedule_length(args, len(dataset), world)
    if args.overwrite:
        if accelerator.is_main_process:
            removed = clear_previous_run(output_dir)
            if removed:
                say(f"--overwrite: removed {', '.join(removed)} from {output_dir}")
        accelerator.wait_for_everyone()

    placement = plan_placement(
        args.mixed_precision,
        device,
        cache_dir=bool(args.cache_dir),
        cache_latents=args.cache_latents,
        vae_force_upcast=bool(getattr(pipe.vae.config, "force_upcast", True)),
        bf16_adapter=args.bf16_adapter,
    )
    freeze_pipeline(pipe)
    cache, cache_counts, empty_prompt = None, None, None
    if args.cache_dir:
        cache, cache_counts, empty_prompt = fill_conditioning_cache(
            args, pipe, kind, dataset, placement, accelerator, resolution=resolution
        )
    trainables = build_trainables(
        args,
        pipe,
        placement,
        total_steps=total_steps,
        world=world,
        phrase_width=phrase_width,
        init_adapter=init_adapter,
    )
    on_device = [
        type(getattr(pipe, name)).__name__
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    ]
    unet = pipe.unet
    register_checkpoint_hooks(accelerator, trainables, unet)
    trainables.denoiser, trainables.optimizer, trainables.lr_scheduler = accelerator.prepare(
        trainables.denoiser, trainables.optimizer, trainables.lr_scheduler
    )
    if trainables.ema is not None:
        accelerator.register_for_checkpointing(trainables.ema)
    state = RunState(
        args=args,
        pipe=pipe,
        kind=kind,
        placement=placement,
        trainables=trainables,
        resolution=resolution,
        empty_prompt=empty_prompt,
        accelerator=accelerator,
        rank=rank,
        world=world,
        scaling=scaling,
    )

    metrics_path = output_dir / "metrics.jsonl"
    global_step = 0
    if resume_from is not None:
        global_step = load_checkpoint(
            accelerator, resume_from, saved_flags, args, trainables, metrics_path, say
        )
    if args.log_tensorboard:
        accelerator.init_trackers(
            "spatial_adapter",
            config={
                k: v
                for k, v in vars(args).items()
                if v is not None and isinstance(v, (int, float, str, bool))
            },
        )

    output_dir.mkdir(parents=True, exist_ok=True)
    losses = run_steps(state, dataset, output_dir, global_step, total_steps, steps_per_epoch)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(output_dir, trainables, unet, lora=bool(args.lora_rank))
    accelerator.end_training()
    return {
        "steps": global_step + len(losses),
        "losses": losses,
        "gate_stats": trainables.adapter.gate_stats(),
        "cleaning": report,
        "trainable": trainables.names,
        "unet_dtype": str(unet.dtype),
        "gradient_checkpointing": unet.is_gradient_checkpointing,
        "on_device": on_device,
        "placement": placement,
        "cache": None if cache is None else {**cache_counts, "rewritten_bad": cache.rewritten_bad},
    }


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``train-spatial-adapter``)."""
    train(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
