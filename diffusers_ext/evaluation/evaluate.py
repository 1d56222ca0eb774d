"""Layout evaluation of a spatial adapter on real images: ``python -m diffusers_ext.evaluation.evaluate``.

The "oracle" evaluation of the training notes and of GLIGEN (Li et al., CVPR 2023): generate images from
ground-truth layouts (a JSONL in the training format), detect each requested object with an
open-vocabulary detector, compare boxes. The same prompts and seeds are generated without the adapter
(the baseline row) and with it at each ``--gate-scales`` value, so each row differs only by the adapter.
Per setting: mean IoU, the share of objects with IoU > 0.5, the share of detected centres inside their
box, box AP / AP50 (torchmetrics), and when their weights are given, CLIP score (torchmetrics'
``CLIPScore``) and FID against the layouts' real images (torchmetrics' ``FrechetInceptionDistance``).

Every input is checked before the first image is generated: rows (file:line), the detector, the adapter
against the pipeline, the metric weights. Each generated image and its scores are written atomically, so
re-running the same command after a crash skips the finished images and gives the same summary.

Output under ``--out``: ``images/<setting>/<row>_s<seed>.png``, ``records/<setting>/<row>_s<seed>.json``,
``results.jsonl`` (one line per image), ``summary.json`` (``rows``: baseline, then one per gate scale),
``summary.md`` (the table) and ``grid.png`` (requested boxes green, detected boxes red, labelled).
See docs/layout_evaluation.md for a real run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
from pathlib import Path

from vlext.atomic_files import atomic_write_bytes as _atomic_write
from vlext.atomic_files import atomic_write_json

__all__ = ["main", "read_layouts"]

OPTIONAL_KEYS = ("phrases_en",)
GRID_COLUMNS = 8
GRID_TILE = 256
REQUESTED_COLOUR = (0, 200, 0)
DETECTED_COLOUR = (230, 0, 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusers_ext.evaluation.evaluate",
        description="Generate from ground-truth layouts with and without a spatial adapter, detect the "
        "objects and report IoU, box AP, CLIP score and FID per setting (docs/layout_evaluation.md).",
        allow_abbrev=False,
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="JSONL of layouts: image, caption, boxes, phrases "
        "(boxes xyxy in [0, 1]); optional phrases_en, English phrases for the detector",
    )
    p.add_argument(
        "--image-dir",
        type=Path,
        default=None,
        help="folder the rows' image paths are relative to (default: the JSONL's folder)",
    )
    p.add_argument(
        "--pretrained-model", required=True, help="local diffusers pipeline folder (SD, SDXL or Kolors)"
    )
    p.add_argument(
        "--adapter", required=True, help="spatial adapter folder (save_pretrained) or file the loader accepts"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (re-running resumes in it)")
    p.add_argument("--gate-scales", type=float, nargs="+", default=[1.0], help="adapter rows, e.g. 0.5 1 2")
    p.add_argument(
        "--schedule",
        nargs="+",
        default=["gligen"],
        help="scheduled sampling: 'gligen' (grounding "
        "for the first 30%% of steps, or --beta of them), 'none' (every step), or three fractions a b c",
    )
    p.add_argument(
        "--beta", type=float, default=None, help="with --schedule gligen: share of steps with grounding"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per row and seed")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    p.add_argument(
        "--detector",
        default="owlv2",
        help="owlv2 (google/owlv2-base-patch16-ensemble), "
        "grounding-dino (IDEA-Research/grounding-dino-tiny), toy-colour, or a local detector folder",
    )
    p.add_argument(
        "--allow-non-english-detector-phrases",
        action="store_true",
        help="give non-English phrases to a zero-shot detector (only for a multilingual detector)",
    )
    p.add_argument(
        "--clip-model", default=None, help="local CLIP folder for CLIP score (skipped when not given)"
    )
    p.add_argument(
        "--fid-features",
        default=None,
        help="feature weights for FID: a torchvision Inception-v3 "
        "state dict (.pth) or a TorchScript module uint8 (N,3,H,W) -> (N,D) (skipped when not given)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="pipeline dtype (default: float16 on cuda, float32 on cpu)",
    )
    return p


# ----------------------------------------------------------------------------------------------- input


def read_layouts(jsonl: Path, image_dir: Path | None = None, limit: int | None = None) -> list[dict]:
    """Rows of ``jsonl`` read by :func:`diffusers_ext.layout_rows.read_grounding_rows` with ``strict=True``
    (evaluation never clamps or drops a box: each obeys the box rule, one per phrase), then the evaluation's
    own checks: ``phrases_en`` one per phrase, the image present. Errors name file:line."""
    from diffusers_ext.layout_rows import read_grounding_rows

    jsonl = Path(jsonl)
    image_dir = jsonl.parent if image_dir is None else Path(image_dir)
    read, _ = read_grounding_rows(jsonl, strict=True, optional_keys=OPTIONAL_KEYS, limit=limit, flag="--data")
    rows = []
    for row in read:
        where, phrases, english = row["where"], row["phrases"], row.get("phrases_en")
        if english is not None and (
            not isinstance(english, list)
            or len(english) != len(phrases)
            or not all(isinstance(p, str) and p.strip() for p in english)
        ):
            raise ValueError(
                f"{where}: phrases_en must be a list of {len(phrases)} non-empty strings, one per phrase"
            )
        image = image_dir / str(row["image"])
        if not image.is_file():
            raise FileNotFoundError(
                f"{where}: image {image} not found (paths are relative to --image-dir {image_dir})"
            )
        rows.append(
            {
                "where": where,
                "image": str(image),
                "caption": row["caption"],
                "boxes": row["boxes"],
                "phrases": list(phrases),
                "detector_phrases": list(english) if english is not None else list(phrases),
            }
        )
    if not rows:
        raise ValueError(f"--data {jsonl} holds no rows")
    return rows


def _check_flags(args) -> None:
    def bad(flag, value, accepted):
        raise ValueError(f"{flag} {value!r}: {accepted}")

    if args.limit is not None and args.limit < 1:
        bad("--limit", args.limit, "must be a positive int")
    if args.steps is not None and args.steps < 1:
        bad("--steps", args.steps, "must be a positive int")
    if args.batch_size < 1:
        bad("--batch-size", args.batch_size, "must be a positive int")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        bad("--seeds", args.seeds, "must be distinct non-negative ints")
    if any(not math.isfinite(g) or g <= 0 for g in args.gate_scales) or len(set(args.gate_scales)) != len(
        args.gate_scales
    ):
        bad(
            "--gate-scales",
            args.gate_scales,
            "must be distinct positive numbers (the baseline row is always added)",
        )
    if args.beta is not None and not 0.0 <= args.beta <= 1.0:
        bad("--beta", args.beta, "must be in [0, 1]")
    sched = args.schedule
    if sched in (["gligen"], ["none"]):
        if sched == ["none"] and args.beta is not None:
            bad("--beta", args.beta, "goes with --schedule gligen, not none")
    else:
        try:
            abc = [float(v) for v in sched]
        except ValueError:
            abc = []
        if len(abc) != 3:
            bad(
                "--schedule", " ".join(sched), "accepted: gligen, none, or three fractions a b c summing to 1"
            )
        if args.beta is not None:
            bad("--beta", args.beta, "goes with --schedule gligen, not with fractions a b c")
    if args.clip_model is not None and not Path(args.clip_model).is_dir():
        bad("--clip-model", args.clip_model, "must be a local CLIP folder (nothing is downloaded)")
    if args.fid_features is not None and not Path(args.fid_features).is_file():
        bad("--fid-features", args.fid_features, "must be a local weights file (nothing is downloaded)")
    if not Path(args.pretrained_model).is_dir():
        bad("--pretrained-model", args.pretrained_model, "must be a local diffusers pipeline folder")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        bad("--out", str(args.out), "is a file; it must be a folder (created if missing)")
    if args.steps is not None:
        from diffusers_ext.generation import zero_grounding_message

        kwargs = _schedule_kwargs(args)
        if kwargs["schedule"] == "gligen":
            from diffusers_ext.scheduled_sampling import GLIGEN_BETA

            kwargs = {"schedule": None, "beta": GLIGEN_BETA if args.beta is None else args.beta}
        zero = zero_grounding_message(args.steps, kwargs["schedule"], kwargs["beta"])
        if zero:  # every gate row would equal the baseline
            bad("--steps", args.steps, zero.replace("schedule=None / --schedule none", "--schedule none"))


def _schedule_kwargs(args) -> dict:
    if args.schedule == ["gligen"]:
        return {"schedule": "gligen", "beta": args.beta}
    if args.schedule == ["none"]:
        return {"schedule": None, "beta": None}
    return {"schedule": [float(v) for v in args.schedule], "beta": None}


# ------------------------------------------------------------------------------------------ files


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=2)


def _load_record(path: Path) -> dict | None:
    """A stored record, or None when absent; a record that does not parse is named and regenerated."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        print(
            f"warning: {path} is corrupt ({e}); it is not used, the image is generated again", file=sys.stderr
        )
        return None


def _check_fingerprint(out: Path, fingerprint: dict) -> None:
    """Refuse to resume into ``out`` when the settings or the content of the inputs differ from the run that
    wrote it (a retrained adapter under the same path would mix old images and records with new ones)."""
    path = out / "run.json"
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is corrupt ({e}); remove it or use another --out") from None
        settings = {k: v for k, v in fingerprint.items() if k != "content"}
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        lines = [f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items()]
        lines += _content_changes(old.get("content"), fingerprint["content"])
        if lines:
            raise ValueError(
                f"--out {out} holds results of a different run ({'; '.join(lines)}); resuming would mix them. "
                "Use another --out, or the same settings and inputs (--gate-scales, --seeds and --limit may "
                "change)"
            )
        # rows beyond this run's --limit keep the digests their stored records were made from
        layouts = {**old["content"]["layouts"], **fingerprint["content"]["layouts"]}
        fingerprint = {**fingerprint, "content": {**fingerprint["content"], "layouts": layouts}}
    _write_json(path, fingerprint)


# The content of every input a stored image or record depends on. Files up to FULL_HASH_BYTES are hashed
# whole; larger ones (UNet and text-encoder weights, GBs each) by their size and SAMPLE_CHUNKS evenly spaced
# chunks: retraining or replacing weights changes bytes everywhere, and hashing a 12 GB ChatGLM3 in full at
# every start would cost more than it guards. Modification times are not used: a copy is the same content.
FULL_HASH_BYTES = 64 << 20
SAMPLE_CHUNKS = 64
SAMPLE_BYTES = 1 << 20
CONTENT_LABELS = {
    "adapter": "--adapter",
    "pretrained_model": "--pretrained-model",
    "detector": "--detector",
    "clip_model": "--clip-model",
}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(str(size).encode())
        step = (size - SAMPLE_BYTES) // (SAMPLE_CHUNKS - 1)
        for i in range(SAMPLE_CHUNKS):
            f.seek(i * step)
            h.update(f.read(SAMPLE_BYTES))
    return f"sampled-sha256:{size}:{h.hexdigest()}"


def _tree_digests(path: Path) -> dict[str, str]:
    """{relative path: digest} of a file, or of every file in a folder (hidden entries, such as a hub
    download's .cache, and temporary files are skipped)."""
    if path.is_file():
        return {path.name: _file_digest(path)}
    found = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            found[rel.as_posix()] = _file_digest(p)
    return found


def _content(args, rows: list[dict]) -> dict:
    """Digests of the adapter, pipeline, detector and CLIP folders, and of each layout row with its image."""
    content = {}
    adapter = Path(args.adapter)
    if not adapter.exists():  # a hub id: attach_adapter loaded it, so its snapshot is in the local cache
        from diffusers_ext.loaders import _hub_folder

        adapter = _hub_folder(args.adapter, None, None, {"local_files_only": True})
    content["adapter"] = _tree_digests(adapter)
    content["pretrained_model"] = _tree_digests(Path(args.pretrained_model))
    content["detector"] = _tree_digests(Path(args.detector)) if Path(args.detector).is_dir() else {}
    content["clip_model"] = _tree_digests(Path(args.clip_model)) if args.clip_model else {}
    images: dict[str, str] = {}
    layouts = {}
    for i, row in enumerate(rows):
        fields = {k: row[k] for k in ("caption", "boxes", "phrases", "detector_phrases")}
        if row["image"] not in images:
            images[row["image"]] = _file_digest(Path(row["image"]))
        layouts[str(i)] = {
            "where": row["where"],
            "layout": hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8")).hexdigest(),
            "image": images[row["image"]],
        }
    content["layouts"] = layouts
    return content


def _content_changes(old: dict | None, new: dict, shown: int = 5) -> list[str]:
    """What differs between two ``_content`` results, named by flag and file (or by row)."""
    if not old:
        return ["content: not recorded (the run in --out was made before evaluate fingerprinted contents)"]

    def listed(items):
        more = f" and {len(items) - shown} more" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    changes = []
    for name, label in CONTENT_LABELS.items():
        before, now = old.get(name, {}), new[name]
        changed = [f for f in sorted(set(before) | set(now)) if before.get(f) != now.get(f)]
        if changed:
            what = [
                f"{f} {'added' if f not in before else 'removed' if f not in now else 'changed'}"
                for f in changed
            ]
            changes.append(f"{label} content changed: {listed(what)}")
    before, now = old.get("layouts", {}), new["layouts"]
    rows = []
    for i in sorted(set(before) & set(now), key=int):
        parts = [k for k in ("layout", "image") if before[i][k] != now[i][k]]
        if parts:
            rows.append(f"row {i} ({now[i]['where']}) {' and '.join(parts)}")
    if rows:
        changes.append(f"--data content changed: {listed(rows)}")
    return changes


# ------------------------------------------------------------------------------------------ models


def _load_pipeline(folder: str, device: str, dtype):
    from diffusers import DiffusionPipeline

    from diffusers_ext.generation import pipeline_kind

    try:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--pretrained-model {folder}: not a loadable diffusers pipeline folder ({e})"
        ) from None
    try:
        pipeline_kind(pipe)
    except TypeError as e:
        raise ValueError(f"--pretrained-model {folder}: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def attach_adapter(pipe, source: str):
    """Load the adapter onto ``pipe`` (``loaders.load_spatial_adapter`` when available) and check that it
    fits; returns the installed SpatialAdapter. Any mismatch is an error naming --adapter."""
    from diffusers_ext.generation import phrase_dim
    from diffusers_ext.spatial_adapter import SpatialAdapter, installed_adapter

    try:
        try:
            from diffusers_ext.loaders import load_spatial_adapter
        except ImportError:
            load_spatial_adapter = None
        if load_spatial_adapter is not None:
            load_spatial_adapter(pipe, source)
            adapter = installed_adapter(pipe)
        else:
            adapter = SpatialAdapter.from_pretrained(source)
            adapter.install(pipe)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ValueError(
            f"--adapter {source} does not fit the pipeline {type(pipe).__name__}: {type(e).__name__}: {e}"
        ) from None
    if adapter.config.phrase_dim != phrase_dim(pipe):
        adapter.remove()
        raise ValueError(
            f"--adapter {source} takes {adapter.config.phrase_dim}-d phrase features but this "
            f"{type(pipe).__name__}'s text encoder gives {phrase_dim(pipe)}-d ones: it was trained for another "
            "pipeline"
        )
    unet = pipe.unet
    if adapter.dtype != unet.dtype or adapter.device != unet.device:
        adapter.to(device=unet.device, dtype=unet.dtype)
    return adapter


def _clip_metric(folder: str, device: str):
    """torchmetrics' CLIPScore over a local CLIP folder (its own loader accepts hub names only)."""
    from torch import nn
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoModel, AutoProcessor

    try:
        model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"--clip-model {folder}: not a loadable CLIP folder ({e})") from None
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise ValueError(f"--clip-model {folder}: {type(model).__name__} is not a CLIP-style model")

    def pooled(out):
        return out if hasattr(out, "norm") else out.pooler_output

    class TensorFeatures(nn.Module):
        """transformers 5's ``get_image_features``/``get_text_features`` return an output object whose
        ``pooler_output`` holds the projected features; torchmetrics 1.9's CLIPScore expects the tensor."""

        def __init__(self):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return pooled(self.model.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return pooled(self.model.get_text_features(*args, **kwargs))

    return CLIPScore(model_name_or_path=lambda: (TensorFeatures(), processor)).to(device)


def _fid_feature_module(path: str):
    """``--fid-features`` -> an nn.Module uint8 (N, 3, H, W) -> (N, D) with ``num_features``.

    A TorchScript file is used as it is. Otherwise the file must be a torchvision Inception-v3 state dict
    (``inception_v3_google-0cc3c7bd.pth``): its 2048-d pool features, images resized to 299 and
    normalized as torchvision trained it. (These are not the TF-Inception weights of published FIDs.)
    """
    import torch
    from torch import nn

    try:
        module = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError):
        module = None
    if module is not None:
        with torch.no_grad():
            dim = module(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[-1]
        module.num_features = int(dim)
        return module
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        from torchvision.models import inception_v3

        # transform_input=True: what torchvision sets for these (TF-ported) weights
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not what the flag takes
        raise ValueError(
            f"--fid-features {path}: neither a TorchScript feature module nor a torchvision Inception-v3 state "
            f"dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    net.fc = nn.Identity()
    net.eval()

    class _Pool(nn.Module):
        num_features = 2048

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        def forward(self, x):
            x = torch.nn.functional.interpolate(
                x.float() / 255.0, size=(299, 299), mode="bilinear", antialias=True
            )
            return self.inner((x - self.mean) / self.std)

    return _Pool(net)


def _fid(feature_module, real_paths, fake_paths, size) -> float | None:
    """FID between the real and the generated image files, both resized to ``size``; None below 2 each."""
    import numpy as np
    import torch
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real_paths) < 2 or len(fake_paths) < 2:
        return None

    def as_uint8(images):
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.BICUBIC)) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    metric = FrechetInceptionDistance(feature=feature_module, reset_real_features=True)
    for start in range(0, len(real_paths), 16):
        metric.update(as_uint8([Image.open(p) for p in real_paths[start : start + 16]]), real=True)
    for start in range(0, len(fake_paths), 16):
        metric.update(as_uint8([Image.open(p) for p in fake_paths[start : start + 16]]), real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------------ output


def _label(draw, xy, text: str, colour) -> None:
    """Text in the box's colour on a dark patch, readable on any image."""
    draw.rectangle(draw.textbbox(xy, text), fill=(0, 0, 0))
    draw.text(xy, text, fill=colour)


def _grid(settings, images_by_setting, records_by_setting, path: Path) -> None:
    """Rows = settings, columns = the first images; requested boxes green, detected red, with phrases."""
    from PIL import Image, ImageDraw

    n = min(GRID_COLUMNS, min(len(v) for v in images_by_setting.values()))
    if n == 0:
        return
    label_h = 20
    canvas = Image.new("RGB", (n * (GRID_TILE + 4), len(settings) * (GRID_TILE + 4 + label_h)), "white")
    draw_canvas = ImageDraw.Draw(canvas)
    for r, setting in enumerate(settings):
        y0 = r * (GRID_TILE + 4 + label_h)
        draw_canvas.text((4, y0 + 4), setting, fill=(0, 0, 0))
        for c in range(n):
            tile = images_by_setting[setting][c].convert("RGB").resize((GRID_TILE, GRID_TILE), Image.BICUBIC)
            draw = ImageDraw.Draw(tile)
            for obj in records_by_setting[setting][c]["objects"]:
                req = [v * GRID_TILE for v in obj["box"]]
                draw.rectangle(req, outline=REQUESTED_COLOUR, width=2)
                _label(draw, (req[0] + 3, req[1] + 2), obj["detector_phrase"], REQUESTED_COLOUR)
                if obj["detected"] is not None:
                    det = [v * GRID_TILE for v in obj["detected"]]
                    draw.rectangle(det, outline=DETECTED_COLOUR, width=2)
                    text = f"{obj['detector_phrase']} {obj['iou']:.2f}"
                    _label(draw, (det[0] + 3, max(det[3] - 14, 0)), text, DETECTED_COLOUR)
            canvas.paste(tile, (c * (GRID_TILE + 4), y0 + label_h))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    _atomic_write(path, buf.getvalue())


def _markdown(rows: list[dict]) -> str:
    def fmt(v, pct=False):
        if v is None:
            return "n/a"
        return f"{100 * v:.1f} %" if pct else f"{v:.3f}"

    lines = [
        "| setting | images | objects | detected | mean IoU | IoU > 0.5 | centre in box | AP | AP50 | CLIP score | FID |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['n_images']} | {r['n_objects']} | {r['n_detected']} | {fmt(r['mean_iou'])} | "
            f"{fmt(r['share_iou_gt_0.5'], True)} | {fmt(r['share_center_in_box'], True)} | {fmt(r['ap'])} | "
            f"{fmt(r['ap50'])} | {fmt(r['clip_score'])} | {'n/a' if r['fid'] is None else format(r['fid'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ run


def _running_iou(records: dict) -> float:
    ious = [o["iou"] for r in records.values() for o in r["objects"]]
    return sum(ious) / len(ious) if ious else float("nan")


def _setting_name(gate_scale: float | None) -> str:
    """The results folder of one row: ``baseline`` or ``gate_<scale>``, one folder per distinct value.

    ``:g`` keeps six digits, so 1.0000001 and 1.0000002 both became ``gate_1`` and the second row's images
    overwrote the first's. The short form is kept where it reads back as the same float (``gate_1``,
    ``gate_0.5``); otherwise the shortest round-trip repr is used, and two names are equal only for
    equal floats."""
    if gate_scale is None:
        return "baseline"
    short = f"{gate_scale:g}"
    return f"gate_{short if float(short) == gate_scale else repr(float(gate_scale))}"


def _generate(pipe, adapter, rows, jobs, gate_scale, steps, guidance, sched):
    import torch

    from diffusers_ext.generation import generate

    prompts = [rows[i]["caption"] for i, _ in jobs]
    gens = [torch.Generator("cpu").manual_seed(seed) for _, seed in jobs]
    common = {"num_inference_steps": steps, "guidance_scale": guidance, "generator": gens}
    if gate_scale is None:
        return pipe(prompt=prompts, **common).images
    return generate(
        pipe,
        adapter,
        prompts,
        [rows[i]["phrases"] for i, _ in jobs],
        [rows[i]["boxes"] for i, _ in jobs],
        gate_scale=gate_scale,
        **sched,
        **common,
    ).images


def _processes(device: str | None):
    """(rank, world size, accelerate PartialState) under ``accelerate launch`` / ``torchrun`` with several
    processes (gloo on CPU, NCCL on GPUs); (0, 1, None) for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import atexit

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState, unlike Accelerator, does not read `accelerate launch --cpu`'s variable itself
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    atexit.register(state.destroy_process_group)
    return state.process_index, state.num_processes, state


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    _check_flags(args)
    rows = read_layouts(args.data, args.image_dir, args.limit)

    import inspect

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from diffusers_ext.evaluation.detectors import load_detector
    from diffusers_ext.evaluation.layout_scoring import score_image
    from diffusers_ext.spatial_adapter import installed_adapter

    rank, world, state = _processes(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if state is not None and device == "cuda":
        device = str(state.device)  # accelerate gives each process its own GPU
    dtype = getattr(torch, args.dtype or ("float16" if device.startswith("cuda") else "float32"))
    detector = load_detector(args.detector, device=device)
    if not args.allow_non_english_detector_phrases:
        for row in rows:
            detector.check_phrases(row["detector_phrases"], row["where"])
    pipe = _load_pipeline(args.pretrained_model, device, dtype)
    adapter = attach_adapter(pipe, args.adapter)
    too_many = [r for r in rows if len(r["boxes"]) > adapter.config.max_objs]
    if too_many:
        raise ValueError(
            f"{too_many[0]['where']}: {len(too_many[0]['boxes'])} objects, but the adapter takes at most "
            f"max_objs={adapter.config.max_objs}"
        )
    clip = _clip_metric(args.clip_model, device) if args.clip_model else None
    fid_module = _fid_feature_module(args.fid_features) if args.fid_features else None
    notes = []
    if clip is None:
        notes.append("CLIP score skipped: no --clip-model given (a local CLIP folder)")
    if fid_module is None:
        notes.append("FID skipped: no --fid-features given (a local feature weights file)")
    for note in notes:
        print(note, file=sys.stderr)

    defaults = inspect.signature(pipe.__call__).parameters
    steps = args.steps or defaults["num_inference_steps"].default
    guidance = defaults["guidance_scale"].default if args.guidance_scale is None else args.guidance_scale
    sched = _schedule_kwargs(args)
    # the settings every stored image and record depends on: a re-run into the same --out must match them
    fingerprint = {
        "data": str(Path(args.data).resolve()),
        "image_dir": str(Path(args.image_dir or Path(args.data).parent).resolve()),
        "pretrained_model": str(Path(args.pretrained_model).resolve()),
        "adapter": str(Path(args.adapter).resolve()) if Path(args.adapter).exists() else args.adapter,
        "detector": str(Path(args.detector).resolve()) if Path(args.detector).is_dir() else args.detector,
        "steps": steps,
        "guidance_scale": guidance,
        "schedule": sched["schedule"],
        "beta": sched["beta"],
        "device": torch.device(device).type,  # cuda:3 on process 3 of 8 makes the images cuda:0 makes
        "dtype": str(dtype).removeprefix("torch."),
        "clip_model": str(Path(args.clip_model).resolve()) if args.clip_model else None,
    }
    out = args.out
    # the main process hashes the inputs and checks --out; every process stops if it refuses
    refusal = None
    if rank == 0:
        try:
            _check_fingerprint(out, {**fingerprint, "content": _content(args, rows)})
        except ValueError as e:
            refusal = str(e)
    if state is not None:
        shared = [refusal]
        torch.distributed.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise ValueError(refusal)

    jobs = [(i, seed) for i in range(len(rows)) for seed in args.seeds]
    keys = [f"{i:06d}_s{seed}" for i, seed in jobs]
    settings = [None, *args.gate_scales]
    # fixed batches over the full job list: a resumed run, or one with another number of processes,
    # computes each image in the same batch as one uninterrupted process, so its pixels (and scores) are the
    # same. Process r takes every world-th (setting, batch) pair.
    batches = [range(s, min(s + args.batch_size, len(jobs))) for s in range(0, len(jobs), args.batch_size)]
    generated = skipped = 0
    for s_index, gate_scale in enumerate(settings):
        name = _setting_name(gate_scale)
        if gate_scale is None:
            adapter.remove()
        elif installed_adapter(pipe) is None:
            adapter.install(pipe)
        mine = [b for b_index, b in enumerate(batches) if (s_index * len(batches) + b_index) % world == rank]
        my_keys = [keys[j] for b in mine for j in b]
        records = {k: _load_record(out / "records" / name / f"{k}.json") for k in my_keys}
        records = {
            k: r
            for k, r in records.items()
            if r is not None and (out / "images" / name / f"{k}.png").is_file()
        }
        skipped += len(records)
        desc = name if world == 1 else f"{name} [process {rank}/{world}]"
        bar = tqdm(total=len(my_keys), desc=desc, unit="img", initial=len(records), position=rank)
        bar.set_postfix(mean_iou=f"{_running_iou(records):.3f}")
        for b in mine:
            batch = [jobs[j] for j in b]
            batch_keys = [keys[j] for j in b]
            if all(k in records for k in batch_keys):
                continue
            images = _generate(pipe, adapter, rows, batch, gate_scale, steps, guidance, sched)
            queries = [rows[i]["detector_phrases"] for i, _ in batch]
            detections = detector.detect(images, queries)
            for key, (i, seed), image, dets in zip(batch_keys, batch, images, detections, strict=True):
                if key in records:
                    continue
                row = rows[i]
                record = score_image(image.size, row["boxes"], row["phrases"], dets, row["detector_phrases"])
                record = {
                    "setting": name,
                    "gate_scale": gate_scale,
                    "row": i,
                    "where": row["where"],
                    "seed": seed,
                    "caption": row["caption"],
                    **record,
                }
                if clip is not None:
                    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
                    record["clip_score"] = float(clip(pixels.to(device), row["caption"])) / 100.0
                    clip.reset()
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                _atomic_write(out / "images" / name / f"{key}.png", buf.getvalue())
                _write_json(out / "records" / name / f"{key}.json", record)
                records[key] = record
                generated += 1
                bar.update(1)
            bar.set_postfix(mean_iou=f"{_running_iou(records):.3f}")
        bar.close()
    print(
        f"evaluate: process {rank} of {world}: {generated} images generated, {skipped} already done",
        file=sys.stderr,
        flush=True,
    )
    if state is not None:
        state.wait_for_everyone()  # every process has written its records: the main process merges them
        # alone; without a process group, torchmetrics' box AP and FID do not try to sync with the others
        state.destroy_process_group()
        if rank != 0:
            return 0
    _merge(out, rows, jobs, keys, settings, fingerprint, detector.name, args.seeds, notes, fid_module)
    return 0


def _merge(out, rows, jobs, keys, settings, fingerprint, detector_name, seeds, notes, fid_module) -> None:
    """results.jsonl, summary.json, summary.md and grid.png from the records on disk, whichever process (or
    earlier run) wrote them."""
    from PIL import Image

    from diffusers_ext.evaluation.layout_scoring import summarize

    summary_rows, all_records, grid_images, grid_records = [], [], {}, {}
    for gate_scale in settings:
        name = _setting_name(gate_scale)
        records = {k: _load_record(out / "records" / name / f"{k}.json") for k in keys}
        missing = [
            k for k, r in records.items() if r is None or not (out / "images" / name / f"{k}.png").is_file()
        ]
        if missing:
            raise RuntimeError(
                f"{len(missing)} {name} images are missing after every process finished (first: {missing[0]}); "
                "re-run the same command to generate them"
            )
        ordered = [records[k] for k in keys]
        row_summary = summarize(ordered)
        fake = [out / "images" / name / f"{k}.png" for k in keys]
        fid = None
        if fid_module is not None:
            real = sorted({rows[i]["image"] for i, _ in jobs})
            fid = _fid(fid_module, real, fake, Image.open(fake[0]).size)
            if fid is None:
                notes.append(f"FID skipped for {name}: needs at least 2 real and 2 generated images")
        clip_scores = [r["clip_score"] for r in ordered if "clip_score" in r]
        summary_rows.append(
            {
                "setting": name,
                "adapter": gate_scale is not None,
                "gate_scale": gate_scale,
                **row_summary,
                "clip_score": sum(clip_scores) / len(clip_scores) if clip_scores else None,
                "fid": fid,
            }
        )
        all_records += ordered
        grid_images[name] = [Image.open(p).convert("RGB") for p in fake[:GRID_COLUMNS]]
        grid_records[name] = ordered[:GRID_COLUMNS]

    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_records)
    _atomic_write(out / "results.jsonl", lines.encode("utf-8"))
    summary = {
        "rows": summary_rows,
        "run": fingerprint,
        "detector": detector_name,
        "seeds": seeds,
        "n_layouts": len(rows),
        "notes": notes,
    }
    _write_json(out / "summary.json", summary)
    table = _markdown(summary_rows)
    _atomic_write(out / "summary.md", table.encode("utf-8"))
    _grid([_setting_name(g) for g in settings], grid_images, grid_records, out / "grid.png")
    print(table)
    print(f"wrote {out / 'summary.json'}, {out / 'results.jsonl'}, {out / 'summary.md'}, {out / 'grid.png'}")


if __name__ == "__main__":
    sys.exit(main())
