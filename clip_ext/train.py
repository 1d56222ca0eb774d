"""``python -m clip_ext.train``: open_clip's own trainer with a memory bank, logit-scale init and diagnostics.

Every ``open_clip_train`` flag works unchanged. open_clip_train has no plugin mechanism, so this module
wraps ``open_clip_train.main.main`` and rebinds the names it imported: ``parse_args`` (our flags, parsed
first with ``allow_abbrev=False`` so that none can swallow one of open_clip's by prefix),
``create_model_and_transforms`` (attach the bank to the model so it is checkpointed, set the logit scale),
``create_loss`` (:class:`~clip_ext.loss.MemoryBankClipLoss`) and ``train_one_epoch`` (an optimizer
step hook that enqueues once per optimizer step and logs diagnostics).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import open_clip
import open_clip_train.main as host
import torch
from open_clip_train.params import parse_args as host_parse_args

import clip_ext  # noqa: F401  (registers the tiny model configs)
from clip_ext import diagnostics
from clip_ext.logit_scale import init_logit_scale
from clip_ext.loss import MemoryBankClipLoss
from clip_ext.memory_bank import FEATURE_CHOICES, MemoryBank

__all__ = ["main", "parse_args", "extra_parser"]

BANK_ATTR = "memory_bank"


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
    return args


@dataclass
class _Run:
    args: argparse.Namespace | None = None
    model: torch.nn.Module | None = None
    loss: MemoryBankClipLoss | None = None
    hooked_optimizer: int | None = None
    steps: int = 0
    tb_writer: object = None


_run = _Run()


def _embed_dim(model: torch.nn.Module) -> int:
    dim = getattr(model.visual, "output_dim", None) or getattr(model, "embed_dim", None)
    if dim is None:
        raise ValueError(f"cannot tell the embedding dim of {type(model).__name__} for the memory bank")
    return int(dim)


def _ignore_missing_bank_keys(module, incompatible) -> None:
    """Resuming a checkpoint saved without a bank starts the bank empty instead of failing."""
    missing = [k for k in incompatible.missing_keys if k.startswith(BANK_ATTR + ".")]
    if missing:
        logging.warning("checkpoint has no memory bank state; the bank starts empty")
    for key in missing:
        incompatible.missing_keys.remove(key)


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
            args.memory_bank_size, _embed_dim(model), args.memory_bank_warmup_steps, args.memory_bank_features
        )
        model.add_module(BANK_ATTR, bank.to(next(model.parameters()).device))
        model.register_load_state_dict_post_hook(_ignore_missing_bank_keys)
        # All ranks enqueue the same gathered batch; DDP's per-forward broadcast of these buffers from
        # rank 0 would only cost K x D of traffic per step, so exclude them.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, bank.buffer_names(BANK_ATTR + ".")
        )
    _run.model = model
    return model, preprocess_train, preprocess_val


def create_loss(args):
    if not args.memory_bank_size and not args.diag:
        return open_clip.create_loss(args)
    if args.siglip or args.distill or "coca" in args.model.lower():
        return open_clip.create_loss(args)
    _run.loss = MemoryBankClipLoss(
        getattr(_run.model, BANK_ATTR, None),
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
    _run.steps += 1
    if args.diag and (_run.steps - 1) % args.log_every_n_steps == 0 and host.is_master(args):
        stats = diagnostics.collect(_run.model, loss, getattr(_run.model, BANK_ATTR, None))
        logging.info("diag step %d: %s", _run.steps, " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
        if _run.tb_writer is not None:
            for key, value in stats.items():
                _run.tb_writer.add_scalar(f"diag/{key}", value, _run.steps)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    _run.tb_writer = tb_writer
    if _run.hooked_optimizer != id(optimizer):
        optimizer.register_step_post_hook(_after_optimizer_step)
        _run.hooked_optimizer = id(optimizer)
        # the trainer's resume-safe step (as passed to its scheduler), so --resume continues the count
        _run.steps = data["train"].dataloader.num_batches // args.accum_freq * epoch
    return _host_train_one_epoch(
        model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer
    )


_host_train_one_epoch = host.train_one_epoch


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
    host.main(argv)


if __name__ == "__main__":
    main()
