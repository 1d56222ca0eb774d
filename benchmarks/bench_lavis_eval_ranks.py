"""Evaluation ranking on 2 processes against 1: each rank ranks its share of the queries.

``composed_image_retrieval`` evaluation used to score the whole query x gallery x Q block on every rank
(identically, on the CPU); now each rank ranks every world_size-th query where the features are and the
ranks are gathered. This times :meth:`ComposedImageRetrievalTask._rank` (the code the evaluation runs) on
synthetic CIRR-shaped features, once in one process and once in 2 forked gloo processes, one thread each (as
torchrun gives each rank), and prints the ratio; the 2-process ranks must equal the 1-process ones or the
script fails. A rank's time is from a barrier before ranking to the end of the gather, as wall time and as the
process's CPU time (on a shared machine the CPU time is the steadier figure).

    python -m benchmarks.bench_lavis_eval_ranks [--gallery 4000 --queries 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--gallery", type=int, default=4000, help="gallery images N")
    parser.add_argument("--queries", type=int, default=1000, help="queries B")
    parser.add_argument("--num-query-token", type=int, default=32, help="target query features per image Q")
    parser.add_argument("--embed-dim", type=int, default=256, help="feature width D")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (the best is kept)")
    args = parser.parse_args(argv)
    for name in ("gallery", "queries", "num_query_token", "embed_dim", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.gallery < 7:
        parser.error("--gallery must be at least 7 (CIRR image sets of 6 plus one)")
    return args


def _problem(args):
    """Synthetic CIRR: features, and a dataset object with what ``_rank`` reads (image sets of 6)."""
    import torch

    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(
        torch.randn(args.gallery, args.num_query_token, args.embed_dim, generator=g), dim=-1
    )
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.embed_dim, generator=g), dim=-1)
    names = [f"img{i}" for i in range(args.gallery)]
    triplets = []
    for q in range(args.queries):
        start = int(torch.randint(args.gallery - 6, (1,), generator=g))
        members = names[start : start + 6]
        triplets.append({"reference": members[0], "target": members[1 + q % 5], "members": members})
    dataset = SimpleNamespace(
        kind="cirr",
        triplets=triplets,
        gallery=names,
        gallery_index={n: i for i, n in enumerate(names)},
        has_targets=True,
        galleries=None,
    )
    return queries, gallery, dataset


def _time(args):
    import torch

    # lavis_ext first: its compat layer must patch transformers before LAVIS imports
    from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt
    from lavis_ext.tasks.composed_image_retrieval import ComposedImageRetrievalTask

    queries, gallery, dataset = _problem(args)
    task = ComposedImageRetrievalTask()
    best, cpu, result = float("inf"), float("inf"), None
    for _ in range(args.repeats):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = task._rank(Blip2QformerCirAlignPrompt, dataset, queries, gallery)
        best = min(best, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return best, cpu, result


def _worker(rank, world, store, out_dir, args):
    import torch

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        seconds, cpu, result = _time(args)
        torch.save(
            {"seconds": seconds, "cpu": cpu, "ranks": result["ranks"], "subset": result["ranks_subset"]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def main(argv=None) -> dict:
    args = _parse(argv)
    import torch

    torch.set_num_threads(1)
    one, one_cpu, single = _time(args)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            _worker, args=(2, os.path.join(tmp, "store"), tmp, args), nprocs=2, start_method="fork"
        )
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    two = max(r["seconds"] for r in ranks)
    two_cpu = max(r["cpu"] for r in ranks)
    for r in ranks:
        if not (
            torch.equal(r["ranks"], single["ranks"]) and torch.equal(r["subset"], single["ranks_subset"])
        ):
            raise SystemExit("2-process ranks differ from the 1-process ranks")
    print(
        f"ranking {args.queries} queries over {args.gallery} x {args.num_query_token} x {args.embed_dim}, one "
        f"thread per process: 1 process {one:.3f} s wall / {one_cpu:.3f} s CPU; 2 processes (slowest rank, "
        f"gather included) {two:.3f} s wall / {two_cpu:.3f} s CPU. 2-process / 1-process: wall {two / one:.2f}, "
        f"CPU per rank {two_cpu / one_cpu:.2f} (every rank ranked everything before: 1.00 at best); ranks equal"
    )
    return {"one": one, "two": two, "ratio": two / one, "cpu_ratio": two_cpu / one_cpu}


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
