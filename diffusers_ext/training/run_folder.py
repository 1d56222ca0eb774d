"""The trainer's ``--output-dir`` kept the way a database keeps its files, so no run loses or mixes work.

A folder (``checkpoint-<step>``, ``adapter``) is written under a hidden temporary name, every file is
fsynced, a checkpoint's completion marker is written last, and only then is the folder renamed into
place; a reader therefore sees a whole folder or none. A SIGKILL during a save leaves a hidden
``.checkpoint-<step>.tmp`` that resume ignores, and every earlier checkpoint untouched. ``--resume latest``
takes the newest ``checkpoint-<int>`` whose marker lists every file at its recorded size, and names each
newer folder it skips and why (a folder copied or damaged by hand, a run from an older version without
markers). A second run into a used folder is refused instead of overwriting checkpoints and appending
duplicate steps to ``metrics.jsonl``. Standard library only: the CLI imports it before torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

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

MARKER = "checkpoint_complete.json"
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``path`` under a temporary name, flush, fsync, then ``os.replace``: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def staging_folder(final: Path) -> Path:
    """The empty hidden folder ``final`` is written into before ``publish_folder`` renames it."""
    staging = final.with_name(f".{final.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)  # what a killed run left behind
    staging.mkdir(parents=True)
    return staging


def _files(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def publish_folder(staging: Path, final: Path, marker: dict | None = None) -> None:
    """fsync every file in ``staging``, write ``marker`` (plus the file list with sizes) last, then rename
    ``staging`` to ``final``, replacing an older ``final`` only once the new one is complete."""
    files = _files(staging)
    for name in files:
        _fsync_path(staging / name)
    if marker is not None:
        write_json_atomic(staging / MARKER, {**marker, "files": files})
    _fsync_path(staging)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


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
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or changed)"
    return None


def find_latest_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete ``checkpoint-<int>`` in ``output_dir`` and the newer folders skipped, with why.
    Names that are not ``checkpoint-<int>`` (``checkpoint-final``, ``.checkpoint-3.tmp``) are not
    checkpoints of this trainer and are ignored."""
    if not output_dir.is_dir():
        return None, []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))
    ]
    skipped = []
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


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
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return removed
