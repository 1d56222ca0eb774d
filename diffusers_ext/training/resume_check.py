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

__all__ = [
    "FIXED",
    "OVERRIDABLE",
    "RESOLVED",
    "RUN_FACTS",
    "data_fingerprint",
    "apply_optimizer_overrides",
    "check_resumed_flags",
    "recorded_flags",
]

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
    "gradient_accumulation_steps",
    "crop",
    "random_flip",
    "optimizer",
    "bf16_adapter",
    "lr_scheduler",
    "lr_warmup_steps",
    "mixed_precision",
    "ema",
    "ema_decay",
    "seed",
    "init_adapter",
    "init_adapter_subfolder",
    "init_adapter_base_unet",
)
# Facts of the run that are not flags but decide which sample a step sees: the number of processes (the
# global batch and each rank's share of the permutation) and the rows' content. Compared like FIXED.
RUN_FACTS = {
    "world_size": "the number of processes",
    "data_fingerprint": "the content of the --mixed-data rows (SHA-256 of image names, captions, boxes, phrases)",
}
# Flags whose default stands for a value the trainer works out (the UNet's size, the rank, 0 or 1 by
# --init-mode): recorded resolved; a checkpoint that recorded None (an older version) is not compared on them.
RESOLVED = ("resolution", "lora_alpha", "gate_init_value")
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
    """The flags a checkpoint records: every fixed and overridable one and the run facts, as JSON values."""
    flags = {name: getattr(args, name) for name in (*FIXED, *OVERRIDABLE)}
    flags.update({name: getattr(args, name, None) for name in RUN_FACTS})
    for name in _PATHS:  # the same file from another working directory is the same file
        if flags[name] is not None:
            flags[name] = str(Path(flags[name]).resolve())
    source = flags["init_adapter"]
    if source is not None and Path(source).exists():  # a hub id stays as it is
        flags["init_adapter"] = str(Path(source).resolve())
    return flags


def check_resumed_flags(saved: dict | None, args, checkpoint, *, names=None) -> list[str]:
    """Refuse a change of a :data:`FIXED` flag or a :data:`RUN_FACTS` fact, naming every difference; return
    one line per changed :data:`OVERRIDABLE` flag.

    ``saved`` is the checkpoint's ``flags`` (None for a checkpoint written before they were recorded: then
    nothing can be compared, and the single returned line says so). ``names`` limits the comparison (the
    trainer compares the :data:`RESOLVED` flags once the pipeline is loaded and their values are known); a
    :data:`RESOLVED` flag or a fact that is None on either side is not compared.
    """
    if saved is None:
        return [
            f"--resume {checkpoint}: the checkpoint records no flags (an older version wrote it); they are not compared"
        ]

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    now = recorded_flags(args)
    wanted = set(names) if names is not None else set(FIXED) | set(RUN_FACTS) | set(OVERRIDABLE)

    def differs(name: str) -> bool:
        if name not in wanted or name not in saved:
            return False
        if (name in RESOLVED or name in RUN_FACTS) and (saved[name] is None or now[name] is None):
            return False
        return saved[name] != now[name]

    changes = [f"{flag(n)} {saved[n]!r} in the checkpoint, {now[n]!r} now" for n in FIXED if differs(n)]
    changes += [
        f"{what}: {saved[n]!r} in the checkpoint, {now[n]!r} now"
        for n, what in RUN_FACTS.items()
        if differs(n)
    ]
    if changes:
        raise SystemExit(
            f"--resume {checkpoint}: {'; '.join(changes)}. These decide the model, which samples each step sees "
            "or the numerics the checkpoint was trained with and cannot change in a resumed run; resume with the "
            "checkpoint's values, or start a new run in another --output-dir"
        )
    return [
        f"--resume: {flag(n)} {now[n]!r} overrides the checkpoint's {saved[n]!r} from the resumed step on"
        for n in OVERRIDABLE
        if differs(n)
    ]


def data_fingerprint(rows: list[dict]) -> str:
    """SHA-256 of what the rows say (image name, caption, boxes, phrases, in order): the same path does not
    vouch for the same data (a file edited or regenerated in place)."""
    import hashlib
    import json

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row["image"], row["caption"], row["boxes"], row["phrases"]]).encode() + b"\n")
    return h.hexdigest()


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
