"""``make demo`` part for clip_ext: a tiny CLIP trained on toy-world captions with and without the bank.

Same data, seed, batch (8) and steps for both runs; held-out image-text R@1/R@5 come from open_clip's own
evaluation (``results.jsonl``), loss curves from its log. The bank is expected to help most at small batch.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from vlext.toyworld import write_clip_csv

TRAIN_IMAGES, VAL_IMAGES, EPOCHS, BATCH = 256, 64, 6, 8
LOSS_LINE = re.compile(r"Train Epoch: (\d+) .*Contrastive_loss: ([0-9.]+)")


def _train(out: Path, data: Path, name: str, extra: list[str]) -> dict:
    from clip_ext.train import main

    argv = [
        "--model", "clip-ext-tiny", "--train-data", str(data / "train.csv"), "--val-data", str(data / "val.csv"),
        "--dataset-type", "csv", "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--lr", "1e-3",
        "--warmup", "16", "--wd", "0.1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--seed", "0",
        "--logs", str(out / "logs"), "--name", name, "--log-every-n-steps", "8", "--save-frequency", "0",
        *extra,
    ]  # fmt: skip
    run_dir = out / "logs" / name
    if run_dir.exists():  # open_clip_train refuses to reuse an experiment name; this is the demo's own output
        shutil.rmtree(run_dir)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main(argv)
    finally:  # open_clip_train's setup_logging adds root handlers on every call: undo, or lines double
        for handler in root.handlers[len(handlers) :]:
            handler.close()
        root.handlers[:], root.level = handlers, level
    results = [
        json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()
    ]
    losses = [float(m.group(2)) for m in LOSS_LINE.finditer((run_dir / "out.log").read_text())]
    return {"results": results, "losses": losses}


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, losses in curves.items():
        ax.plot(losses, label=label)
    ax.set_xlabel(f"log step (every 8 optimizer steps, batch {BATCH})")
    ax.set_ylabel("train contrastive loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    data = out_dir / "data"
    write_clip_csv(data, TRAIN_IMAGES, seed=0, split="train")
    write_clip_csv(data, VAL_IMAGES, seed=1, split="val")
    runs = {
        "no bank": _train(out_dir, data, "no_bank", []),
        # K must stay well below the dataset size: a bank holding a whole epoch contains every sample's own
        # earlier embedding, which then acts as a false negative (a first run with K = 512 = the whole toy
        # set collapsed to chance). Real datasets are far larger than K; ids masking is the other remedy.
        # The warmup matters as much: a randomly initialised tower maps every input to nearly the same
        # direction (mean pairwise cosine ~0.97 here), and 64 stale near-copies of the batch as negatives
        # reward moving all embeddings together rather than apart; the third run shows that collapse.
        "bank K=64, warmup 128": _train(
            out_dir, data, "bank", ["--memory-bank-size", "64", "--memory-bank-warmup-steps", "128", "--diag"]
        ),
        "bank K=64, warmup 32": _train(
            out_dir, data, "bank_early", ["--memory-bank-size", "64", "--memory-bank-warmup-steps", "32"]
        ),
    }
    summary = {}
    print(f"\nheld-out retrieval on {VAL_IMAGES} toy images after {EPOCHS} epochs at batch {BATCH}:")
    print(f"{'run':>22} | {'i2t R@1':>7} {'i2t R@5':>7} {'t2i R@1':>7} {'t2i R@5':>7} | final loss")
    for label, result in runs.items():
        final = result["results"][-1]
        row = {k: round(100 * final[f"{k}"], 1) for k in
               ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5")}  # fmt: skip
        row["final_train_loss"] = result["losses"][-1]
        summary[label] = row
        print(
            f"{label:>22} | {row['image_to_text_R@1']:7.1f} {row['image_to_text_R@5']:7.1f} "
            f"{row['text_to_image_R@1']:7.1f} {row['text_to_image_R@5']:7.1f} | {row['final_train_loss']:.3f}"
        )
    print(
        f"{'random':>22} | {100 / VAL_IMAGES:7.1f} {500 / VAL_IMAGES:7.1f} {100 / VAL_IMAGES:7.1f} {500 / VAL_IMAGES:7.1f} |"
    )
    _plot({label: result["losses"] for label, result in runs.items()}, out_dir / "loss_curves.png")
    print(f"loss curves: {out_dir / 'loss_curves.png'}")
    return summary


if __name__ == "__main__":
    import sys

    run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out/clip_ext"))
