"""``make demo`` part for clip_ext: a tiny CLIP trained on toy-world captions with and without the bank.

Same data, seed, batch (8) and steps for both runs; held-out image-text R@1/R@5 come from open_clip's own
evaluation (``results.jsonl``), loss curves from its log. The bank is expected to help most at small batch.
``quick=True`` runs the same three trainings on fewer images for one epoch (the test of the command line).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

from vlext.atomic_files import atomic_save_figure

TRAIN_IMAGES, VAL_IMAGES, EPOCHS, BATCH = 256, 64, 6, 8
QUICK = {"train_images": 32, "val_images": 16, "epochs": 1}
LOSS_LINE = re.compile(r"Train Epoch: (\d+) .*Contrastive_loss: ([0-9.]+)")


def _train(out: Path, data: Path, name: str, extra: list[str], epochs: int, seed: int = 0) -> dict:
    from clip_ext.train import main

    argv = [
        "--model", "clip-ext-tiny", "--train-data", str(data / "train.csv"), "--val-data", str(data / "val.csv"),
        "--dataset-type", "csv", "--batch-size", str(BATCH), "--epochs", str(epochs), "--lr", "1e-3",
        "--warmup", "16", "--wd", "0.1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--seed", str(seed),
        "--logs", str(out / "logs"), "--name", name, "--log-every-n-steps", "8", "--save-frequency", "0",
        *extra,
    ]  # fmt: skip
    run_dir = out / "logs" / name
    if run_dir.exists():  # open_clip_train refuses to reuse an experiment name; this is the demo's own output
        shutil.rmtree(run_dir)
    with _open_clip_logging():
        main(argv)
    results = [
        json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()
    ]
    losses = [float(m.group(2)) for m in LOSS_LINE.finditer((run_dir / "out.log").read_text())]
    return {"results": results, "losses": losses}


@contextlib.contextmanager
def _open_clip_logging():
    """Let open_clip_train own logging for one run, then put everything back.

    open_clip's ``setup_logging`` adds a console handler to the root logger on every call (a handler left
    by an earlier host, e.g. LAVIS's ``basicConfig``, then prints every line a second time) and sets the
    level of *every* logger that exists to INFO, including torch._dynamo's, whose exit hooks then print
    "TorchDynamo compilation metrics" and "attempted to trace" lines when the process ends.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {
        name: lg.level
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    root.handlers[:] = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = handlers, level
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))


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
    atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)


_METRICS = ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5")


SEED = 0


def run(out_dir: Path, quick: bool = False, seed: int = SEED) -> dict:
    """Train the three runs, print and return the held-out recall table; ``quick`` shrinks the data.

    ``seed`` is open_clip_train's ``--seed`` (weights, batch order) for all three runs; the toy data stays
    the same (``python -m vlext.seeds --part clip_ext`` varies it to show the spread of the comparison).
    """
    from vlext.toyworld import write_clip_csv

    sizes = QUICK if quick else {"train_images": TRAIN_IMAGES, "val_images": VAL_IMAGES, "epochs": EPOCHS}
    n_val, epochs = sizes["val_images"], sizes["epochs"]
    out_dir = Path(out_dir)
    data = out_dir / "data"
    write_clip_csv(data, sizes["train_images"], seed=0, split="train")
    write_clip_csv(data, n_val, seed=1, split="val")
    steps = sizes["train_images"] // BATCH * epochs
    warmups = (128, 32) if not quick else (steps // 2, steps // 4)
    runs = {}
    # K must stay well below the dataset size: a bank holding a whole epoch contains every sample's own
    # earlier embedding, which then acts as a false negative (a first run with K = 512 = the whole toy
    # set collapsed to chance). Real datasets are far larger than K; ids masking is the other remedy.
    # The warmup matters as much: a randomly initialised tower maps every input to nearly the same
    # direction (mean pairwise cosine ~0.97 here), and 64 stale near-copies of the batch as negatives
    # reward moving all embeddings together rather than apart; the third run shows that collapse.
    for label, name, extra in (
        ("no bank", "no_bank", []),
        (f"bank K=64, warmup {warmups[0]}", "bank",
         ["--memory-bank-size", "64", "--memory-bank-warmup-steps", str(warmups[0]), "--diag"]),
        (f"bank K=64, warmup {warmups[1]}", "bank_early",
         ["--memory-bank-size", "64", "--memory-bank-warmup-steps", str(warmups[1])]),
    ):  # fmt: skip
        print(f"clip_ext: training '{label}' ({steps} steps at batch {BATCH})", flush=True)
        runs[label] = _train(out_dir, data, name, extra, epochs, seed)
    summary = {}
    print(f"\nheld-out retrieval on {n_val} toy images after {epochs} epochs at batch {BATCH}:")
    print(f"{'run':>22} | {'i2t R@1':>7} {'i2t R@5':>7} {'t2i R@1':>7} {'t2i R@5':>7} | final loss")
    for label, result in runs.items():
        final = result["results"][-1]
        row = {k: round(100 * final[k], 1) for k in _METRICS}
        row["final_train_loss"] = round(result["losses"][-1], 3)
        summary[label] = row
        print(
            f"{label:>22} | {row['image_to_text_R@1']:7.1f} {row['image_to_text_R@5']:7.1f} "
            f"{row['text_to_image_R@1']:7.1f} {row['text_to_image_R@5']:7.1f} | {row['final_train_loss']:.3f}"
        )
    random = {"image_to_text_R@1": 100 / n_val, "image_to_text_R@5": 500 / n_val,
              "text_to_image_R@1": 100 / n_val, "text_to_image_R@5": 500 / n_val}  # fmt: skip
    random = {k: round(v, 1) for k, v in random.items()}
    print(f"{'random':>22} | " + " ".join(f"{random[k]:7.1f}" for k in _METRICS) + " |")
    _plot({label: result["losses"] for label, result in runs.items()}, out_dir / "loss_curves.png")
    print(f"loss curves: {out_dir / 'loss_curves.png'}")
    rows = [[label, *(row[k] for k in _METRICS), row["final_train_loss"]] for label, row in summary.items()]
    rows.append(["random", *(random[k] for k in _METRICS), None])
    return {
        **summary,
        "random": random,
        "setup": {**sizes, "batch": BATCH, "steps": steps, "seed": seed},
        "tables": [
            {
                "title": f"clip_ext: held-out retrieval (%) on {n_val} toy images, {steps} steps at batch {BATCH}",
                "columns": ["run", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5", "final train loss"],
                "rows": rows,
            }
        ],
        "figures": [
            {"file": "loss_curves.png", "caption": "train contrastive loss with and without the bank"}
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m clip_ext.demo [--out DIR] [--quick] [--seed S]``; torch and the host library load only once it runs."""
    from vlext.demo import extension_demo_command

    extension_demo_command("clip_ext", run, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
