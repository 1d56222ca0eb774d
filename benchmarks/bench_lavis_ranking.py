"""Ranking a composed-image-retrieval gallery: lavis_ext's chunked rank counting against SPRC's ranking.

Three ways to get each query's target rank from cached target query features (N, Q, D) and composed query
features (B, D), all scoring with the model's max-over-queries cosine similarity:

- ``chunked``: what ``composed_image_retrieval`` evaluation does: score a chunk of queries against the
  whole gallery, count the items scored above the target (:func:`lavis_ext.tasks.recall.target_ranks`);
  no sort, memory chunk x N;
- ``argsort``: SPRC's ``validate_blip.py``: the full B x N similarity, one argsort of it, then the target's
  position in each sorted row (SPRC then also builds a B x N array of image names; left out here, so this
  baseline is a lower bound on SPRC's cost);
- ``loop``: the naive loop, one query at a time: score, argsort the row, find the target.

Scoring makes a (queries x N x Q) temporary before the max over Q; ``chunked`` scores ``--chunk`` queries
by ``--gallery-chunk`` gallery items at a time (the task's ``rank_chunk`` / ``rank_gallery_chunk``), so its
temporary is 1024 x 2048 x 32 x 4 bytes = 256 MB plus the 1024 x N score rows, instead of 13 GB for 1024
queries over a 100k gallery; ``argsort`` and ``loop`` score unchunked (skip argsort at the issue's size:
``--methods chunked,loop``).

Against the machine: the ``chunked`` process also times plain ``torch.matmul`` over the same blocks
(query chunk x D times D x gallery-chunk*Q, results discarded), the GEMM work ranking cannot avoid, and
prints both rates in GFLOP/s (2 x B x N x Q x D flops) and their ratio (goal: ranking within 1.5x of GEMM).

Each method runs in its own forked process so that its peak memory (resident high-water mark, reset after the
features are made) is its own. All three must return the same ranks (a swap of two near-equal scores, which different matmul shapes
round differently, is counted and printed) or the script fails. The issue's size
is 100k gallery x 4k queries (``--gallery 100000 --queries 4000``, about 3.3 GB of fp32 gallery and 6.7
TFLOP of scoring); the default is scaled down so that it runs in about a minute on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import re
import time

# torch and the libraries under test load in the functions that use them: `--help` answers at once.

METHODS = ("chunked", "argsort", "loop")


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--gallery", type=int, default=4000, help="gallery images N (issue: 100000)")
    parser.add_argument("--queries", type=int, default=2000, help="queries B (issue: 4000)")
    parser.add_argument("--num-query-token", type=int, default=32, help="target query features per image Q")
    parser.add_argument("--embed-dim", type=int, default=256, help="feature width D")
    parser.add_argument(
        "--loop-queries", type=int, default=50, help="queries timed for the loop (it is slow)"
    )
    parser.add_argument(
        "--chunk", type=int, default=0, help="queries per chunk (default: the task's rank_chunk)"
    )
    parser.add_argument(
        "--gallery-chunk",
        type=int,
        default=0,
        help="gallery items per chunk (default: the task's rank_gallery_chunk)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of chunked,argsort,loop (argsort needs B x N x Q x 4 bytes: skip it at 100k x 4k)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    for name in ("chunk", "gallery_chunk"):
        if getattr(args, name) < 0:
            parser.error(
                f"--{name.replace('_', '-')} must be >= 0 (0 = the task's default), got {getattr(args, name)}"
            )
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or "chunked" not in args.methods:
        parser.error(f"--methods must include chunked and name only {', '.join(METHODS)}; got {args.methods}")
    for name in ("gallery", "queries", "num_query_token", "embed_dim", "loop_queries", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def _features(args):
    import torch

    generator = torch.Generator().manual_seed(0)
    gallery = torch.randn(args.gallery, args.num_query_token, args.embed_dim, generator=generator)
    gallery = torch.nn.functional.normalize(gallery, dim=-1)
    queries = torch.nn.functional.normalize(
        torch.randn(args.queries, args.embed_dim, generator=generator), dim=-1
    )
    target = torch.randint(args.gallery, (args.queries,), generator=generator)
    return gallery, queries, target


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))


def _measure(args, method: str) -> dict:
    import torch

    from lavis_ext.models import Blip2QformerCirAlignPrompt
    from lavis_ext.tasks import ComposedImageRetrievalTask
    from lavis_ext.tasks.recall import target_ranks

    similarity = Blip2QformerCirAlignPrompt.similarity
    gallery, queries, target = _features(args)
    if method == "loop":
        queries, target = queries[: args.loop_queries], target[: args.loop_queries]
    with open("/proc/self/clear_refs", "w") as refs:  # reset the high-water mark to the current RSS
        refs.write("5")
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    if method == "chunked":
        task = ComposedImageRetrievalTask()
        chunk = args.chunk or task.rank_chunk
        gallery_chunk = args.gallery_chunk or task.rank_gallery_chunk
        parts = [
            target_ranks(
                similarity(queries[i : i + chunk], gallery, gallery_chunk=gallery_chunk),
                target[i : i + chunk],
            )
            for i in range(0, len(queries), chunk)
        ]
        ranks = torch.cat(parts)
        seconds = time.perf_counter() - start
        flat = gallery.reshape(-1, gallery.size(-1))
        width = gallery.size(1)
        gemm_start = time.perf_counter()
        for i in range(0, len(queries), chunk):
            for j in range(0, len(gallery), gallery_chunk):
                torch.matmul(queries[i : i + chunk], flat[j * width : (j + gallery_chunk) * width].T)
        gemm_seconds = time.perf_counter() - gemm_start
        return {
            "seconds": seconds,
            "gemm_seconds": gemm_seconds,
            "queries": len(queries),
            "extra_peak_mb": (_rss_kb("VmHWM") - before) / 1024,
            "ranks": ranks.tolist(),
        }
    elif method == "argsort":
        order = similarity(queries, gallery).argsort(dim=1, descending=True)
        ranks = (order == target[:, None]).nonzero()[:, 1]
    else:
        ranks = torch.empty(len(queries), dtype=torch.long)
        for i in range(len(queries)):
            row = torch.einsum("d,nqd->nq", queries[i], gallery).amax(-1)  # the plain formula, no padding
            ranks[i] = (row.argsort(descending=True) == target[i]).nonzero()[0, 0]
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "queries": len(queries),
        "extra_peak_mb": (_rss_kb("VmHWM") - before) / 1024,
        "ranks": ranks.tolist(),
    }


def _run_child(args, method: str, sender) -> None:
    sender.send(_measure(args, method))
    sender.close()


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    gallery_mb = args.gallery * args.num_query_token * args.embed_dim * 4 / 2**20
    print(
        f"gallery {args.gallery} x {args.num_query_token} x {args.embed_dim} fp32 ({gallery_mb:.0f} MB), "
        f"{args.queries} queries ({args.loop_queries} for the loop), {args.threads} threads"
    )
    import multiprocessing

    import lavis_ext  # noqa: F401  (imported once; each forked child inherits it)

    context = multiprocessing.get_context("fork")
    results = {}
    for method in args.methods:
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_run_child, args=(args, method, sender))
        child.start()
        results[method] = receiver.recv()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"{method} failed with exit code {child.exitcode}")
    near_ties = {}
    for method in [m for m in args.methods if m != "chunked"]:
        reference = results["chunked"]["ranks"][: results[method]["queries"]]
        differences = [abs(a - b) for a, b in zip(reference, results[method]["ranks"])]
        # Different matmul shapes round differently, so two near-equal scores may swap: allowed, counted.
        if max(differences) > 1:
            raise SystemExit(f"{method} disagrees with chunked by up to {max(differences)} ranks")
        near_ties[method] = sum(d > 0 for d in differences)
    print(f"{'method':<8} {'queries':>8} {'s / 1k queries':>15} {'extra peak MB':>14}")
    per_k = {m: 1000 * r["seconds"] / r["queries"] for m, r in results.items()}
    for method, result in results.items():
        print(f"{method:<8} {result['queries']:>8} {per_k[method]:>15.3f} {result['extra_peak_mb']:>14.1f}")
    gflop = 2 * args.queries * args.gallery * args.num_query_token * args.embed_dim / 1e9
    chunked_rate = gflop / results["chunked"]["seconds"]
    gemm_rate = gflop / results["chunked"]["gemm_seconds"]
    print(
        f"chunked ranking {chunked_rate:.1f} GFLOP/s, plain torch.matmul on the same blocks {gemm_rate:.1f} "
        f"GFLOP/s: GEMM/ranking ratio {gemm_rate / chunked_rate:.2f} (goal <= 1.5)"
    )
    chunked_mb = max(results["chunked"]["extra_peak_mb"], 1e-3)
    for method in near_ties:
        print(
            f"{method}/chunked: time ratio {per_k[method] / per_k['chunked']:.2f}, peak-memory ratio "
            f"{results[method]['extra_peak_mb'] / chunked_mb:.2f}, ranks agree (off by one at "
            f"{near_ties[method]} near-ties)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
