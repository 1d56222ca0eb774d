"""JSON Lines reading with errors that name the file and line (shared by every JSONL input we accept)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["read_jsonl_objects"]


def read_jsonl_objects(
    path: str | Path, hint: str, error: type[Exception] = ValueError
) -> Iterator[tuple[str, dict]]:
    """Yield ``("file:line", row)`` for every non-blank line of ``path``, each a JSON object.

    A line that is not valid JSON, or valid JSON that is not an object, raises ``error`` naming the line
    and ``hint`` (what a row should look like). Blank lines are skipped.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg}); each line must be {hint}") from None
            if not isinstance(row, dict):
                raise error(
                    f"{where}: expected a JSON object, got {type(row).__name__}; each line must be {hint}"
                )
            yield where, row
