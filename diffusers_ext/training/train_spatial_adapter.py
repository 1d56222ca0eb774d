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
step (noise, timesteps, dropouts, VAE sampling) comes from a generator seeded by (seed, step, rank), so a
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
from pathlib import Path

from diffusers_ext.training.resume_check import (
    apply_optimizer_overrides,
    check_resumed_flags,
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

__all__ = ["build_parser", "main", "train"]

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
    model.add_argument(
        "--layers", nargs="*", default=None, help="transformer-block name prefixes to adapt (default: all)"
    )
    model.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA on the UNet attention projections via peft (0: off)"
    )
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    optim = p.add_argument_group("optimization")
    optim.add_argument("--output-dir", required=True)
    optim.add_argument("--batch-size", type=int, default=4, help="per process")
    optim.add_argument("--epochs", type=int, default=1)
    optim.add_argument(
        "--max-train-steps", type=int, default=None, help="stop after this many steps in total"
    )
    optim.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (GLIGEN: 5e-5)")
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
    return p


def _check_args(args) -> None:
    for name in ("phrase_dropout", "box_dropout", "caption_dropout", "min_area", "min_side"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    for name in ("batch_size", "epochs", "max_objs", "save_epoch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dataloader_num_workers < 0:
        raise SystemExit(f"--dataloader-num-workers must be >= 0, got {args.dataloader_num_workers}")
    if args.cache_latents and not args.cache_dir:
        raise SystemExit("--cache-latents needs --cache-dir DIR (the folder the latents are cached in)")
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
    for name in ("weight_decay", "max_grad_norm", "lr_warmup_steps", "checkpointing_steps", "lora_rank"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.hidden_dim < 1:
        raise SystemExit(f"--hidden-dim must be >= 1, got {args.hidden_dim}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise SystemExit(f"--ema-decay must be in [0, 1), got {args.ema_decay}")


def _step_generator(seed: int, step: int, rank: int):
    import torch

    return torch.Generator().manual_seed(seed + 1_000_003 * step + 7919 * rank)


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


def _batch_layouts(pipe, batch: dict, max_objs: int, phrase_dim: int, g, args, device):
    """Boxes, phrase features (the batch's cached ones, or encoded now) and masks (B, max_objs, ...) with
    GLIGEN's object and layout dropout."""
    import torch

    from diffusers_ext.generation import encode_phrases

    b = len(batch["phrases"])
    boxes = torch.zeros(b, max_objs, 4)
    feats = torch.zeros(b, max_objs, phrase_dim)
    masks = torch.zeros(b, max_objs)
    if "phrase_feats" in batch:
        cached = [f for f in batch["phrase_feats"] if f is not None]
        encoded = torch.cat(cached).float() if cached else None
    else:
        phrases = [p for row in batch["phrases"] for p in row]
        encoded = encode_phrases(pipe, phrases).cpu() if phrases else None
    k = 0
    for i, row_boxes in enumerate(batch["boxes"]):
        n = len(row_boxes)
        if n:
            boxes[i, :n] = torch.tensor(row_boxes)
            feats[i, :n] = encoded[k : k + n]
        masks[i, :n] = 1
        k += n
    masks = masks * (torch.rand(b, max_objs, generator=g) >= args.phrase_dropout)
    masks = masks * (torch.rand(b, 1, generator=g) >= args.box_dropout)
    return boxes.to(device), feats.to(device), masks.to(device)


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


def train(argv: list[str] | None = None) -> dict:
    """Run training from command-line arguments; returns steps, per-step losses, final gate stats, the
    cleaning report, the names of the trained parameters, the UNet's dtype and whether it recomputes
    activations (gradient checkpointing)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    output_dir = Path(args.output_dir)
    refuse_reused_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite)

    import torch

    if args.mixed_precision == "fp16" and not (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    ):
        raise SystemExit(
            "--mixed-precision fp16 needs a GPU (CUDA or MPS): on the CPU half-precision training fails in its "
            "first step. Use --mixed-precision bf16 or no"
        )
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save, save_file
    from tqdm.auto import tqdm

    from diffusers_ext.generation import phrase_dim, pipeline_kind
    from diffusers_ext.layout_rows import read_grounding_rows
    from diffusers_ext.spatial_adapter import SpatialAdapter
    from diffusers_ext.training.dataset import (
        EpochBatchSampler,
        GroundingCrops,
        collate_samples,
        prepare_rows,
        to_unit_range,
        verify_images,
    )
    from diffusers_ext.training.grounded_denoiser import GroundedDenoiser

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if args.log_tensorboard else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    def say(message: str) -> None:
        accelerator.print(message, file=sys.stderr, flush=True)

    resume_from = _resume_folder(args, output_dir, say) if args.resume else None
    saved_flags = None
    if resume_from is not None:
        saved_flags = json.loads((resume_from / STATE).read_text()).get("flags")
        for line in check_resumed_flags(saved_flags, args, resume_from):
            say(line)
    if args.overwrite:
        if accelerator.is_main_process:
            removed = clear_previous_run(output_dir)
            if removed:
                say(f"--overwrite: removed {', '.join(removed)} from {output_dir}")
        accelerator.wait_for_everyone()

    # boxes are only checked here; --min-area, --min-side and --max-objs apply in the crop (prepare_rows)
    rows, report = read_grounding_rows(args.mixed_data, min_area=0.0, min_side=0.0, max_objs=2**31)
    image_dir = Path(args.image_dir) if args.image_dir else Path(args.mixed_data).parent
    rows = verify_images(
        rows,
        image_dir,
        skip_bad=args.skip_bad_images,
        report=report,
        log=say,
        progress=accelerator.is_local_main_process,
    )

    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model)
    kind = pipeline_kind(pipe)
    unet = pipe.unet
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
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
    accelerator.print(f"data cleaning: {report.summary()}")
    if not dataset.rows:
        raise SystemExit(f"no rows left after cleaning {args.mixed_data}: {report.summary()}")
    global_batch = args.batch_size * world
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(
            f"{len(dataset)} rows after cleaning is fewer than one global batch ({args.batch_size} x {world} processes)"
        )
    total_steps = steps_per_epoch * args.epochs
    if args.max_train_steps is not None:
        total_steps = min(total_steps, args.max_train_steps)

    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    adapter_phrase_dim, scaling = phrase_dim(pipe), pipe.vae.config.scaling_factor
    for module in (pipe.vae, *text_encoders, unet):
        module.requires_grad_(False).eval()
    on_device = []

    def to_device(modules):
        for module in modules:
            module.to(device, weight_dtype)
            on_device.append(type(module).__name__)

    to_device([unet])
    cache, cache_counts, empty_prompt = None, None, None
    if args.cache_dir:
        from diffusers_ext.training.conditioning_cache import ConditioningCache, fill_cache, model_folder

        cache = ConditioningCache(
            args.cache_dir,
            model=model_folder(args.pretrained_model),
            kind=kind,
            dtype=str(weight_dtype),
            cache_latents=args.cache_latents,
            resolution=resolution,
            crop=args.crop,
        )
        if args.cache_latents:
            from diffusers_ext.training.conditioning_cache import file_digest

            for row in dataset.rows:
                row["sha256"] = file_digest(image_dir / row["image"])
        cache_counts = fill_cache(
            cache,
            pipe,
            kind,
            dataset,
            device=device,
            dtype=weight_dtype,
            rank=rank,
            world=world,
            progress=accelerator.is_local_main_process,
            on_encoders=lambda needed: to_device(
                (text_encoders if "text" in needed else []) + ([pipe.vae] if "vae" in needed else [])
            ),
        )
        accelerator.wait_for_everyone()
        accelerator.print(
            f"conditioning cache {args.cache_dir}: {cache_counts['entries']} entries, "
            f"{cache_counts['found']} found, {cache_counts['written']} computed"
            + (f" (process {rank}'s share)" if world > 1 else ""),
        )
        empty_prompt = cache.read("prompt", {"text": ""})
        dataset.cache = cache
        # the encoders are not needed any more: free them (the VAE too when its latents are cached)
        for name in ("text_encoder", "text_encoder_2") + (("vae",) if args.cache_latents else ()):
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        text_encoders = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        to_device([pipe.vae, *text_encoders])

    trainable_extra = []
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
        trainable_extra = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in trainable_extra:
            p.data = p.data.float()
            p.requires_grad_(True)

    torch.manual_seed(args.seed)
    adapter = SpatialAdapter.for_unet(
        unet,
        phrase_dim=adapter_phrase_dim,
        layers=args.layers,
        max_objs=args.max_objs,
        hidden_dim=args.hidden_dim,
        init_mode=args.init_mode,
        gate_init=args.gate_init_value,
        freeze_gate=args.freeze_gate,
    )
    adapter.install(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in adapter.parameters() if p.requires_grad] + trainable_extra
    trainable_ids = {id(p) for p in params}
    trainable_names = [f"adapter.{n}" for n, p in adapter.named_parameters() if id(p) in trainable_ids]
    trainable_names += [n for n, p in unet.named_parameters() if "lora_" in n and id(p) in trainable_ids]
    denoiser = GroundedDenoiser(unet, adapter)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * world,
        num_training_steps=total_steps * world,
    )
    ema = EMAModel([p for p in adapter.parameters()], decay=args.ema_decay) if args.ema else None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def trainable_state() -> dict:
        named = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
        named.update({n: p for n, p in unet.named_parameters() if "lora_" in n})
        return {k: v.detach().float().cpu().contiguous() for k, v in named.items()}

    def save_hook(models, weights, out_dir):
        if accelerator.is_main_process:
            save_file(trainable_state(), str(Path(out_dir) / "trainable.safetensors"))
            hook(CHECKPOINT_HOOK, Path(out_dir).name.removeprefix(".").removesuffix(".tmp"))
        weights.clear()

    def load_hook(models, in_dir):
        state = load_file(str(Path(in_dir) / "trainable.safetensors"))
        own = {f"adapter.{k}": v for k, v in adapter.state_dict(keep_vars=True).items()}
        lora = dict(unet.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                target = own[k] if k.startswith("adapter.") else lora[k]
                target.copy_(v.to(target.dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    global_step = 0
    metrics_path = output_dir / "metrics.jsonl"
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        apply_optimizer_overrides(saved_flags, args, optimizer, lr_scheduler)
        global_step = json.loads((resume_from / STATE).read_text())["global_step"]
        accelerator.print(f"resumed from {resume_from} at step {global_step}")
        if accelerator.is_main_process:
            dropped = truncate_metrics(metrics_path, global_step)
            if dropped:
                say(
                    f"{metrics_path}: removed {dropped} rows after step {global_step}; they are trained again"
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

    def save_checkpoint(step: int) -> None:
        """Every process writes into ``.checkpoint-<step>.tmp``; the main one seals it (marker last) and
        renames it to ``checkpoint-<step>``."""
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

    def export(final: Path, write) -> None:
        staging = staging_folder(final)
        write(staging)
        publish_folder(staging, final)

    def save_adapter(folder: Path) -> None:
        if not accelerator.is_main_process:
            return
        folder.mkdir(parents=True, exist_ok=True)
        export(folder / "adapter", adapter.save_pretrained)
        if ema is not None:
            ema.store(adapter.parameters())
            ema.copy_to(adapter.parameters())
            export(folder / "adapter_ema", adapter.save_pretrained)
            ema.restore(adapter.parameters())
        if args.lora_rank:
            lora = {
                n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if "lora_" in n
            }
            atomic_write_bytes(folder / "unet_lora.safetensors", save(lora))

    output_dir.mkdir(parents=True, exist_ok=True)
    sampler = EpochBatchSampler(len(dataset), args.batch_size, world=world, rank=rank, seed=args.seed)
    workers = args.dataloader_num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
    losses = []
    bar = tqdm(
        total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps"
    )
    while global_step < total_steps:
        epoch = global_step // steps_per_epoch
        sampler.set_epoch(epoch, global_step % steps_per_epoch)
        for batch in loader:
            g = _step_generator(args.seed, global_step, rank)
            captions = [
                "" if torch.rand(1, generator=g).item() < args.caption_dropout else c
                for c in batch["caption"]
            ]
            with torch.no_grad():
                if "latent_mean" in batch:
                    mean = batch["latent_mean"].to(device, weight_dtype)
                    std = batch["latent_std"].to(device, weight_dtype)
                else:
                    pixels = to_unit_range(batch["pixels"].to(device, non_blocking=True)).to(weight_dtype)
                    dist = pipe.vae.encode(pixels).latent_dist
                    mean, std = dist.mean, dist.std
                latents = (mean + std * torch.randn(mean.shape, generator=g).to(device)) * scaling
                text, added = _encode_text(pipe, kind, captions, device, batch, resolution, empty_prompt)
            boxes, feats, masks = _batch_layouts(
                pipe, batch, args.max_objs, adapter.config.phrase_dim, g, args, device
            )
            noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
            t = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(captions),), generator=g
            ).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, t)
            else:
                target = noise
            pred = denoiser(noisy, t, text, boxes, feats, masks, added)
            loss = F.mse_loss(pred.float(), target.float())
            accelerator.backward(loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(adapter.parameters())
            global_step += 1
            mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
            losses.append(mean_loss)
            stats = adapter.gate_stats()
            record = {
                "step": global_step,
                "epoch": epoch,
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "gate_mean": stats["mean"],
                "gate_std": stats["std"],
                "gate_min": stats["min"],
                "gate_max": stats["max"],
            }
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", gate=f"{stats['mean']:.4f}")
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
                step=global_step,
            )
            if args.log_gate_stats and global_step % args.log_gate_stats == 0:
                accelerator.print(
                    f"step {global_step} gates mean={stats['mean']:.5f} std={stats['std']:.5f} "
                    f"min={stats['min']:.5f} max={stats['max']:.5f}"
                )
                for name, (g_attn, g_dense) in stats["per_layer"].items():
                    accelerator.print(f"  {name}: attn={g_attn:.5f} dense={g_dense:.5f}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(global_step)
            if global_step % steps_per_epoch == 0 and (epoch + 1) % args.save_epoch == 0:
                save_adapter(output_dir / f"epoch-{epoch + 1}")
            if global_step >= total_steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    save_adapter(output_dir)
    accelerator.end_training()
    return {
        "steps": global_step,
        "losses": losses,
        "gate_stats": adapter.gate_stats(),
        "cleaning": report,
        "trainable": trainable_names,
        "unet_dtype": str(unet.dtype),
        "gradient_checkpointing": unet.is_gradient_checkpointing,
        "on_device": on_device,
        "cache": None if cache is None else {**cache_counts, "rewritten_bad": cache.rewritten_bad},
    }


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``train-spatial-adapter``)."""
    train(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
