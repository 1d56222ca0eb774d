"""Check a ``--train-data`` / ``--val-data`` CSV before open_clip reads it.

open_clip's ``CsvDataset`` reads the file with ``pandas.read_csv(sep=--csv-separator)`` and trains on
``str(caption)``: an empty title (or one pandas takes for missing, ``NA``, ``null``, ``None``) is NaN and
trains as the text ``"nan"`` without a word, and a comma-separated file read with the default tab separator
fails late with ``KeyError: 'filepath'``. :func:`check_csv` refuses both when the flags are parsed, naming
the file, the rows and what is accepted.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["check_csv", "is_csv"]


def is_csv(path: str | None, dataset_type: str) -> bool:
    """Whether open_clip's ``get_dataset_fn`` reads ``path`` as a CSV (explicitly or by extension)."""
    if not path:
        return False
    return dataset_type == "csv" or (dataset_type == "auto" and path.split(".")[-1] in ("csv", "tsv"))


def check_csv(path: str, flag: str, sep: str, img_key: str, caption_key: str) -> int:
    """Refuse a CSV whose columns or cells open_clip would misread; return its number of rows."""
    import pandas as pd

    if not Path(path).is_file():
        raise SystemExit(f"{flag} {path}: no such file")
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise SystemExit(
            f"{flag} {path} cannot be read as a CSV with --csv-separator {sep!r}: {error}"
        ) from None
    missing = [key for key in (img_key, caption_key) if key not in frame.columns]
    if missing:
        header = [str(c) for c in frame.columns]
        hint = ""
        for other in (",", "\t", ";", "|"):
            if other != sep and len(header) == 1 and all(k in header[0].split(other) for k in missing):
                hint = f"; the header looks {other!r}-separated: pass --csv-separator {other!r}"
                break
        raise SystemExit(
            f"{flag} {path}: column(s) {missing} not found; the header read with --csv-separator {sep!r} has "
            f"{header[:8]}. Name the image and caption columns with --csv-img-key / --csv-caption-key (now "
            f"{img_key!r} / {caption_key!r}){hint}"
        )
    if frame.empty:
        raise SystemExit(f"{flag} {path} has a header but no rows")
    as_read = pd.read_csv(path, sep=sep, usecols=[img_key, caption_key])  # as open_clip's CsvDataset reads it
    for key, what in ((caption_key, "caption"), (img_key, "image path")):
        cells = frame[key]
        bad = [
            i for i, (cell, read) in enumerate(zip(cells, as_read[key])) if pd.isna(read) or not cell.strip()
        ]
        if bad:
            shown = ", ".join(f"line {i + 2} {cells.iloc[i]!r}" for i in bad[:5])
            raise SystemExit(
                f"{flag} {path}: {len(bad)} {what}(s) in column {key!r} are empty or read as missing by "
                f"pandas ({shown}; the header is line 1); open_clip would train on the text 'nan'. Give "
                f"every row a non-empty {what}, or remove those rows"
            )
    return len(frame)
