"""Look at what the model retrieves: one PNG per query.

    python -m lavis_ext.visualize --cfg-path lavis_ext/projects/cirr_tiny.yaml --out viz [--n 6 --topk 5]

Each figure shows the reference image with the caption, the top-k gallery images with their scores under
them and the true target framed in green, and, when the model fuses text into the image (gated fusion on), the
per-token fusion gate as a heatmap over the reference image: where the caption is let into the image tokens.
``rankings.json`` beside the PNGs holds the same data (names, scores, target rank) for scripts.

``--out`` is written as one folder: the figures go to a hidden staging folder beside it, which replaces
``--out`` only once every PNG and ``rankings.json`` is written (``visualize_complete.json`` last), so a re-run
never leaves the previous run's panels mixed in with its own, and a crash leaves the previous folder whole. A
folder already holding files is refused unless ``--overwrite``.

The model and data come from a LAVIS project YAML as for training (``--options`` overrides keys; set
``model.finetuned=<checkpoint>`` or ``run.resume_ckpt_path=<checkpoint>`` (or ``latest``) to say which trained
weights to look at; randomly initialised weights are refused, as ``run.evaluate=True`` refuses them). Recalls
are not computed here; ``lavis_ext.train`` with ``run.evaluate=True`` does that.
"""

from __future__ import annotations

import argparse

__all__ = ["main", "render_query"]

TARGET_FRAME = "#00b000"
COMPLETE = "visualize_complete.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_ext.visualize",
        description="Write one PNG per composed-retrieval query: reference + caption, top-k with scores, target "
        "framed, and the gated-fusion gate map when fusion is on.",
        allow_abbrev=False,
    )
    parser.add_argument("--cfg-path", required=True, help="LAVIS project YAML (model, dataset, run)")
    parser.add_argument("--out", required=True, help="folder for the PNGs and rankings.json (created)")
    parser.add_argument("--n", type=int, default=6, help="number of queries, from the first (default 6)")
    parser.add_argument("--topk", type=int, default=5, help="gallery images shown per query (default 5)")
    parser.add_argument(
        "--split",
        default="val",
        help="evaluation split with targets to rank (default val; train has no gallery, CIRR's test hides "
        "its targets)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out folder that already holds files (once the new figures are all written)",
    )
    parser.add_argument(
        "--options", nargs="+", default=[], help="key=value overrides, as for lavis_ext.train"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="rank with the randomly initialised model (to check the figures); without it, a config that "
        "names no weights (model.finetuned / run.resume_ckpt_path) is refused",
    )
    args = parser.parse_args(argv)
    for name in ("n", "topk"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    return args


def _gate_grid(gate):
    """Patch tokens of a (T,) gate as a square grid; the first token is [CLS]."""
    import math

    patches = gate[1:]
    side = math.isqrt(patches.numel())
    if side * side != patches.numel():
        raise ValueError(f"cannot lay {patches.numel()} patch tokens out as a square grid")
    return patches.reshape(side, side)


def render_query(record: dict, paths: dict, out_file, gate=None):
    """Draw one query (see the module docstring) to ``out_file``; returns the matplotlib figure (closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlext.images import load_image

    columns = 1 + len(record["topk"]) + (gate is not None)
    fig, axes = plt.subplots(1, columns, figsize=(2.2 * columns, 2.9), squeeze=False)
    axes = axes[0]
    reference = load_image(paths[record["reference"]])
    axes[0].imshow(reference)
    axes[0].set_title("reference", fontsize=9)
    for rank, (name, score) in enumerate(zip(record["topk"], record["scores"]), start=1):
        ax = axes[rank]
        ax.imshow(load_image(paths[name]))
        ax.set_title(f"#{rank}", fontsize=9)
        ax.set_xlabel(f"{score:.3f}", fontsize=9)
        if name == record["target"]:
            for spine in ax.spines.values():
                spine.set_edgecolor(TARGET_FRAME)
                spine.set_linewidth(5)
    if gate is not None:
        ax = axes[-1]
        ax.imshow(reference)
        width, height = reference.size
        heat = ax.imshow(_gate_grid(gate).numpy(), cmap="inferno", alpha=0.6, extent=(0, width, height, 0))
        ax.set_title("fusion gate", fontsize=9)
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    rank = record["target_rank"]
    found = f"target at rank {rank}" if rank is not None else "no target"
    fig.suptitle(f"{record['caption']}  ({found})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_file, dpi=80)
    plt.close(fig)
    return fig


def _build(args):
    """Config, model and the evaluation dataset, exactly as ``lavis_ext.train`` builds them."""
    from pathlib import Path

    from lavis_ext import compat

    compat.apply()
    import lavis_ext.datasets  # noqa: F401
    import lavis_ext.models  # noqa: F401
    import lavis_ext.processors  # noqa: F401
    import lavis_ext.tasks  # noqa: F401
    from lavis_ext import config_check

    user_cfg = config_check.load_user_config(args.cfg_path, args.options)
    config_check.check_keys(user_cfg)
    import lavis.tasks as tasks
    from lavis.common.config import Config

    cfg = Config(args)
    config_check.resolve_paths(cfg.config, user_cfg, Path.cwd())
    # The rankings are only worth looking at for trained weights: refuse the random init, as evaluation does.
    cfg.config.run.evaluate = True
    try:
        weights = config_check.check_evaluation(cfg.config, user_cfg)
    except config_check.ConfigError as error:
        if not args.random_weights:
            raise config_check.ConfigError(
                str(error).replace("run.evaluate=True would evaluate", "visualize would rank with")
                + " (or pass --random-weights to look at the untrained model on purpose)"
            ) from None
        weights = "--random-weights: ranking with the randomly initialised model"
    print(f"visualize: {weights}")
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    (name,) = datasets.keys() if len(datasets) == 1 else (None,)
    if name is None:
        raise ValueError(f"--cfg-path names {len(datasets)} datasets; visualize needs exactly one")
    _check_split(args.split, name, datasets[name])
    dataset = datasets[name][args.split]
    model = task.build_model(cfg)
    if cfg.run_cfg.get("resume_ckpt_path"):
        _load_checkpoint(model, cfg.run_cfg.resume_ckpt_path, cfg.run_cfg.output_dir)
    return model.eval(), dataset


def _check_split(split: str, name: str, built: dict) -> None:
    """``--split`` must be a built evaluation split with targets; say which are, and why this one is not."""
    accepted = sorted(s for s, d in built.items() if hasattr(d, "gallery") and d.has_targets)
    hint = (
        f"accepted: {accepted} (evaluation splits with targets built from the config's "
        f"datasets.{name}.build_info.splits)"
    )
    if split not in built:
        raise ValueError(f"--split {split!r}: dataset {name} built no such split; {hint}")
    if not hasattr(built[split], "gallery"):
        raise ValueError(
            f"--split {split!r} is a training split of {name}: triplets with no gallery to rank them against; "
            f"{hint}"
        )
    if not built[split].has_targets:
        raise ValueError(
            f"--split {split!r} of {name} has no targets (CIRR's test1 hides them), so no target can be "
            f"framed or ranked; {hint}"
        )


def _check_out(out, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; it must be a folder (created if missing)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = sorted(p.name for p in out.iterdir())
        raise FileExistsError(
            f"--out {out} already holds {len(held)} file(s) ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
            "give a new folder, or --overwrite to replace it once the new figures are written"
        )


def _load_checkpoint(model, path: str, output_dir: str) -> None:
    """``run.resume_ckpt_path`` (a file, or ``latest`` under ``run.output_dir``) as ``lavis_ext.train`` reads
    it for evaluation: it used to be accepted and ignored, ranking with other weights than the ones named."""
    from lavis_ext.models.checkpoint_io import read_state_dict
    from lavis_ext.runner import find_latest_checkpoint

    if path == "latest":
        path, state_dict, meta = find_latest_checkpoint(output_dir)
    else:
        state_dict, meta = read_state_dict(path)
    result = model.load_state_dict(state_dict, strict=False)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} does not fit the model: missing trainable {missing[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    print(f"visualize: weights of checkpoint {path} (epoch {meta.get('epoch', '?')})")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import json
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if not Path(args.cfg_path).is_file():
        raise FileNotFoundError(f"--cfg-path {args.cfg_path!r} is not a file")
    from vlext.atomic_files import atomic_write_text, publish_folder, staging_folder

    out = Path(args.out)
    _check_out(out, args.overwrite)
    model, dataset = _build(args)
    _check_out(out, args.overwrite)  # again: another run may have filled it while the model was built
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out)
    n = min(args.n, len(dataset))
    topk = min(args.topk, len(dataset.gallery) - (dataset.kind == "cirr"))

    with torch.no_grad():
        gallery = torch.cat(
            [
                model.extract_target_features(batch["image"])
                for batch in tqdm(DataLoader(dataset.gallery, batch_size=32), desc="gallery", unit="batch")
            ]
        )
        samples = [dataset[i] for i in range(n)]
        reference = model.extract_reference_features(torch.stack([s["image"] for s in samples]))
        texts = [s["text_input"] for s in samples]
        scores = model.similarity(model.extract_composed_features(reference, texts), gallery)
        gates = model.fusion_gate_map(reference, texts)

    names, position = dataset.gallery.names, dataset.gallery_index
    records = []
    for q in tqdm(range(n), desc="queries", unit="png"):
        row = dataset.triplets[q]
        row_scores = scores[q].clone()
        if dataset.kind == "cirr":  # CIRR never counts the reference itself as a candidate
            row_scores[position[row["reference"]]] = float("-inf")
        order = row_scores.argsort(descending=True, stable=True)
        target_rank = int((order == position[row["target"]]).nonzero()) + 1
        top = order[:topk]
        record = {
            "query": q,
            "reference": row["reference"],
            "caption": texts[q],
            "target": row["target"],
            "target_rank": target_rank,
            "topk": [names[i] for i in top],
            "scores": [float(row_scores[i]) for i in top],
            "png": f"query_{q:04d}.png",
        }
        gate = None if gates is None else gates[q].float().cpu()
        if gate is not None:
            record["gate_grid"] = _gate_grid(gate).tolist()
        render_query(record, dataset.paths, staging / record["png"], gate)
        records.append(record)
    atomic_write_text(staging / "rankings.json", json.dumps(records, indent=1))
    publish_folder(staging, out, marker={"queries": n, "split": args.split}, marker_name=COMPLETE)
    print(f"wrote {n} PNGs and rankings.json to {out}")
    return records


if __name__ == "__main__":
    main()
