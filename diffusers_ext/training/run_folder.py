"""The trainer's ``--output-dir`` kept the way a database keeps its files, so no run loses or mixes work.

A folder (``checkpoint-<step>``, ``adapter``) is written under a hidden temporary name, every file is
fsynced, a checkpoint's completion marker is written last, and only then is the folder renamed into
place; a reader therefore sees a whole folder or none. A SIGKILL during a save leaves a hidden
``.checkpoint-<step>.tmp`` that resume ignores, and every earlier checkpoint untouched. ``--resume latest``
takes the newest ``checkpoint-<int>`` whose marker lists every file at its recorded size, and names each
newer folder it skips and why (a folder copied or damaged by hand, a run from an older version without
markers). A second run into a used folder is refused instead of overwriting checkpoints and appending
duplicate steps to ``metrics.jsonl``. The atomic writes, the folder publishing and the newest-complete
search are :mod:`vlext.atomic_files`; this module adds the trainer's rules (folder names, ``trainer_state.json``,
``--overwrite``). Standard library only: the CLI imports it before torch.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from vlext.atomic_files import (
    MARKER,
    atomic_write_json,
    atomic_write_text,
    folder_problem,
    newest_complete,
    publish_folder,
    staging_folder,
)

__all__ = [
    "MARKER",
    "checkpoint_problem",
    "clear_previous_run",
    "find_latest_checkpoint",
    "publish_folder",
    "refuse_reused_output_dir",
    "staging_folder",
    "truncate_metrics",
    "write_json_atomic",
]

STATE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
# Everything a run of train_spatial_adapter writes; --overwrite removes these and nothing else.
RUN_OUTPUTS = re.compile(
    r"(checkpoint-\d+|epoch-\d+|adapter|adapter_ema|unet_lora\.safetensors|metrics\.jsonl|logs|\..+\.(tmp|old))"
)


def refuse_reused_output_dir(output_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse a new run into a folder that already holds something, before any work is done."""
    if resume and overwrite:
        raise SystemExit(
            "--resume and --overwrite contradict each other: --resume continues the run in --output-dir, "
            "--overwrite deletes it and starts again; pass one"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"--output-dir {output_dir} is a file; give a folder (it is created if absent)")
    if resume or overwrite or not output_dir.is_dir():
        return
    entries = sorted(p.name for p in output_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        raise SystemExit(
            f"--output-dir {output_dir} is not empty ({shown}); a new run there would overwrite its "
            "checkpoints and adapter. Continue that run with --resume latest, start again with --overwrite "
            "(deletes the previous run's checkpoints, adapter and metrics), or choose another --output-dir"
        )


def clear_previous_run(output_dir: Path) -> list[str]:
    """``--overwrite``: delete what an earlier run wrote (other files stay); returns the removed names."""
    removed = []
    if not output_dir.is_dir():
        return removed
    for entry in sorted(output_dir.iterdir()):
        if RUN_OUTPUTS.fullmatch(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry.name)
    return removed


def write_json_atomic(path: Path, obj) -> None:
    """Write ``path`` under a temporary name, flush, fsync, then an atomic rename (``vlext.atomic_files``): never half a file."""
    atomic_write_json(path, obj)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when its marker vouches for every file."""
    match = CHECKPOINT_NAME.fullmatch(folder.name)
    marker_path = folder / MARKER
    if not marker_path.is_file():
        return f"no {MARKER} (the save did not finish)"
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files, step = dict(marker["files"]), int(marker["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} ({type(e).__name__}: {e})"
    if match and int(match.group(1)) != step:
        return f"{MARKER} says step {step}, the folder name says {match.group(1)}"
    if STATE not in files:
        return f"{STATE} is not among its files"
    return folder_problem(folder, MARKER)


def find_latest_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete ``checkpoint-<int>`` in ``output_dir`` and the newer folders skipped, with why.
    Names that are not ``checkpoint-<int>`` (``checkpoint-final``, ``.checkpoint-3.tmp``) are not
    checkpoints of this trainer and are ignored."""
    if not output_dir.is_dir():
        return None, []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return newest_complete(
        found, checkpoint_problem, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1))
    )


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the ``metrics.jsonl`` rows up to ``step`` (a resumed run writes the later ones again);
    returns how many rows were removed. A half-written last line (a killed run) counts as removed."""
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            removed += bool(line.strip())
    if removed:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return removed
