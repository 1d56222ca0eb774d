"""What ``--resume`` may change: the resumed run's flags against those its checkpoint was trained with.

A checkpoint records the flags of the run that wrote it (``trainer_state.json``'s ``flags``). Resuming with
other flags used to continue without a word: the optimizer state brought the old ``--lr`` back, a new
``--max-objs`` rewrote the adapter's config, a new ``--hidden-dim`` failed with a raw size mismatch. Each flag
is in one of three classes:

- :data:`FIXED` flags shape the model, the data order or the numerics the checkpoint holds; a change is
  refused, naming each flag with both values (start a new run, or resume with the checkpoint's value);
- :data:`OVERRIDABLE` flags are read at every step (learning rate, weight decay, clipping, dropouts, run
  length); a change is honoured from the resumed step on and named in the log;
- the rest (output, saving and logging flags) may change freely.

Standard library only: the CLI calls it before torch is imported.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FIXED", "OVERRIDABLE", "apply_optimizer_overrides", "check_resumed_flags", "recorded_flags"]

_PATHS = ("pretrained_model", "mixed_data", "image_dir")

FIXED = (
    "pretrained_model",
    "mixed_data",
    "image_dir",
    "min_area",
    "min_side",
    "max_objs",
    "skip_bad_images",
    "resolution",
    "init_mode",
    "gate_init_value",
    "freeze_gate",
    "hidden_dim",
    "layers",
    "lora_rank",
    "lora_alpha",
    "batch_size",
    "lr_scheduler",
    "lr_warmup_steps",
    "mixed_precision",
    "ema",
    "ema_decay",
    "seed",
)
OVERRIDABLE = (
    "lr",
    "weight_decay",
    "max_grad_norm",
    "phrase_dropout",
    "box_dropout",
    "caption_dropout",
    "epochs",
    "max_train_steps",
)


def recorded_flags(args) -> dict:
    """The flags a checkpoint records: every fixed and overridable one, as JSON values."""
    flags = {name: getattr(args, name) for name in (*FIXED, *OVERRIDABLE)}
    for name in _PATHS:  # the same file from another working directory is the same file
        if flags[name] is not None:
            flags[name] = str(Path(flags[name]).resolve())
    return flags


def check_resumed_flags(saved: dict | None, args, checkpoint) -> list[str]:
    """Refuse a change of a :data:`FIXED` flag; return one line per changed :data:`OVERRIDABLE` flag.

    ``saved`` is the checkpoint's ``flags`` (None for a checkpoint written before they were recorded: then
    nothing can be compared, and the single returned line says so).
    """
    if saved is None:
        return [
            f"--resume {checkpoint}: the checkpoint records no flags (an older version wrote it); they are not compared"
        ]

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    now = recorded_flags(args)
    fixed = [name for name in FIXED if name in saved and saved[name] != now[name]]
    if fixed:
        changes = "; ".join(f"{flag(n)} {saved[n]!r} in the checkpoint, {now[n]!r} now" for n in fixed)
        raise SystemExit(
            f"--resume {checkpoint}: {changes}. These flags shape the model, the data order or the numerics the "
            "checkpoint was trained with and cannot change in a resumed run; resume with the checkpoint's values, "
            "or start a new run in another --output-dir"
        )
    return [
        f"--resume: {flag(n)} {now[n]!r} overrides the checkpoint's {saved[n]!r} from the resumed step on"
        for n in OVERRIDABLE
        if n in saved and saved[n] != now[n]
    ]


def apply_optimizer_overrides(saved: dict | None, args, optimizer, lr_scheduler) -> None:
    """After the optimizer and scheduler states are loaded (which bring the checkpoint's ``--lr`` and
    ``--weight-decay`` back): put the new values in, keeping the scheduler's progress (its current factor)."""
    if not saved:
        return
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if saved.get("lr") != args.lr:
        for i, group in enumerate(optimizer.param_groups):
            base = scheduler.base_lrs[i]
            group["lr"] = args.lr * (group["lr"] / base if base else 1.0)
            group["initial_lr"] = args.lr
        scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if saved.get("weight_decay") != args.weight_decay:
        for group in optimizer.param_groups:
            group["weight_decay"] = args.weight_decay
