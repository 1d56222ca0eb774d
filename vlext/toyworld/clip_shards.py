"""The toy CLIP set as webdataset tar shards, the layout ``open_clip_train --dataset-type webdataset`` reads.

The same samples as :func:`vlext.toyworld.write_clip_csv` (same seed, same scenes, same captions and regions),
written as ``root/<split>/000000.tar ...`` with, per sample ``key`` (its index, ``000000`` ...)::

    key.png            the image (PNG, as write_clip_csv writes it)
    key.txt            the caption (utf-8), open_clip's text member
    key.regions.json   {"regions": [{"box": [x0, y0, x1, y1], "caption": phrase, "hard_negatives": [...]}]}

boxes in normalized xyxy, the region member ``clip_ext.train`` reads (``--wds-region-key``). ``sizes.json``
beside the shards gives each shard's sample count, which open_clip reads when ``--train-num-samples`` is not
given. Shards hold contiguous runs of samples, sizes as even as possible. Written with the standard library's
``tarfile`` (fixed mtime, owner and mode, so the same arguments give the same bytes), each shard under a
temporary name and renamed when complete, ``sizes.json`` last.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from vlext.atomic_files import atomic_write, atomic_write_text
from vlext.toyworld._output import check_root
from vlext.toyworld._validation import check_count
from vlext.toyworld.clip_csv import clip_samples

__all__ = ["write_clip_shards", "REGION_MEMBER"]

REGION_MEMBER = "regions.json"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # as vlext.toyworld._output.save_png
    return buffer.getvalue()


def write_clip_shards(
    root,
    n: int,
    shards: int = 4,
    seed: int = 0,
    image_size: int = 64,
    split: str = "train",
    lang: str = "en",
    max_objects: int = 3,
) -> list[Path]:
    """Write ``n`` toy samples into ``shards`` tar files under ``root/<split>``; returns their paths."""
    root = check_root(root)
    check_count("shards", shards, minimum=1)
    if shards > n:
        raise ValueError(f"shards ({shards}) must not exceed n ({n}): every shard holds at least one sample")
    folder = root.resolve() / split
    samples = clip_samples(n, seed, image_size, split, lang, max_objects)
    paths, sizes = [], {}
    for k in range(shards):
        count = n // shards + (k < n % shards)
        path = folder / f"{k:06d}.tar"
        folder.mkdir(parents=True, exist_ok=True)
        chunk = [next(samples) for _ in range(count)]

        def write_shard(f, chunk=chunk) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i, image, caption, regions in chunk:
                    key = f"{i:06d}"
                    _add(tar, f"{key}.png", _png(image))
                    _add(tar, f"{key}.txt", caption.encode("utf-8"))
                    _add(
                        tar,
                        f"{key}.{REGION_MEMBER}",
                        json.dumps({"regions": regions}, ensure_ascii=False).encode(),
                    )

        atomic_write(path, write_shard)
        paths.append(path)
        sizes[path.name] = count
    atomic_write_text(folder / "sizes.json", json.dumps(sizes, indent=2) + "\n")
    return paths


def brace_pattern(paths: list[Path]) -> str:
    """``DIR/{000000..000003}.tar``, the --train-data value naming ``paths`` (braceexpand syntax)."""
    if len(paths) == 1:
        return str(paths[0])
    return str(paths[0].parent / f"{{{paths[0].stem}..{paths[-1].stem}}}.tar")
