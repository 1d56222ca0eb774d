"""JSON Lines reading with errors that name the file and line (shared by every JSONL input we accept)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["read_jsonl_objects"]


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` keeps the last of two equal keys without a word; a row ``{"boxes": A, "boxes": B}``
    is almost always a merge gone wrong, so it is refused."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKey(key)
        row[key] = value
    return row


def read_jsonl_objects(
    path: str | Path, hint: str, error: type[Exception] = ValueError
) -> Iterator[tuple[str, dict]]:
    """Yield ``("file:line", row)`` for every non-blank line of ``path``, each a JSON object.

    A line that is not valid JSON, valid JSON that is not an object, or an object with a key twice raises
    ``error`` naming the line and ``hint`` (what a row should look like). Blank lines are skipped.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line, object_pairs_hook=_refuse_duplicate_keys)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg}); each line must be {hint}") from None
            except _DuplicateKey as e:
                raise error(
                    f"{where}: key {e.args[0]!r} appears twice in one object (JSON keeps only the last); "
                    f"each line must be {hint}"
                ) from None
            if not isinstance(row, dict):
                raise error(
                    f"{where}: expected a JSON object, got {type(row).__name__}; each line must be {hint}"
                )
            yield where, row
