"""The adapter trainer's input pipeline: samples/s of its DataLoader with 0 and N workers, next to the rate a
GPU step consumes.

The loader is the trainer's own (``diffusers_ext.training.dataset``: JPEG decode, aspect-preserving resize,
centre crop, flip, boxes recomputed; ``EpochBatchSampler``; ``collate_samples``), reading COCO-sized JPEGs
(640x480, toy-world scenes written by PIL at quality 90). Each loader runs two epochs and the second is
timed, so worker start-up is not counted (the workers are persistent, as in the trainer).

The rate it must feed is derived, not measured here (no GPU): the UNet forward FLOPs per sample at the
resolution (SD1.5 at 512 px, SDXL at 1024 px; published configs on the meta device, counted by
``torch.utils.flop_counter``), times 2 for an adapter step (the backward through the frozen UNet computes
activation gradients, not weight gradients: about one more forward), against an assumed GPU:
``--gpu-tflops`` (default 989: H100 SXM dense BF16, NVIDIA's datasheet) at ``--mfu`` (default 0.4, an
assumed model-FLOPs utilisation). Change both for your GPU.

Usage: ``python -m benchmarks.bench_diffusers_input_pipeline [--images 64] [--resolutions 512 1024]
[--workers N] [--batch 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run by path: the repository before fairscale's top-level `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FEED_MODELS = {512: "SD15", 1024: "SDXL"}  # diffusers_ext.testing.published_unets


def write_coco_sized_jpegs(root: Path, n: int) -> Path:
    """``n`` 640x480 JPEGs of toy-world scenes and their grounding rows; returns the JSONL."""
    from vlext.toyworld import ToyWorld

    world = ToyWorld(0, 640, max_objects=3)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(world.scenes(n)):
        name = f"images/{i:06d}.jpg"
        scene.render().crop((0, 80, 640, 560)).save(root / name, quality=90)
        rows.append(
            {"image": name, "caption": "toy scene", "boxes": [[0.1, 0.1, 0.6, 0.7]], "phrases": ["a"]}
        )
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loader_rate(jsonl: Path, resolution: int, workers: int, batch: int) -> float:
    """Samples/s of the second epoch of the trainer's loader."""
    import torch

    from diffusers_ext.layout_rows import CleaningReport, read_grounding_rows
    from diffusers_ext.training.dataset import (
        EpochBatchSampler,
        GroundingCrops,
        collate_samples,
        prepare_rows,
    )

    rows, _ = read_grounding_rows(jsonl, min_area=0.0, min_side=0.0, max_objs=30)
    dataset = GroundingCrops(rows, jsonl.parent, resolution, crop="center", flip=True)
    prepare_rows(dataset, CleaningReport())
    sampler = EpochBatchSampler(len(dataset), batch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    for _ in loader:  # a first epoch starts the (persistent) workers and warms the decoders: not timed
        pass
    sampler.set_epoch(1)
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["caption"])
    return n / (time.perf_counter() - start)


def forward_tflops(name: str) -> float:
    """TFLOPs of one UNet forward for one sample at the config's sample size (meta device, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_ext.testing import published_unets

    config = getattr(published_unets, name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        s = config["sample_size"]
        x, t = torch.zeros(1, 4, s, s), torch.zeros(1)
        text = torch.zeros(1, 77, config["cross_attention_dim"])
        added = None
        if config.get("addition_embed_type") == "text_time":
            added = {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
    return counter.get_total_flops() / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench_diffusers_input_pipeline", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--images", type=int, default=64, help="JPEGs to write and read (one epoch)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="N of the N-worker loader"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="assumed GPU peak (H100 SXM dense BF16)")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation of a training step"
    )
    p.add_argument("--no-feed", action="store_true", help="skip the FLOP count of the rate to feed")
    args = p.parse_args(argv)
    if args.images < 2 * args.batch:
        p.error(f"--images {args.images} must be at least two batches ({2 * args.batch})")

    import torch

    torch.set_num_threads(1)  # the loader's work is what is measured; one intra-op thread, like a worker
    print(f"machine: {os.cpu_count()} CPU cores; {args.images} JPEGs of 640x480, batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_coco_sized_jpegs(Path(tmp), args.images)
        for res in args.resolutions:
            rates = {w: loader_rate(jsonl, res, w, args.batch) for w in (0, args.workers)}
            ratio = rates[args.workers] / rates[0]
            print(
                f"loader {res} px: {rates[0]:.1f} samples/s with 0 workers, "
                f"{rates[args.workers]:.1f} with {args.workers} workers ({ratio:.2f}x)"
            )
            if args.no_feed or res not in FEED_MODELS:
                continue
            name = FEED_MODELS[res]
            tflops = forward_tflops(name)
            need = args.gpu_tflops * args.mfu / (2 * tflops)
            print(
                f"  to feed: {name} UNet forward at {res} px = {tflops:.2f} TFLOP/sample; an adapter step ~ 2 "
                f"forwards; at {args.mfu:.0%} of {args.gpu_tflops:.0f} TFLOP/s a GPU consumes {need:.1f} "
                f"samples/s = {need / rates[args.workers]:.1f}x this {args.workers}-worker loader, "
                f"{need / rates[0]:.1f} cores at the in-process rate of one core"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
