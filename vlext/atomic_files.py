"""Files and folders written as databases write them, and the newest complete checkpoint found again.

One implementation for the three trainers, the evaluation and the demos. Standard library only (``torch.save``
is passed in as a callable), so a CLI imports it before torch.

- **A file** (:func:`atomic_write`, ``_bytes``, ``_text``, ``_json``, :func:`atomic_torch_save`) is written to a
  temporary name in the same folder, flushed and fsynced, then ``os.replace``-d onto its name, and the folder
  is fsynced: a reader, or a resume after SIGKILL or power loss, sees the old file or the whole new one.
- **A folder** (:func:`staging_folder`, :func:`publish_folder`) is written under a hidden staging name; every
  file is fsynced, an optional completion marker listing every file with its size is written last, and the
  folder is renamed into place. :func:`folder_problem` says why a folder is not complete.
- **The newest complete checkpoint** (:func:`newest_complete`) walks candidates newest first and returns the
  first one that passes a check, with each newer one skipped and why, so the caller names them.

One temporary-name convention: hidden, ``.<name>.<pid>.tmp`` for a file (two processes never share one) and
``.<name>.tmp`` for a staging folder (one writer; a leftover of a killed run is removed by the next save).
Neither matches a checkpoint pattern such as ``epoch_*.pt`` or ``checkpoint-<int>``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from vlext.test_hooks import armed, hook

__all__ = [
    "MARKER",
    "atomic_save_figure",
    "atomic_save_image",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "folder_files",
    "folder_problem",
    "fsync_path",
    "newest_complete",
    "publish_folder",
    "staging_folder",
    "staging_name",
    "temp_name",
    "torch_file_problem",
]

MARKER = "checkpoint_complete.json"
HALF_WRITTEN = "atomic-write:half-written"
BEFORE_RENAME = "atomic-write:before-rename"


def temp_name(path: str | os.PathLike) -> Path:
    """The temporary name of file ``path`` while it is written: ``.<name>.<pid>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def staging_name(final: str | os.PathLike) -> Path:
    """The hidden name folder ``final`` is written under: ``.<name>.tmp`` beside it."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's entry list: the rename itself); a no-op where folders cannot be
    opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform / filesystem opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file at :func:`temp_name`, flush, fsync, ``os.replace`` onto ``path``,
    fsync the folder. On any error (or KeyboardInterrupt) the temporary file is removed and ``path`` is left
    as it was. Returns ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
        >>> atomic_write(p, lambda f: f.write(b"abc")).read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            if armed(HALF_WRITTEN, path.name):
                buffer = io.BytesIO()
                write(buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                hook(HALF_WRITTEN, path.name)
                f.write(data[len(data) // 2 :])
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        hook(BEFORE_RENAME, path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of ``text``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = None, **dumps_kwargs) -> Path:
    """:func:`atomic_write` of ``json.dumps(obj, ensure_ascii=False, indent=indent)`` (newline-ended when
    indented)."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent, **dumps_kwargs)
    return atomic_write_text(path, text + "\n" if indent is not None else text)


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """:func:`atomic_write` of a matplotlib figure, in the format ``path``'s suffix names (``.png``, ``.svg``)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))


def atomic_save_image(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """:func:`atomic_write` of a PIL image, in the format ``path``'s suffix names."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda f: image.save(f, format=fmt, **save_kwargs))


def atomic_torch_save(obj, path: str | os.PathLike, save: Callable) -> Path:
    """``save(obj, f)`` (pass ``torch.save``) through :func:`atomic_write`."""
    return atomic_write(path, lambda f: save(obj, f))


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` archive, or None when it is: every member is read and
    its CRC checked, without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
                return "no data.pkl in the archive"
            bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC check"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def staging_folder(final: str | os.PathLike) -> Path:
    """Create the empty :func:`staging_name` folder ``final`` is written into before :func:`publish_folder`
    (a leftover of a killed run is removed first)."""
    staging = staging_name(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def folder_files(folder: str | os.PathLike, marker: str = MARKER) -> dict[str, int]:
    """Every file under ``folder`` (posix relative path -> size in bytes), the marker left out."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != marker
    }


def publish_folder_once(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename ``staging`` to ``final`` unless ``final`` already exists, for content-addressed folders (the
    name is a hash of the content, so a folder already there holds the same files): the first writer wins
    and a later one removes its own copy. Unlike :func:`publish_folder` it never moves a folder away that
    another process may be reading. Returns ``final``."""
    staging, final = Path(staging), Path(final)
    for name in folder_files(staging, MARKER):
        fsync_path(staging / name)
    fsync_path(staging)
    try:
        os.rename(staging, final)  # fails when final exists (a non-empty folder) or another writer won
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    fsync_path(final.parent)
    return final


def publish_folder(
    staging: str | os.PathLike,
    final: str | os.PathLike,
    marker: dict | None = None,
    marker_name: str = MARKER,
) -> Path:
    """fsync every file in ``staging``, write ``marker`` (plus ``"files"``: every file with its size) last,
    then rename ``staging`` to ``final``, replacing an older ``final`` only once the new one is complete.
    Returns ``final``."""
    staging, final = Path(staging), Path(final)
    files = folder_files(staging, marker_name)
    for name in files:
        fsync_path(staging / name)
    if marker is not None:
        atomic_write_json(staging / marker_name, {**marker, "files": files})
    fsync_path(staging)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def folder_problem(folder: str | os.PathLike, marker_name: str = MARKER) -> str | None:
    """Why ``folder`` is not complete, or None when its marker lists every file at its recorded size."""
    folder = Path(folder)
    marker_path = folder / marker_name
    if not marker_path.is_file():
        return f"no {marker_name} (the save did not finish)"
    try:
        files = dict(json.loads(marker_path.read_text(encoding="utf-8"))["files"])
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {marker_name} ({type(e).__name__}: {e})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or changed)"
    return None


def newest_complete(
    candidates: Iterable[Path], problem: Callable[[Path], str | None], *, key: Callable[[Path], object]
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The candidate with the largest ``key`` for which ``problem`` returns None, and every newer candidate
    skipped with its problem (the caller names them), newest first.

    Example:
        >>> newest_complete([Path("a-1"), Path("a-3"), Path("a-2")],
        ...                 lambda p: "no marker" if p.name == "a-3" else None,
        ...                 key=lambda p: int(p.name[2:]))
        (PosixPath('a-2'), [(PosixPath('a-3'), 'no marker')])
    """
    skipped = []
    for path in sorted(candidates, key=key, reverse=True):
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped
