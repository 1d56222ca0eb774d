"""``python -m clip_ext.train``: open_clip's own trainer with a memory bank, logit-scale init and diagnostics.

Every ``open_clip_train`` flag works unchanged. open_clip_train has no plugin mechanism, so this module
wraps ``open_clip_train.main.main`` and rebinds the names it imported: ``parse_args`` (our flags, parsed
first with ``allow_abbrev=False`` so that none can swallow one of open_clip's by prefix),
``create_model_and_transforms`` (attach the bank to the model so it is checkpointed, set the logit scale),
``create_loss`` (:class:`~clip_ext.loss.MemoryBankClipLoss`), ``train_one_epoch`` (an optimizer
step hook that enqueues once per optimizer step and logs diagnostics), ``get_data``, and for checkpoints
``torch`` (only its ``save``: atomic, with our state under a key open_clip ignores), ``pt_load`` (merges it
back on ``--resume``) and ``get_latest_checkpoint`` (``--resume latest`` skips incomplete files); see
:mod:`clip_ext.checkpoint`. :func:`main` restores every one of these names when it returns or raises.
Without ``--logit-scale-init`` the model keeps open_clip's own logit scale (and SigLIP bias).

On ``--dataset-type webdataset`` shards the regions come from each sample's JSON member instead, through
open_clip's own webdataset pipeline with our stages attached (:mod:`clip_ext.region_shards`, and
docs/clip_webdataset.md). Every name rebound here is listed, checked at start-up and bound in
:mod:`clip_ext.host`.

The FG-CLIP-style region loss (``--region-data``) and duplicate-aware bank masking
(``--memory-bank-dedup``) need per-sample data that open_clip's batches cannot carry (the host unpacks
``images, texts = batch``). ``get_data`` builds open_clip's data as usual, then wraps the train
``CsvDataset`` and its loader (see :mod:`clip_ext.region_data`): the extras travel in a side channel keyed
by the image tensor, and the model's forward (replaced on the instance by ``create_model_and_transforms``)
returns them, or the region features computed from them, as extra entries of its output dict. The host
passes that dict to the loss as keyword arguments and, under ``--accum-freq``, concatenates the entries of
the cached batches like the global features; nothing else in the host's loop changes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# the names of open_clip_train.main that main() rebinds: listed, checked at start-up and bound in clip_ext.host
from clip_ext.host import REBOUND

# Only light imports here: ``--help`` answers without importing torch or open_clip (see main()).

__all__ = ["main", "parse_args", "extra_parser"]

BANK_ATTR = "memory_bank"
REGION_ATTR = "clip_ext_region"
DEFAULT_REGION_LOSS_WEIGHT = 0.1  # FG-CLIP's weight of the region term
DEFAULT_HARD_NEGATIVE_WEIGHT = 0.5  # FG-CLIP's weight of the hard-negative region term
FEATURE_CHOICES = ("both", "image", "text")  # clip_ext.memory_bank.FEATURE_CHOICES, without importing torch


def extra_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, prog="python -m clip_ext.train")
    group = parser.add_argument_group("clip_ext (memory bank, logit scale, diagnostics)")
    group.add_argument(
        "--memory-bank-size",
        type=int,
        default=0,
        help="slots K of the memory bank of past embeddings used as extra negatives; 0 = off",
    )
    group.add_argument(
        "--memory-bank-warmup-steps",
        type=int,
        default=0,
        help="optimizer steps before bank negatives are used (the bank fills meanwhile)",
    )
    group.add_argument(
        "--memory-bank-features",
        choices=FEATURE_CHOICES,
        default="both",
        help="bank negatives for both directions, only image (text->image) or only text",
    )
    group.add_argument(
        "--memory-bank-dedup",
        action="store_true",
        help="keep the sample id (first CSV row of the image) of every bank entry and do not use entries of "
        "the same image as negatives (ALBEF); csv data only",
    )
    group.add_argument(
        "--region-data",
        default=None,
        help="JSONL of boxes and region captions per image (normalized xyxy), matched to --train-data rows by "
        "image path; turns on the FG-CLIP-style region loss (csv data, ViT towers; webdataset shards carry "
        "regions in a member instead, see --wds-region-key)",
    )
    group.add_argument(
        "--region-loss-weight",
        type=float,
        default=None,
        help=f"weight of the region InfoNCE added to the loss; {DEFAULT_REGION_LOSS_WEIGHT} when --region-data "
        "is given, 0 = off",
    )
    group.add_argument(
        "--hard-negative-weight",
        type=float,
        nargs="?",
        const=DEFAULT_HARD_NEGATIVE_WEIGHT,
        default=None,
        help=f"FG-CLIP's hard-negative region loss: each region against its caption and the 'hard_negatives' "
        f"captions of its --region-data line, own learnable temperature; the flag alone means "
        f"{DEFAULT_HARD_NEGATIVE_WEIGHT}; off when not given",
    )
    group.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="read every --train-data image once before training and leave out those that cannot be read "
        "(each is logged, with the count); without it an unreadable image stops training naming the file",
    )
    group.add_argument(
        "--wds-region-key",
        default="regions.json;json",
        help="--dataset-type webdataset: the JSON member(s) of a sample holding its regions, first present wins "
        "(';'-separated); region loss on with --region-loss-weight and/or --hard-negative-weight. A 'json' member "
        "without a 'regions' key is metadata (no regions); see docs/clip_webdataset.md",
    )
    group.add_argument(
        "--skip-bad-regions",
        action="store_true",
        help="--dataset-type webdataset: a sample whose region member is malformed trains the global loss only "
        "(each logged with shard and key, counted per epoch); without it such a sample stops training naming "
        "shard and key",
    )
    group.add_argument(
        "--min-box-area",
        type=float,
        default=0.0,
        help="drop region boxes whose area (normalized, after clamping to the image) is below this",
    )
    group.add_argument(
        "--min-box-side",
        type=float,
        default=0.01,
        help="drop region boxes whose width or height (normalized, after clamping) is below this",
    )
    group.add_argument(
        "--logit-scale-init",
        type=float,
        default=None,
        help="initial log logit scale, applied only when given (e.g. 4.6052 = ln 100); otherwise open_clip's "
        "own init stands: ln(1/0.07) for CLIP, ln 10 (bias -10) for --siglip, a model config's "
        "init_logit_scale, a --pretrained checkpoint's value",
    )
    group.add_argument(
        "--diag",
        action="store_true",
        help="log logit scales (global, region, hard-negative), logit range, region and hard-negative losses, "
        "bank pointer/fill/enabled, the bank's share of softmax mass and the share of zero-norm image "
        "features every --log-every-n-steps (log + TensorBoard diag/*)",
    )
    return parser  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    """open_clip_train's arguments plus ours; validated before any work is done."""
    from open_clip_train.params import parse_args as host_parse_args  # argparse only, no torch

    extra = extra_parser()
    if any(a in ("-h", "--help") for a in argv):
        extra.print_help()
        print("\nopen_clip_train flags (all accepted unchanged):\n", flush=True)
    ours, rest = extra.parse_known_args(argv)
    args = host_parse_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    _check_numeric_flags(args)
    if args.memory_bank_size and (args.siglip or args.distill_model or "coca" in args.model.lower()):
        raise SystemExit("--memory-bank-size works with the CLIP contrastive loss only (not --siglip, "
                         "--distill-model or CoCa models)")  # fmt: skip
    if args.memory_bank_dedup and not args.memory_bank_size:
        raise SystemExit(
            "--memory-bank-dedup masks bank entries of the same sample; it needs --memory-bank-size"
        )
    webdataset = _is_webdataset(args)
    if webdataset:
        _check_webdataset_flags(args)
    elif args.region_loss_weight and not args.region_data:
        raise SystemExit("--region-loss-weight needs --region-data (the JSONL of boxes and region captions) or "
                         "--dataset-type webdataset shards whose samples carry region members")  # fmt: skip
    if args.region_data and not Path(args.region_data).is_file():
        raise SystemExit(
            f"--region-data {args.region_data}: no such file (a JSONL of boxes and region captions)"
        )
    if args.region_data and args.region_loss_weight is None:
        args.region_loss_weight = DEFAULT_REGION_LOSS_WEIGHT
    args.region_loss_weight = args.region_loss_weight or 0.0
    if args.hard_negative_weight and not args.region_data and not webdataset:
        raise SystemExit("--hard-negative-weight needs --region-data whose regions carry 'hard_negatives' "
                         "(lists of negative captions)")  # fmt: skip
    args.hard_negative_weight = args.hard_negative_weight or 0.0
    if args.region_data:
        args.region_source = "csv"
    elif webdataset and (args.region_loss_weight > 0 or args.hard_negative_weight > 0):
        args.region_source = "webdataset"
    else:
        args.region_source = None
    if args.skip_bad_regions and args.region_source != "webdataset":
        raise SystemExit("--skip-bad-regions applies to the region members of --dataset-type webdataset shards "
                         "(with --region-loss-weight or --hard-negative-weight); a --region-data JSONL is "
                         "checked whole before training")  # fmt: skip
    if _regions_used(args) and (args.siglip or args.distill_model or "coca" in args.model.lower()):
        raise SystemExit("--region-data works with the CLIP contrastive loss only (not --siglip, "
                         "--distill-model or CoCa models)")  # fmt: skip
    from clip_ext.csv_check import check_csv, is_csv

    for flag, path in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if is_csv(path, args.dataset_type):
            rows = check_csv(path, flag, args.csv_separator, args.csv_img_key, args.csv_caption_key)
            if flag == "--train-data" and args.memory_bank_size > rows and not args.memory_bank_dedup:
                # a named logger: the root-level logging.warning would configure the root logger before
                # open_clip's setup_logging does, and every later line would then print twice
                logging.getLogger(__name__).warning(
                    "--memory-bank-size %d is larger than --train-data's %d rows: after one epoch the bank holds "
                    "each sample's own earlier embedding, which the loss then counts as a negative. Pass "
                    "--memory-bank-dedup (masks a sample's own entries) or use a bank of at most %d",
                    args.memory_bank_size, rows, rows,
                )  # fmt: skip
    ours_on = [flag for flag, on in (("--memory-bank-size", args.memory_bank_size), ("--region-data", _regions_used(args)),
                                     ("--memory-bank-dedup", args.memory_bank_dedup)) if on]  # fmt: skip
    if ours_on and (args.torchscript or args.trace):
        raise SystemExit(
            f"{'--torchscript' if args.torchscript else '--trace'} cannot be combined with {', '.join(ours_on)}: "
            "open_clip compiles the model with torch.jit, and a compiled model can neither carry the memory bank "
            "and region heads nor run clip_ext's region forward. Train without it, then export the weights "
            "(python -m clip_ext.export) and load them with --torchscript for inference"
        )
    return args


# flag: (attribute, accepts(value), what is accepted); floats are also checked for NaN and inf first
_RANGES = {
    "--memory-bank-size": ("memory_bank_size", lambda v: v >= 0, ">= 0 (0 = off)"),
    "--memory-bank-warmup-steps": ("memory_bank_warmup_steps", lambda v: v >= 0, ">= 0"),
    "--region-loss-weight": ("region_loss_weight", lambda v: v >= 0, ">= 0 (0 = off)"),
    "--hard-negative-weight": ("hard_negative_weight", lambda v: v >= 0, ">= 0 (0 = off)"),
    "--min-box-area": ("min_box_area", lambda v: 0 <= v < 1, "in [0, 1) (a share of the image; 1 drops every box)"),
    "--min-box-side": ("min_box_side", lambda v: 0 <= v < 1,
                       "in [0, 1) (a share of the image side; 1 drops every box)"),
    "--logit-scale-init": ("logit_scale_init", lambda v: 0 <= v <= 4.605170185988092,
                           "lie in [0, ln(100) = 4.6052] (log space)"),
    "--lr": ("lr", lambda v: v > 0, "> 0 (a learning rate of 0 trains nothing)"),
}  # fmt: skip


def _check_numeric_flags(args) -> None:
    """Every numeric flag of clip_ext (and --lr) in its range and finite, before any work (issue 27)."""
    import math

    for flag, (name, accepts, accepted) in _RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{flag} must be a finite number, got {value}")
        if not accepts(value):
            verb = "" if accepted.startswith("lie") else "be "
            raise SystemExit(f"{flag} must {verb}{accepted}, got {value}")


def _is_webdataset(args) -> bool:
    """open_clip reads --train-data as webdataset shards (its own rule for --dataset-type auto: a .tar suffix)."""
    if args.dataset_type == "webdataset":
        return True
    return args.dataset_type == "auto" and bool(args.train_data) and args.train_data.split(".")[-1] == "tar"


def _check_webdataset_flags(args) -> None:
    """Flags of the CSV path that have no meaning on shards are refused, naming what applies instead."""
    if args.region_data:
        raise SystemExit("--region-data is a JSONL matched to CSV rows; webdataset shards carry each sample's "
                         "regions in a JSON member (--wds-region-key, default regions.json;json) and the "
                         "region loss is turned on by --region-loss-weight / --hard-negative-weight")  # fmt: skip
    if args.memory_bank_dedup:
        raise SystemExit("--memory-bank-dedup needs --dataset-type csv (its sample ids are CSV rows)")
    if args.skip_bad_images:
        raise SystemExit("--skip-bad-images needs --dataset-type csv: open_clip's webdataset pipeline already "
                         "leaves out images it cannot decode (logging each); for malformed region members use "
                         "--skip-bad-regions")  # fmt: skip
    if not [k for k in args.wds_region_key.split(";") if k.strip()]:
        raise SystemExit(f"--wds-region-key must name at least one member, got {args.wds_region_key!r}")


def _region_source(args) -> str | None:
    """Where batches get their regions: "csv" (--region-data), "webdataset" (shard members) or None."""
    return getattr(args, "region_source", "csv" if getattr(args, "region_data", None) else None)


def _region_on(args) -> bool:
    """The region InfoNCE is on."""
    return _region_source(args) is not None and args.region_loss_weight > 0


def _hard_negative_on(args) -> bool:
    return _region_source(args) is not None and args.hard_negative_weight > 0


def _regions_used(args) -> bool:
    """Batches carry boxes and the model computes region features (for either region loss)."""
    return _region_on(args) or _hard_negative_on(args)


@dataclass
class _Run:
    """State of one main() call (the host calls our functions without a context)."""

    args: argparse.Namespace | None = None
    model: object = None
    loss: object = None
    hooked_optimizer: int | None = None
    steps: int = 0  # resume-safe optimizer step, as the host counts it
    taken: int = 0  # optimizer steps taken in this process (AMP's scaler may skip some)
    lag_logged: bool = False
    tb_writer: object = None
    channel: object = None
    region_table: object = None
    shard_loader: object = None  # clip_ext.region_shards.RegionShardLoader on the webdataset path
    resume_rng: dict | None = None  # RNG state of the --resume checkpoint, restored before its first epoch
    host: dict | None = None  # the original open_clip_train.main names


_run = _Run()


def _embed_dim(model) -> int:
    dim = getattr(model.visual, "output_dim", None) or getattr(model, "embed_dim", None)
    if dim is None:
        raise ValueError(f"cannot tell the embedding dim of {type(model).__name__} for the memory bank")
    return int(dim)


def _ignore_missing_bank_keys(module, incompatible) -> None:
    """Resuming a checkpoint saved without a bank (or region head) starts it fresh instead of failing."""
    for attr, what in ((BANK_ATTR, "memory bank state; the bank starts empty"),
                       (REGION_ATTR, "region head; its temperature starts from the global scale")):  # fmt: skip
        missing = [k for k in incompatible.missing_keys if k.startswith(attr + ".")]
        if missing:
            logging.warning("checkpoint has no %s (%s)", what, ", ".join(missing))
        for key in missing:
            incompatible.missing_keys.remove(key)


def _extras_forward(model, args: argparse.Namespace):
    """The model's forward while batches carry extras: open_clip's outputs plus ``sample_ids``
    (``--memory-bank-dedup``) and the padded region features of :func:`clip_ext.region.region_forward`."""
    plain_forward = model.forward

    def forward(image=None, text=None):
        channel = _run.channel
        extras = channel.get(image) if channel is not None and image is not None else None
        if extras is None:
            if model.training and channel is not None and image is not None:
                raise RuntimeError(
                    "clip_ext.train: a training batch reached the model without its region data / sample ids "
                    "(the batch side channel has no entry for this image tensor)"
                )
            return plain_forward(image, text)  # evaluation batches
        if _regions_used(args):
            from clip_ext.region import region_forward

            out = region_forward(model, image, text, extras["region_boxes"], extras["region_valid"],
                                 extras["region_text"], extras.get("region_hard_negative_text"),
                                 extras.get("region_hard_negative_valid"))  # fmt: skip
            out["region_caption_ids"] = extras["region_caption_ids"].reshape(-1)
        else:
            out = plain_forward(image, text)
        if args.memory_bank_dedup:
            out["sample_ids"] = extras["sample_ids"]
        return out

    return forward


def _old_format_hint(error: Exception, pretrained: str) -> str | None:
    text = str(error)
    if "Unexpected key" in text and any(
        f'"{prefix}' in text for prefix in ("memory_bank.", "clip_ext_region.")
    ):
        return (f"--pretrained {pretrained} was written by an older clip_ext that kept the memory bank inside its "
                f"state_dict; write its open_clip weights with `python -m clip_ext.export {pretrained} OUT.pt` "
                "and pass --pretrained OUT.pt (or --resume it to keep the bank)")  # fmt: skip
    return None


def create_model_and_transforms(*pos, **kwargs):
    import open_clip
    import torch

    from clip_ext.logit_scale import init_logit_scale

    args = _run.args
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(*pos, **kwargs)
    except RuntimeError as e:
        hint = _old_format_hint(e, args.pretrained) if args is not None and args.pretrained else None
        if hint is None:
            raise
        raise SystemExit(hint) from None
    if _run.model is not None or args is None:  # a distillation teacher, or use outside main()
        return model, preprocess_train, preprocess_val
    # without --logit-scale-init, open_clip's own init (or the checkpoint's value) stands
    init_logit_scale(model, args.logit_scale_init, args.pretrained or None)
    if args.memory_bank_size:
        from clip_ext.memory_bank import MemoryBank

        global_batch = args.batch_size * args.accum_freq * args.world_size
        if args.memory_bank_size < global_batch:
            raise SystemExit(
                f"--memory-bank-size {args.memory_bank_size} is smaller than the global batch {global_batch} "
                "(--batch-size x --accum-freq x world size)"
            )
        bank = MemoryBank(
            args.memory_bank_size, _embed_dim(model), args.memory_bank_warmup_steps, args.memory_bank_features,
            track_ids=args.memory_bank_dedup, region_text=_region_on(args),
        )  # fmt: skip
        model.add_module(BANK_ATTR, bank.to(next(model.parameters()).device))
        # All ranks enqueue the same gathered batch; DDP's per-forward broadcast of these buffers from
        # rank 0 would only cost K x D of traffic per step, so exclude them.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, bank.buffer_names(BANK_ATTR + ".")
        )
    if _regions_used(args):
        from open_clip.transformer import VisionTransformer

        from clip_ext.region import RegionHead

        if not isinstance(model.visual, VisionTransformer):
            raise SystemExit(f"--region-data needs a patch-token map: open_clip ViT image towers only, but "
                             f"{args.model} has a {type(model.visual).__name__}")  # fmt: skip
        # FG-CLIP: the region temperatures start from the global scale
        head = RegionHead(float(model.logit_scale.detach().float()), hard_negatives=_hard_negative_on(args))
        model.add_module(REGION_ATTR, head.to(next(model.parameters()).device))
    if args.memory_bank_size or _regions_used(args):
        model.register_load_state_dict_post_hook(_ignore_missing_bank_keys)
    if _regions_used(args) or args.memory_bank_dedup:
        model.forward = _extras_forward(model, args)
    _run.model = model
    return model, preprocess_train, preprocess_val


def create_loss(args):
    import open_clip

    if not (args.memory_bank_size or args.diag or _regions_used(args)):
        return open_clip.create_loss(args)
    if args.siglip or args.distill or "coca" in args.model.lower():
        return open_clip.create_loss(args)
    from clip_ext.loss import MemoryBankClipLoss

    if args.world_size > 1 and _regions_used(args) and not args.gather_with_grad:
        logging.warning(
            "%d processes without --gather-with-grad: open_clip's contrastive loss and clip_ext's region loss give "
            "the towers 1/%d of the gradient one process would on the same global batch (the hard-negative loss "
            "keeps the full gradient); pass --gather-with-grad for the one-process scale of every term",
            args.world_size, args.world_size,
        )  # fmt: skip
    _run.loss = MemoryBankClipLoss(
        getattr(_run.model, BANK_ATTR, None),
        region_head=getattr(_run.model, REGION_ATTR, None),
        region_weight=args.region_loss_weight if _region_on(args) else 0.0,
        hard_negative_weight=args.hard_negative_weight if _hard_negative_on(args) else 0.0,
        diag=args.diag,
        keep_logits=False,  # switched on for the logged steps by the optimizer step hook
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )
    return _run.loss


def _check_warmup_lag() -> None:
    """Log once when AMP's GradScaler skipped optimizer steps: the bank's warmup counts only steps taken, so
    it switches on later than --memory-bank-warmup-steps says in trainer steps."""
    loss, bank = _run.loss, getattr(_run.model, BANK_ATTR, None)
    if _run.lag_logged or loss is None or bank is None:
        return
    trainer_steps = loss.calls // _run.args.accum_freq  # steps the trainer ran in this process
    skipped = trainer_steps - _run.taken
    if skipped > 0:
        _run.lag_logged = True
        logging.warning(
            "memory bank: AMP's GradScaler skipped %d of the %d optimizer steps run so far (inf/NaN gradients "
            "while it calibrates its scale); the bank counts only steps taken, so it is at step %d while the "
            "trainer is at step %d, and it switches on %d trainer step(s) later than --memory-bank-warmup-steps "
            "%d says (logged once)", skipped, trainer_steps, int(bank.step), _run.steps + skipped, skipped,
            bank.warmup_steps,
        )  # fmt: skip


def _after_optimizer_step(optimizer, *_):
    """Runs only when the optimizer really steps: a step that AMP's GradScaler skips (inf gradients) is not
    counted towards the warmup and its batch is not enqueued."""
    from clip_ext import diagnostics

    args, loss = _run.args, _run.loss
    if loss is not None:
        loss.commit()
    head = getattr(_run.model, REGION_ATTR, None)
    if head is not None:
        head.clamp_()  # as the host clamps model.logit_scale after each step
    _run.steps += 1
    _run.taken += 1
    _check_warmup_lag()
    if args.diag and (_run.steps - 1) % args.log_every_n_steps == 0 and _run.host["is_master"](args):
        stats = diagnostics.collect(_run.model, loss, getattr(_run.model, BANK_ATTR, None))
        logging.info("diag step %d: %s", _run.steps, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if _run.tb_writer is not None:
            for key, value in stats.items():
                _run.tb_writer.add_scalar(f"diag/{key}", value, _run.steps)
    _keep_logits_if_logged(args)


def _keep_logits_if_logged(args) -> None:
    """--diag: the loss keeps its logits (for the logit range and the bank's share of softmax mass) only for
    the step the master logs next; every other step and rank keeps and computes nothing for the log."""
    if hasattr(_run.loss, "keep_logits"):
        _run.loss.keep_logits = bool(
            args.diag and _run.steps % args.log_every_n_steps == 0 and _run.host["is_master"](args)
        )


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    from clip_ext.checkpoint import restore_rng_state

    _run.tb_writer = tb_writer
    if _run.resume_rng is not None and args.world_size == 1:
        # the global generators as they were when the checkpoint was written, so that the resumed epoch
        # shuffles and crops as the uninterrupted run would have
        restore_rng_state(_run.resume_rng)
        logging.info("resume: restored the global RNG state saved with the checkpoint")
        _run.resume_rng = None
    if _run.region_table is not None and _run.host["is_master"](args):
        logging.info("epoch %d: %s", epoch, _run.region_table.summary())
    if _run.hooked_optimizer != id(optimizer):
        optimizer.register_step_post_hook(_after_optimizer_step)
        _run.hooked_optimizer = id(optimizer)
        # the trainer's resume-safe step (as passed to its scheduler), so --resume continues the count
        _run.steps = data["train"].dataloader.num_batches // args.accum_freq * epoch
    _keep_logits_if_logged(args)
    result = _run.host["train_one_epoch"](
        model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer
    )
    _check_warmup_lag()
    if _run.shard_loader is not None:
        summary = _run.shard_loader.epoch_summary()  # a collective: every rank calls it
        if _run.host["is_master"](args):
            logging.info("epoch %d: %s", epoch, summary)
            counts = _run.shard_loader.last_counts
            if _hard_negative_on(args) and counts["kept"] and not counts["with_negatives"]:
                logging.warning("--hard-negative-weight: none of the %d regions of epoch %d carried 'hard_negatives' "
                                "(a list of negative captions per region in the region member); the hard-negative "
                                "loss was 0", counts["kept"], epoch)  # fmt: skip
    return result


def _box_aware_transform(model, preprocess_train):
    """Resize (squash) + normalize with the model's preprocess config: open_clip's train transform does a
    RandomResizedCrop, which would cut boxes or move them off their objects."""
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", {})
    transform = open_clip.image_transform(
        model.visual.image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        resize_mode="squash", interpolation=cfg.get("interpolation"),
    )  # fmt: skip
    replaced = ", ".join(
        type(t).__name__ for t in getattr(preprocess_train, "transforms", [preprocess_train])
    )
    logging.info("region loss: open_clip's train transform (%s) is replaced by a box-aware one (%s), since "
                 "random crops would break the boxes", replaced,
                 ", ".join(type(t).__name__ for t in transform.transforms))  # fmt: skip
    return transform


def _good_rows(base, args) -> list[int] | None:
    """With --skip-bad-images: read every image once and keep the rows that open; each skipped file logged."""
    if not args.skip_bad_images:
        return None
    from clip_ext.image_check import find_bad_images

    bad = find_bad_images(base.images)
    for row, path, reason in bad:
        logging.warning("--skip-bad-images: skipping %s (CSV row %d): %s", path, row + 1, reason)
    logging.info("--skip-bad-images: %d of %d training images cannot be read and are left out",
                 len(bad), len(base.images))  # fmt: skip
    if len(bad) == len(base.images):
        raise SystemExit(f"--skip-bad-images: none of the {len(bad)} images of {args.train_data} can be read")
    skipped = {row for row, _, _ in bad}
    return [i for i in range(len(base.images)) if i not in skipped]


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """open_clip's ``get_data``; the train CSV's images are decoded with errors that name the file, and with
    ``--region-data``, ``--memory-bank-dedup`` or ``--skip-bad-images`` the train split is rebuilt around the
    host's ``CsvDataset`` so that batches carry boxes, region captions and sample ids."""
    import open_clip
    import torch
    from open_clip_train.data import CsvDataset, DataInfo
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from clip_ext.image_check import NamingTransform, name_unopenable_images
    from clip_ext.region_data import (
        BatchSideChannel,
        ClipExtCsvDataset,
        RegionDataError,
        SideChannelLoader,
        load_region_table,
    )

    if _region_source(args) == "webdataset":
        return _webdataset_region_data(args, preprocess_fns, epoch, tokenizer)
    data = _run.host["get_data"](args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    if "train" not in data:
        return data
    # open_clip's WebLoader (webdataset without region flags) has no .dataset: nothing of ours applies there
    base = getattr(data["train"].dataloader, "dataset", None)
    if isinstance(base, CsvDataset) and not isinstance(base.transforms, NamingTransform):
        base.transforms = NamingTransform(base.transforms)
        name_unopenable_images(base)
    if not (_regions_used(args) or args.memory_bank_dedup or args.skip_bad_images):
        return data
    if not isinstance(base, CsvDataset):
        raise SystemExit(f"--region-data / --memory-bank-dedup / --skip-bad-images need --dataset-type csv (a CSV "
                         f"--train-data); got a {type(base).__name__} for {args.train_data}")  # fmt: skip
    rows = _good_rows(base, args)
    transform, regions = None, None
    if _regions_used(args):
        try:
            regions = load_region_table(args.region_data, base.images, args.min_box_area, args.min_box_side)
        except RegionDataError as e:
            raise SystemExit(str(e)) from None
        logging.info(regions.summary())
        if _hard_negative_on(args):
            if regions.max_hard_negatives == 0:
                raise SystemExit(f"--hard-negative-weight: no region of {args.region_data} carries 'hard_negatives' "
                                 "(a list of negative captions per region, e.g. \"a blue circle\" for \"a red "
                                 "circle\"); add them or drop the flag")  # fmt: skip
            logging.info(regions.hard_negative_summary())
        transform = _box_aware_transform(_run.model, preprocess_fns[0])
    _run.region_table = regions
    dataset = ClipExtCsvDataset(base, transform, regions, hard_negatives=_hard_negative_on(args), rows=rows)
    sampler = DistributedSampler(dataset) if args.distributed else None
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.workers, pin_memory=torch.device(args.device).type == "cuda",
                        drop_last=True)  # fmt: skip
    loader.num_samples, loader.num_batches = len(dataset), len(loader)
    # the host keeps up to accum_freq batches in flight (and forwards each twice); keep one more
    _run.channel = BatchSideChannel(keep=args.accum_freq + 1)
    wrapped = SideChannelLoader(loader, _run.channel, args.device, open_clip.get_input_dtype(args.precision))
    data["train"] = DataInfo(wrapped, sampler)
    return data


def _webdataset_region_data(args, preprocess_fns, epoch, tokenizer):
    """open_clip's own webdataset train pipeline, built by its ``get_data`` with the box-aware transform, plus
    our region stages (see :mod:`clip_ext.region_shards` for where they hook in and why)."""
    import open_clip
    from open_clip_train.data import DataInfo

    from clip_ext.region_data import BatchSideChannel
    from clip_ext.region_shards import RegionShardLoader, RegionStage, attach_region_stages

    transform = _box_aware_transform(_run.model, preprocess_fns[0])
    data = _run.host["get_data"](args, (transform, preprocess_fns[1]), epoch=epoch, tokenizer=tokenizer)
    info = data["train"]
    stage = RegionStage(tokenizer, args.min_box_area, args.min_box_side, hard_negatives=_hard_negative_on(args),
                        skip_bad=args.skip_bad_regions, keys=args.wds_region_key)  # fmt: skip
    attach_region_stages(info.dataloader, stage)
    logging.info("webdataset regions: region members %s of each sample (boxes normalized xyxy, --min-box-area "
                 "%g, --min-box-side %g)%s", args.wds_region_key, args.min_box_area, args.min_box_side,
                 ", malformed members skipped (--skip-bad-regions)" if args.skip_bad_regions else "")  # fmt: skip
    # the host keeps up to accum_freq batches in flight (and forwards each twice); keep one more
    _run.channel = BatchSideChannel(keep=args.accum_freq + 1)
    _run.shard_loader = RegionShardLoader(info.dataloader, _run.channel, args.device,
                                          open_clip.get_input_dtype(args.precision))  # fmt: skip
    data["train"] = DataInfo(_run.shard_loader, info.sampler, info.shared_epoch)
    return data


class _TorchWithAtomicSave:
    """``torch`` as open_clip_train.main sees it, except ``save``: checkpoints go to a temporary name, fsync,
    an atomic rename (open_clip writes ``epoch_N.pt`` in place), with our state split off under
    ``checkpoint["clip_ext"]`` so that plain open_clip loads the file (see :mod:`clip_ext.checkpoint`)."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def save(self, obj, f, *rest, **kwargs):
        from clip_ext.checkpoint import atomic_save, split_extra_state

        if rest or kwargs or not isinstance(f, (str, os.PathLike)):
            return self._torch.save(obj, f, *rest, **kwargs)
        atomic_save(split_extra_state(obj, with_rng=_run.args is None or _run.args.world_size == 1), f)


def _pt_load(file_path, map_location=None):
    """The host's checkpoint loader (used for --resume) with our state merged back into ``state_dict``."""
    from clip_ext.checkpoint import EXTRA_KEY, merge_extra_state

    checkpoint = _run.host["pt_load"](file_path, map_location=map_location)
    if isinstance(checkpoint, dict) and EXTRA_KEY in checkpoint:
        _run.resume_rng = checkpoint[EXTRA_KEY].get("rng")
    return merge_extra_state(checkpoint)


def _latest_checkpoint(path, remote):
    """--resume latest: the newest complete epoch_N.pt (incomplete ones skipped, named in a warning)."""
    from clip_ext.checkpoint import latest_complete_checkpoint

    if remote:
        return _run.host["get_latest_checkpoint"](path, remote)
    return latest_complete_checkpoint(path)


def _parse_and_remember(argv):
    _run.args = parse_args(argv)
    return _run.args


def main(argv: list[str] | None = None):
    """Run open_clip_train's ``main`` with our names bound in its module; the originals are restored when it
    returns or raises, so a later plain ``open_clip_train.main.main`` in the same process is open_clip's own."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        parse_args(argv)  # prints ours and open_clip's help, then exits, before torch is imported
    import open_clip_train.data as host_data
    import open_clip_train.main as host

    from clip_ext.host import DATA, MAIN, bound, check_host

    check_host({MAIN: host, DATA: host_data})  # a missing or reshaped host name stops here, before any work
    import clip_ext  # noqa: F401  (registers the tiny model configs)

    global _run
    _run = _Run()
    originals = {name: getattr(host, name) for name in REBOUND}
    _run.host = {**originals, "is_master": host.is_master}
    replacements = {
        "parse_args": _parse_and_remember,
        "create_model_and_transforms": create_model_and_transforms,
        "create_loss": create_loss,
        "train_one_epoch": train_one_epoch,
        "get_data": get_data,
        "pt_load": _pt_load,
        "get_latest_checkpoint": _latest_checkpoint,
        "torch": _TorchWithAtomicSave(originals["torch"]),
    }
    levels = _logger_levels()
    try:
        with bound(host, replacements):
            return host.main(argv)
    finally:
        _restore_logger_levels(levels)


def _logger_levels() -> dict[str, int]:
    manager = logging.root.manager
    levels = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return {**levels, "": logging.root.level}


def _restore_logger_levels(levels: dict[str, int]) -> None:
    """open_clip's ``setup_logging`` sets every logger that exists to INFO (torch._dynamo's too, whose exit
    hooks then print compilation metrics when the process ends); put each back as main found it, and loggers
    made during the run back to NOTSET, their level when created."""
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))
    logging.root.setLevel(levels[""])


if __name__ == "__main__":
    sys.exit(main())
