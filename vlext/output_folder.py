"""The one rule for every vlext command that writes results into a folder: a used folder is refused.

``python -m vlext.seeds`` into the ``--out`` of an earlier 3-seed run replaced its ``seeds.json`` without a
word (issue 27), and ``vlext.demo --out`` did the same to a ``summary.json``. A results folder that already
holds files is now refused before anything runs, naming what is in it, unless the user passes
``--overwrite``; a ``--out`` that names a file (or lies under one) is refused too, instead of a traceback
from ``mkdir``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["output_folder_problem"]

SHOWN = 5  # how many of a used folder's entries the message names


def output_folder_problem(folder: Path, overwrite: bool, flag: str = "--out") -> str | None:
    """Why ``folder`` cannot receive a new run's results, or None when it can.

    Args:
        folder: the results folder the command would write.
        overwrite: the user passed ``--overwrite``: a used folder is accepted (its files are replaced).
        flag: the option that named the folder, for the message.
    """
    folder = Path(folder)
    for place in (folder, *folder.parents):
        if place.exists() and not place.is_dir():
            where = "is a file" if place == folder else f"lies under {place}, which is a file"
            return f"{flag} {folder} {where}; {flag} takes a folder (new, or one to replace with --overwrite)"
        if place.exists():
            break
    if not folder.is_dir() or overwrite:
        return None
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:SHOWN]]
    more = f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else ""
    return (
        f"{flag} {folder} already holds results ({', '.join(names)}{more}); pass --overwrite to replace "
        f"them, or choose a new {flag}"
    )
