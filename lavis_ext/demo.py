"""Demo: the tiny SPRC model trained by LAVIS's own runner on toy CIRR, gated fusion off vs on.

Both runs use ``lavis_ext/projects/cirr_tiny.yaml`` through :func:`lavis_ext.train.main` (the same path as
``python -m lavis_ext.train``), with the same seed and data; only ``model.use_gated_fusion`` differs. The
table compares validation recall with what a random ranking scores, computed exactly from the gallery
and image-set sizes (not sampled): CIRR removes the reference, so a random rank finds the target in the
top K with probability K / (N - 1); within an image set of m members it is K / (m - 1).

Sizes: 1280 training triplets, 15 epochs of 40 steps at batch 32 (600 steps at the project's init_lr 1e-3),
120 validation queries over a 360-image gallery. The tiny model sits at chance for its first 100-200 steps
(the contrastive loss at ln 32) before it finds the image signal; fewer steps show nothing. ``quick=True``
runs the same path on 256 triplets for one epoch (a test of the command line, not of learning).

The retrieval panel (``retrieval_panel.png``) shows, for 6 validation queries, the reference image, the
caption and the top-5 gallery images of the fusion model's best checkpoint, ranked the CIRR way (the
reference removed), with the true target framed.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from vlext.atomic_files import atomic_save_figure, atomic_write_json

__all__ = ["main", "random_baseline", "run"]

_PROJECT = Path(__file__).resolve().parent / "projects" / "cirr_tiny.yaml"
_COLUMNS = [
    ("R@1", "recall_at_1"),
    ("R@5", "recall_at_5"),
    ("R@10", "recall_at_10"),
    ("R@50", "recall_at_50"),
    ("Rs@1", "recall_subset_at_1"),
    ("Rs@2", "recall_subset_at_2"),
    ("Rs@3", "recall_subset_at_3"),
    ("Avg", "r_mean"),
]


def random_baseline(root: Path, split: str = "val") -> dict[str, float]:
    """Expected CIRR recall (percent) of a uniformly random ranking on ``split`` of the data at ``root``."""
    from lavis_ext.datasets.cir_datasets import read_cirr

    triplets, paths = read_cirr(root, split)
    candidates = len(paths) - 1
    metrics = {}
    for k in (1, 5, 10, 50):
        metrics[f"recall_at_{k}"] = 100.0 * min(k, candidates) / candidates
    for k in (1, 2, 3):
        metrics[f"recall_subset_at_{k}"] = (
            100.0
            * sum(min(k, len(t["members"]) - 1) / (len(t["members"]) - 1) for t in triplets)
            / len(triplets)
        )
    metrics["r_mean"] = (metrics["recall_at_5"] + metrics["recall_subset_at_1"]) / 2
    return metrics


def _train(data: Path, out: Path, fusion: bool, epochs: int, batch_size: int, seed: int = 42):
    from lavis_ext.train import main

    # absolute paths: LAVIS 1.0.2's runner joined a relative run.output_dir onto its own package folder
    runner = main(
        [
            "--cfg-path",
            str(_PROJECT),
            "--options",
            f"datasets.cirr.build_info.root={Path(data).resolve()}",
            f"run.output_dir={Path(out).resolve()}",
            f"run.max_epoch={epochs}",
            f"run.batch_size_train={batch_size}",
            f"model.use_gated_fusion={fusion}",
            f"run.seed={seed}",
        ]
    )
    job = Path(runner.output_dir)
    rows = [json.loads(line) for line in (job / "evaluate.txt").read_text().splitlines()]
    return max(rows, key=lambda row: row["agg_metrics"]), runner  # LAVIS's best epoch on val


def retrieval_examples(runner, n_queries: int = 6, top_k: int = 5) -> list[dict]:
    """Top-k gallery images of ``n_queries`` val queries spread over the split, from the best checkpoint.

    Ranked as the task ranks them: every gallery image scored by ``model.inference``, the reference
    image itself removed (CIRR's rule). Each entry names the reference, caption, target, the top-k
    names and the target's rank (1-based) in the full ranking.
    """
    import torch

    with torch.no_grad():
        return _retrieval_examples(runner, n_queries, top_k)


def _retrieval_examples(runner, n_queries: int, top_k: int) -> list[dict]:
    import torch

    from lavis_ext.models.checkpoint_io import read_state_dict

    model = runner.unwrap_dist_model(runner.model)
    best = Path(runner.output_dir) / "checkpoint_best.pth"
    if best.is_file():  # absent only when recall never rose above 0; then the last weights are shown
        model.load_state_dict(read_state_dict(best)[0], strict=False)
    model.eval()
    dataset = runner.datasets["val"]  # LAVIS's runner regroups its datasets by split while it trains
    gallery = torch.stack([dataset.gallery[i]["image"] for i in range(len(dataset.gallery))])
    target_feats = model.extract_target_features(gallery)
    examples = []
    step = max(1, len(dataset) // n_queries)  # toy CIRR asks several queries per reference: spread them
    for index in range(0, step * min(n_queries, len(dataset)), step):
        sample, row = dataset[index], dataset.triplets[index]
        reference = model.extract_reference_features(sample["image"][None])
        scores = model.inference(reference, target_feats, [sample["text_input"]])[0].float()
        scores[dataset.gallery_index[row["reference"]]] = float("-inf")
        order = torch.argsort(scores, descending=True).tolist()
        target = dataset.gallery_index[row["target"]]
        examples.append(
            {
                "reference": row["reference"],
                "caption": row["caption"],
                "target": row["target"],
                "top": [dataset.gallery.names[i] for i in order[:top_k]],
                "target_rank": order.index(target) + 1,
                "paths": {name: str(dataset.paths[name]) for name in {row["reference"], row["target"],
                          *(dataset.gallery.names[i] for i in order[:top_k])}},
            }
        )  # fmt: skip
    return examples


def draw_retrieval_panel(examples: list[dict], path: Path, title: str) -> None:
    """One row per query: reference | caption | top-k gallery images, the true target framed in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlext.images import load_image

    top_k = len(examples[0]["top"])
    fig, axes = plt.subplots(
        len(examples), top_k + 2, figsize=(1.5 * (top_k + 2) + 1.5, 1.6 * len(examples)), squeeze=False,
        gridspec_kw={"width_ratios": [1, 1.6] + [1] * top_k},
    )  # fmt: skip
    for r, ex in enumerate(examples):
        row = axes[r]
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].imshow(load_image(ex["paths"][ex["reference"]]))
        row[0].set_ylabel(f"query {r + 1}", fontsize=8)
        row[1].axis("off")
        row[1].text(
            0.0, 0.5, textwrap.fill(ex["caption"], 28) + f"\n(target rank {ex['target_rank']})",
            fontsize=7, va="center", ha="left", transform=row[1].transAxes,
        )  # fmt: skip
        for k, name in enumerate(ex["top"]):
            ax = row[k + 2]
            ax.imshow(load_image(ex["paths"][name]))
            hit = name == ex["target"]
            for spine in ax.spines.values():
                spine.set_edgecolor("limegreen" if hit else "lightgray")
                spine.set_linewidth(4 if hit else 1)
            if r == 0:
                ax.set_title(f"top {k + 1}", fontsize=8)
        if r == 0:
            row[0].set_title("reference", fontsize=8)
            row[1].set_title("caption", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)


SEED = 42  # cirr_tiny.yaml's run.seed
QUICK = {"n_train": 256, "n_val": 30, "epochs": 1, "batch_size": 32}


def run(
    out_dir: Path,
    n_train: int = 1280,
    n_val: int = 120,
    epochs: int = 15,
    batch_size: int = 32,
    quick: bool = False,
    seed: int = SEED,
) -> dict:
    """Train without and with gated fusion, print the recall table next to the random baseline.

    ``seed`` is LAVIS's ``run.seed`` (weights, batch order, dropout) for both runs; the toy data stays
    seed 0's (``python -m vlext.seeds --part lavis_ext`` varies it to show the spread of the comparison).
    """
    from vlext.toyworld import write_cirr

    if quick:
        n_train, n_val, epochs, batch_size = (QUICK[k] for k in ("n_train", "n_val", "epochs", "batch_size"))
    out_dir = Path(out_dir)
    data = write_cirr(out_dir / "cirr_dataset", n_train, n_val, 6, seed=0, image_size=32)
    results = {"random": random_baseline(data)}
    runners = {}
    for name, fusion in (("sprc", False), ("sprc+gated_fusion", True)):
        print(f"lavis_ext: training {name} ({epochs} epochs of {n_train // batch_size} steps)", flush=True)
        results[name], runners[name] = _train(data, out_dir / name, fusion, epochs, batch_size, seed)
    header = f"{'toy CIRR val (%)':<20}" + "".join(f"{label:>7}" for label, _ in _COLUMNS)
    lines = [header] + [
        f"{name:<20}" + "".join(f"{results[name][key]:7.1f}" for _, key in _COLUMNS) for name in results
    ]
    print("\n".join(lines))
    examples = retrieval_examples(runners["sprc+gated_fusion"])
    draw_retrieval_panel(
        examples,
        out_dir / "retrieval_panel.png",
        "sprc + gated fusion, best checkpoint: top 5 of the val gallery",
    )
    for ex in examples:
        del ex["paths"]
    table = {name: {key: round(results[name][key], 1) for _, key in _COLUMNS} for name in results}
    summary = {
        "table": lines,
        "results": table,
        "retrieval_examples": examples,
        "setup": {
            "n_train": n_train,
            "n_val": n_val,
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
        },
        "tables": [
            {
                "title": f"lavis_ext: toy CIRR val recall (%), {n_val} queries, LAVIS's best epoch of {epochs}",
                "columns": ["run", *(label for label, _ in _COLUMNS)],
                "rows": [[name, *(table[name][key] for _, key in _COLUMNS)] for name in table],
            }
        ],
        "figures": [
            {
                "file": "retrieval_panel.png",
                "caption": "composed retrieval: reference, caption, top-5 gallery images (true target framed green)",
            }
        ],
    }
    atomic_write_json(out_dir / "lavis_ext_demo.json", summary, indent=2)
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m lavis_ext.demo [--out DIR] [--quick] [--seed S]``; torch and the host library load only once it runs."""
    from vlext.demo import extension_demo_command

    extension_demo_command("lavis_ext", run, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
