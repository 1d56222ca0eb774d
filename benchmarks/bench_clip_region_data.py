"""Loader throughput of the region data against open_clip's own webdataset loader, measured in one run.

The same toy shards (``vlext.toyworld`` CLIP set, with region members) and the same workers, batch and image
transform (the box-aware resize the region loss trains with) for every variant:

- open_clip's ``get_wds_dataset`` loader as it is (the baseline);
- the same loader with clip_ext's region stage attached (``clip_ext.region_shards``: region members parsed,
  checked, filtered and tokenized in the workers, padded per batch, side channel in the main process);
- the same with hard negatives (10 per region) tokenized too;
- beside them the CSV path on the same samples: open_clip's ``CsvDataset`` loader, and clip_ext's
  ``ClipExtCsvDataset`` with the ``--region-data`` table.

Each figure is samples/s over one full epoch, the median of ``--repeats`` epochs run in turn (A, B, C, A, B,
C ...) after one warm-up epoch each (persistent workers: start-up is not counted). Goal: region stage /
plain >= 0.9.

Usage: ``python benchmarks/bench_clip_region_data.py [--n 1024] [--shards 4] [--workers 2] [--batch 32]
[--image-size 224] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # started by path: fairscale's `benchmarks` package must not shadow ours
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_medians  # noqa: E402


def _epoch(loader) -> float:
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch[0])
    return samples / (time.perf_counter() - start)


def _loaders(root: Path, args) -> dict:
    import open_clip
    import torch
    from open_clip_train.data import CsvDataset, get_wds_dataset
    from torch.utils.data import DataLoader

    from clip_ext.region_data import BatchSideChannel, ClipExtCsvDataset, load_region_table
    from clip_ext.region_shards import RegionShardLoader, RegionStage, attach_region_stages
    from clip_ext.train import parse_args
    from vlext.toyworld import write_clip_csv
    from vlext.toyworld.clip_shards import brace_pattern, write_clip_shards

    shards = write_clip_shards(root / "wds", args.n, shards=args.shards, seed=0)
    csv_path = write_clip_csv(root / "csv", args.n, seed=0)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    transform = open_clip.image_transform(args.image_size, is_train=False, resize_mode="squash")
    train = parse_args(["--train-data", brace_pattern(shards), "--dataset-type", "webdataset", "--train-num-samples",
                        str(args.n), "--batch-size", str(args.batch), "--workers", str(args.workers)])  # fmt: skip
    train.world_size, train.rank = 1, 0

    def wds_loader(stage=None):
        loader = get_wds_dataset(train, transform, is_train=True, tokenizer=tokenizer).dataloader
        if stage is None:
            return loader
        attach_region_stages(loader, stage)
        return RegionShardLoader(loader, BatchSideChannel(keep=2), "cpu", torch.float32)

    def csv_loader(dataset):
        return DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                          persistent_workers=args.workers > 0, drop_last=True)  # fmt: skip

    base = CsvDataset(str(csv_path), transform, "filepath", "title", tokenizer=tokenizer)
    table = load_region_table(csv_path.with_name("train_regions.jsonl"), base.images, 0.0, 0.01)
    return {
        "webdataset, open_clip's loader": wds_loader(),
        "webdataset + region stage": wds_loader(RegionStage(tokenizer)),
        "webdataset + region stage + hard negatives": wds_loader(RegionStage(tokenizer, hard_negatives=True)),
        "csv, open_clip's CsvDataset": csv_loader(base),
        "csv + --region-data (ClipExtCsvDataset)": csv_loader(ClipExtCsvDataset(base, transform, table)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_clip_region_data.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)  # fmt: skip
    parser.add_argument("--n", type=int, default=1024, help="toy samples")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="loader workers (each variant)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="side of the transformed image")
    parser.add_argument("--repeats", type=int, default=3, help="measured epochs per variant")
    args = parser.parse_args(argv)
    if args.shards < args.workers:
        parser.error(f"--shards ({args.shards}) must be >= --workers ({args.workers}), as open_clip requires")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_clip_region_data_") as tmp:
        rates = interleaved_medians(_loaders(Path(tmp), args), args.repeats, measure=_epoch)
    print(f"loader samples/s, {args.n} toy samples (64 px PNG -> {args.image_size} px), {args.shards} shards, "
          f"{args.workers} workers, batch {args.batch}, median of {args.repeats} epochs")  # fmt: skip
    plain = rates["webdataset, open_clip's loader"]
    for name, rate in rates.items():
        print(f"  {name:<45} {rate:9.1f} samples/s")
    for name in ("webdataset + region stage", "webdataset + region stage + hard negatives"):
        print(f"{name} / open_clip's loader = {rates[name] / plain:.3f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
