"""``python -m clip_ext.train``: open_clip's own trainer with a memory bank, logit-scale init and diagnostics.

Every ``open_clip_train`` flag works unchanged. open_clip_train has no plugin mechanism, so this module
wraps ``open_clip_train.main.main`` and rebinds the names it imported: ``parse_args`` (our flags, parsed
first with ``allow_abbrev=False`` so that none can swallow one of open_clip's by prefix),
``create_model_and_transforms`` (attach the bank to the model so it is checkpointed, set the logit scale),
``create_loss`` (:class:`~clip_ext.loss.MemoryBankClipLoss`), ``train_one_epoch`` (an optimizer
step hook that enqueues once per optimizer step and logs diagnostics) and ``get_data``.

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
import sys
from dataclasses import dataclass
from pathlib import Path

import open_clip
import open_clip_train.main as host
import torch
from open_clip.transformer import VisionTransformer
from open_clip_train.data import CsvDataset, DataInfo
from open_clip_train.params import parse_args as host_parse_args
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import clip_ext  # noqa: F401  (registers the tiny model configs)
from clip_ext import diagnostics
from clip_ext.logit_scale import init_logit_scale
from clip_ext.loss import MemoryBankClipLoss
from clip_ext.memory_bank import FEATURE_CHOICES, MemoryBank
from clip_ext.region import RegionHead, region_forward
from clip_ext.region_data import (
    BatchSideChannel,
    ClipExtCsvDataset,
    RegionDataError,
    RegionTable,
    SideChannelLoader,
    load_region_table,
)

__all__ = ["main", "parse_args", "extra_parser"]

BANK_ATTR = "memory_bank"
REGION_ATTR = "clip_ext_region"
DEFAULT_REGION_LOSS_WEIGHT = 0.1  # FG-CLIP's weight of the region term


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
        "image path; turns on the FG-CLIP-style region loss (csv data, ViT towers)",
    )
    group.add_argument(
        "--region-loss-weight",
        type=float,
        default=None,
        help=f"weight of the region InfoNCE added to the loss; {DEFAULT_REGION_LOSS_WEIGHT} when --region-data "
        "is given, 0 = off",
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
        help="initial log logit scale: 2.6592 = ln(1/0.07) from scratch by default; 4.6052 = "
        "ln(100) on request; a --pretrained checkpoint keeps its own unless this is given",
    )
    group.add_argument(
        "--diag",
        action="store_true",
        help="log logit scales, logit range, bank pointer/fill/enabled and the share of "
        "zero-norm image features every --log-every-n-steps (log + TensorBoard)",
    )
    return parser  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    """open_clip_train's arguments plus ours; validated before any work is done."""
    extra = extra_parser()
    if any(a in ("-h", "--help") for a in argv):
        extra.print_help()
        print("\nopen_clip_train flags (all accepted unchanged):\n")
    ours, rest = extra.parse_known_args(argv)
    args = host_parse_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    if args.memory_bank_size < 0:
        raise SystemExit(f"--memory-bank-size must be >= 0 (0 = off), got {args.memory_bank_size}")
    if args.memory_bank_warmup_steps < 0:
        raise SystemExit(f"--memory-bank-warmup-steps must be >= 0, got {args.memory_bank_warmup_steps}")
    if args.memory_bank_size and (args.siglip or args.distill_model or "coca" in args.model.lower()):
        raise SystemExit("--memory-bank-size works with the CLIP contrastive loss only (not --siglip, "
                         "--distill-model or CoCa models)")  # fmt: skip
    if args.memory_bank_dedup and not args.memory_bank_size:
        raise SystemExit(
            "--memory-bank-dedup masks bank entries of the same sample; it needs --memory-bank-size"
        )
    if args.region_loss_weight is not None and args.region_loss_weight < 0:
        raise SystemExit(f"--region-loss-weight must be >= 0 (0 = off), got {args.region_loss_weight}")
    if args.region_loss_weight and not args.region_data:
        raise SystemExit("--region-loss-weight needs --region-data (the JSONL of boxes and region captions)")
    if args.min_box_area < 0 or args.min_box_side < 0:
        raise SystemExit(f"--min-box-area and --min-box-side must be >= 0, got {args.min_box_area}, "
                         f"{args.min_box_side}")  # fmt: skip
    if args.region_data and not Path(args.region_data).is_file():
        raise SystemExit(
            f"--region-data {args.region_data}: no such file (a JSONL of boxes and region captions)"
        )
    if args.region_data and args.region_loss_weight is None:
        args.region_loss_weight = DEFAULT_REGION_LOSS_WEIGHT
    args.region_loss_weight = args.region_loss_weight or 0.0
    if _region_on(args) and (args.siglip or args.distill_model or "coca" in args.model.lower()):
        raise SystemExit("--region-data works with the CLIP contrastive loss only (not --siglip, "
                         "--distill-model or CoCa models)")  # fmt: skip
    return args


def _region_on(args) -> bool:
    return bool(args.region_data) and args.region_loss_weight > 0


@dataclass
class _Run:
    args: argparse.Namespace | None = None
    model: torch.nn.Module | None = None
    loss: MemoryBankClipLoss | None = None
    hooked_optimizer: int | None = None
    steps: int = 0
    tb_writer: object = None
    channel: BatchSideChannel | None = None
    region_table: RegionTable | None = None


_run = _Run()


def _embed_dim(model: torch.nn.Module) -> int:
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


def _extras_forward(model: torch.nn.Module, args: argparse.Namespace):
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
        if _region_on(args):
            out = region_forward(model, image, text, extras["region_boxes"], extras["region_valid"],
                                 extras["region_text"])  # fmt: skip
            out["region_caption_ids"] = extras["region_caption_ids"].reshape(-1)
        else:
            out = plain_forward(image, text)
        if args.memory_bank_dedup:
            out["sample_ids"] = extras["sample_ids"]
        return out

    return forward


def create_model_and_transforms(*pos, **kwargs):
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(*pos, **kwargs)
    args = _run.args
    if _run.model is not None or args is None:  # a distillation teacher, or use outside main()
        return model, preprocess_train, preprocess_val
    init_logit_scale(model, args.logit_scale_init, args.pretrained or None)
    if args.memory_bank_size:
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
    if _region_on(args):
        if not isinstance(model.visual, VisionTransformer):
            raise SystemExit(f"--region-data needs a patch-token map: open_clip ViT image towers only, but "
                             f"{args.model} has a {type(model.visual).__name__}")  # fmt: skip
        head = RegionHead(float(model.logit_scale.detach().float()))  # FG-CLIP: start from the global scale
        model.add_module(REGION_ATTR, head.to(next(model.parameters()).device))
    if args.memory_bank_size or _region_on(args):
        model.register_load_state_dict_post_hook(_ignore_missing_bank_keys)
    if _region_on(args) or args.memory_bank_dedup:
        model.forward = _extras_forward(model, args)
    _run.model = model
    return model, preprocess_train, preprocess_val


def create_loss(args):
    if not (args.memory_bank_size or args.diag or _region_on(args)):
        return open_clip.create_loss(args)
    if args.siglip or args.distill or "coca" in args.model.lower():
        return open_clip.create_loss(args)
    _run.loss = MemoryBankClipLoss(
        getattr(_run.model, BANK_ATTR, None),
        region_head=getattr(_run.model, REGION_ATTR, None),
        region_weight=args.region_loss_weight if _region_on(args) else 0.0,
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )
    return _run.loss


def _after_optimizer_step(optimizer, *_):
    """Runs only when the optimizer really steps: a step that AMP's GradScaler skips (inf gradients) is not
    counted towards the warmup and its batch is not enqueued."""
    args, loss = _run.args, _run.loss
    if loss is not None:
        loss.commit()
    head = getattr(_run.model, REGION_ATTR, None)
    if head is not None:
        head.clamp_()  # as the host clamps model.logit_scale after each step
    _run.steps += 1
    if args.diag and (_run.steps - 1) % args.log_every_n_steps == 0 and host.is_master(args):
        stats = diagnostics.collect(_run.model, loss, getattr(_run.model, BANK_ATTR, None))
        logging.info("diag step %d: %s", _run.steps, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if _run.tb_writer is not None:
            for key, value in stats.items():
                _run.tb_writer.add_scalar(f"diag/{key}", value, _run.steps)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    _run.tb_writer = tb_writer
    if _run.region_table is not None and host.is_master(args):
        logging.info("epoch %d: %s", epoch, _run.region_table.summary())
    if _run.hooked_optimizer != id(optimizer):
        optimizer.register_step_post_hook(_after_optimizer_step)
        _run.hooked_optimizer = id(optimizer)
        # the trainer's resume-safe step (as passed to its scheduler), so --resume continues the count
        _run.steps = data["train"].dataloader.num_batches // args.accum_freq * epoch
    return _host_train_one_epoch(
        model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer
    )


_host_train_one_epoch = host.train_one_epoch
_host_get_data = host.get_data


def _box_aware_transform(model: torch.nn.Module, preprocess_train):
    """Resize (squash) + normalize with the model's preprocess config: open_clip's train transform does a
    RandomResizedCrop, which would cut boxes or move them off their objects."""
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


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """open_clip's ``get_data``; with ``--region-data`` or ``--memory-bank-dedup`` the train split is
    rebuilt around the host's ``CsvDataset`` so that batches carry boxes, region captions and sample ids."""
    data = _host_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    if not (_region_on(args) or args.memory_bank_dedup) or "train" not in data:
        return data
    base = data["train"].dataloader.dataset
    if not isinstance(base, CsvDataset):
        raise SystemExit(f"--region-data / --memory-bank-dedup need --dataset-type csv (a CSV --train-data); "
                         f"got a {type(base).__name__} for {args.train_data}")  # fmt: skip
    transform, regions = None, None
    if _region_on(args):
        try:
            regions = load_region_table(args.region_data, base.images, args.min_box_area, args.min_box_side)
        except RegionDataError as e:
            raise SystemExit(str(e)) from None
        logging.info(regions.summary())
        transform = _box_aware_transform(_run.model, preprocess_fns[0])
    _run.region_table = regions
    dataset = ClipExtCsvDataset(base, transform, regions)
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


def _parse_and_remember(argv):
    _run.args = parse_args(argv)
    return _run.args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    global _run
    _run = _Run()
    host.parse_args = _parse_and_remember
    host.create_model_and_transforms = create_model_and_transforms
    host.create_loss = create_loss
    host.train_one_epoch = train_one_epoch
    host.get_data = get_data
    host.main(argv)


if __name__ == "__main__":
    main()
