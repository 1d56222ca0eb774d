"""Command line for the toy-world dataset writers: ``python -m vlext.toyworld <format> --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlext.toyworld.cirr import write_cirr
from vlext.toyworld.clip_csv import write_clip_csv
from vlext.toyworld.clip_shards import brace_pattern, write_clip_shards
from vlext.toyworld.fashioniq import write_fashioniq
from vlext.toyworld.grounding import write_grounding_jsonl

__all__ = ["main"]

FORMATS = ("cirr", "fashioniq", "grounding", "clip")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vlext.toyworld",
        description="Write a deterministic toy-world dataset in a host framework's native layout.",
        allow_abbrev=False,
    )
    parser.add_argument("format", choices=FORMATS, help="dataset layout to write")
    parser.add_argument("--out", required=True, type=Path, help="dataset root directory")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="cirr: train triplets (val and test1 get a quarter each, at least 1); fashioniq: triplets "
        "per category and split; grounding, clip: images (default 100, fashioniq 30)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="pixels per image side")
    parser.add_argument(
        "--lang", default="en", choices=("en", "zh"), help="caption language (grounding, clip)"
    )
    parser.add_argument("--split", default="train", help="clip: split name of the CSV (train, val, test)")
    parser.add_argument(
        "--format",
        dest="clip_format",
        default="csv",
        choices=("csv", "webdataset"),
        help="clip: csv = <split>.csv + <split>_regions.jsonl (open_clip --dataset-type csv); webdataset = tar "
        "shards <split>/000000.tar ... with png, txt and regions.json members (--dataset-type webdataset)",
    )
    parser.add_argument(
        "--shards", type=int, default=4, help="clip --format webdataset: number of tar shards"
    )
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.format != "clip" and (args.clip_format != "csv" or args.shards != 4):
        parser.error("--format and --shards apply to the clip dataset only")
    common = {"seed": args.seed, "image_size": args.image_size}
    if args.format == "cirr":
        n = 100 if args.n is None else args.n
        small = max(1, n // 4)
        root = write_cirr(args.out, n_train=n, n_val=small, n_test=small, **common)
        files = sorted((root / "cirr").rglob("*.json"))
        images = sum(1 for _ in root.rglob("*.png"))
        print(f"wrote CIRR layout under {root}: {images} images")
    elif args.format == "fashioniq":
        n = 30 if args.n is None else args.n
        root = write_fashioniq(args.out, n_per_category=n, **common)
        files = sorted(root.rglob("*.json"))
        images = sum(1 for _ in (root / "images").glob("*.png"))
        print(f"wrote FashionIQ layout under {root}: {images} images")
    elif args.format == "grounding":
        n = 100 if args.n is None else args.n
        files = [write_grounding_jsonl(args.out, n, lang=args.lang, **common)]
        print(f"wrote {n} grounding rows ({args.lang}) with images under {args.out / 'images'}")
    elif args.clip_format == "webdataset":
        n = 100 if args.n is None else args.n
        files = write_clip_shards(args.out, n, shards=args.shards, split=args.split, lang=args.lang, **common)
        print(f"wrote {n} image-text pairs ({args.lang}) with regions in {len(files)} webdataset shards; "
              f"--train-data '{brace_pattern(files)}'")  # fmt: skip
    else:
        n = 100 if args.n is None else args.n
        path = write_clip_csv(args.out, n, split=args.split, lang=args.lang, **common)
        files = [path, path.with_name(f"{args.split}_regions.jsonl")]
        print(
            f"wrote {n} image-text pairs ({args.lang}) with images under {path.parent / 'images' / args.split}"
        )
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":  # the `toyworld` console script, or python -m vlext.toyworld(.cli)
    raise SystemExit(main())
