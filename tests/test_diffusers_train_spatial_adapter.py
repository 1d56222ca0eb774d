"""The training CLI on toy-world layouts and tiny pipeline folders: box cleaning, what trains, exact resume,
and a used --output-dir."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusers_ext.layout_rows import CleaningReport, clean_layout, read_grounding_rows
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training.train_spatial_adapter import main, train
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "jsonl": write_grounding_jsonl(root / "data", 8, seed=0, image_size=64),
        "sd": save_tiny_pipeline(root / "sd", "sd"),
        "root": root,
    }


def _args(toy, out, *extra, model=None):
    return [
        "--mixed-data", str(toy["jsonl"]), "--pretrained-model", str(model or toy["sd"]), "--output-dir", str(out),
        "--batch-size", "2", "--hidden-dim", "32", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cleaning_drops_small_boxes_and_keeps_the_largest_max_objs():
    report = CleaningReport()
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.05, 0.05], [0.5, 0.5, 0.9, 0.6], [0.2, 0.2, 0.9, 0.9]]
    kept, phrases = clean_layout(
        boxes, ["a", "tiny", "flat", "big"], min_area=0.01, min_side=0.0, max_objs=2, report=report
    )
    assert kept == [[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9]] and phrases == ["a", "big"]
    assert report.boxes_read == 4
    assert (report.boxes_dropped_small, report.boxes_dropped_over_max_objs) == (1, 1)


def test_min_side_drops_thin_boxes():
    report = CleaningReport()
    kept, _ = clean_layout(
        [[0.0, 0.0, 1.0, 0.02]], ["line"], min_area=0.0, min_side=0.05, max_objs=30, report=report
    )
    assert kept == [] and report.boxes_dropped_small == 1


def test_rows_left_without_boxes_are_dropped_and_counted(tmp_path):
    rows = [
        {"image": "a.png", "caption": "c", "boxes": [[0.0, 0.0, 0.01, 0.01]], "phrases": ["speck"]},
        {"image": "b.png", "caption": "c", "boxes": [[0.0, 0.0, 0.5, 0.5]], "phrases": ["square"]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kept, report = read_grounding_rows(path, min_area=0.01, min_side=0.0, max_objs=30)
    assert [r["image"] for r in kept] == ["b.png"]
    assert (report.rows_read, report.rows_kept, report.rows_dropped_no_boxes) == (2, 1, 1)


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {"image": "a", "caption": "c", "boxes": [[0, 0, 1, 1]], "phrases": ["x", "y"]},
            "rows.jsonl:2: 2 phrases",
        ),
        (
            {"image": "a", "caption": "c", "boxes": [[0, 0, math.nan, 1]], "phrases": ["x"]},
            "4 finite numbers",
        ),
        ({"image": "a", "caption": "c", "boxes": [[0.5, 0, 0.1, 1]], "phrases": ["x"]}, "needs x0 < x1"),
        ({"image": "a", "caption": "c", "boxes": [[0.5, 0, 0.5, 1]], "phrases": ["x"]}, "needs x0 < x1"),
        (
            {"image": "a", "caption": "c", "boxes": [[-0.1, 0, 0.5, 1]], "phrases": ["x"]},
            r"rows.jsonl:2: box 0 = \[-0.1, 0.0, 0.5, 1.0\] lies outside \[0, 1\].*never clamped",
        ),
        ({"image": "a", "caption": "c", "boxes": [[0, 0, 64, 48]], "phrases": ["x"]}, "lies outside"),
        ({"image": "a", "caption": "c", "boxes": []}, r"missing keys \['phrases'\]"),
        (["a", "c"], r"rows.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_malformed_rows_are_errors_naming_the_line(tmp_path, row, match):
    good = {"image": "a", "caption": "c", "boxes": [[0, 0, 1, 1]], "phrases": ["x"]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row))
    with pytest.raises(ValueError, match=match):
        read_grounding_rows(path, min_area=0.0, min_side=0.0, max_objs=30)


def test_training_steps_update_only_the_adapter_and_open_the_gates(toy, tmp_path):
    out = tmp_path / "run"
    result = train(_args(toy, out, "--max-train-steps", "2", "--log-tensorboard"))
    assert result["steps"] == 2 and len(result["losses"]) == 2
    assert all(name.startswith("adapter.") for name in result["trainable"])
    assert any(name.endswith("alpha_attn") for name in result["trainable"])
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["lr"] == pytest.approx(1e-3) for r in records)
    saved = SpatialAdapter.from_pretrained(out / "adapter")
    gates = torch.stack([f.gates() for f in saved.fusers])
    assert gates.abs().max() > 0  # started at exactly 0 (GLIGEN's gate mode)
    assert records[-1]["gate_max"] == pytest.approx(gates.max().item(), abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"train/loss", "train/gate_mean", "train/gate_std", "train/lr"} <= set(events.Tags()["scalars"])


def test_resume_from_a_checkpoint_continues_with_the_same_losses(toy, tmp_path):
    full = tmp_path / "full"
    two_epochs = ["--batch-size", "4", "--epochs", "2", "--ema"]
    train(_args(toy, full, *two_epochs, "--checkpointing-steps", "2"))
    resumed = tmp_path / "resumed"
    train(_args(toy, resumed, *two_epochs, "--resume", str(full / "checkpoint-2")))
    expected = {r["step"]: r["loss"] for r in _metrics(full)}
    got = {r["step"]: r["loss"] for r in _metrics(resumed)}
    assert sorted(got) == [3, 4]  # steps 1-2 are not redone; step 3 crosses into the second epoch
    assert got[3] == pytest.approx(expected[3], rel=1e-6) and got[4] == pytest.approx(expected[4], rel=1e-6)
    a = SpatialAdapter.from_pretrained(full / "adapter_ema").state_dict()
    b = SpatialAdapter.from_pretrained(resumed / "adapter_ema").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_lora_on_the_unet_trains_beside_the_adapter(toy, tmp_path):
    result = train(_args(toy, tmp_path / "lora", "--max-train-steps", "1", "--lora-rank", "2"))
    lora = [n for n in result["trainable"] if "lora_" in n]
    assert lora and all(n.startswith("adapter.") or "lora_" in n for n in result["trainable"])
    assert (tmp_path / "lora" / "unet_lora.safetensors").is_file()


def test_console_entry_point_exits_zero_and_saves_the_adapter(toy, tmp_path):
    assert main(_args(toy, tmp_path / "cli", "--max-train-steps", "1")) == 0
    assert (tmp_path / "cli" / "adapter" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["sdxl", "kolors"])
def test_sdxl_and_kolors_folders_train(toy, tmp_path, kind):
    model = save_tiny_pipeline(tmp_path / kind, kind)
    result = train(_args(toy, tmp_path / "out", "--max-train-steps", "1", model=model))
    assert result["steps"] == 1 and math.isfinite(result["losses"][0])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--box-dropout", "1.5"], r"--box-dropout must be in \[0, 1\]"),
        (["--batch-size", "9"], "fewer than one global batch"),
        (["--gate-init-value", "0", "--freeze-gate"], "can never learn"),
        (["--resume", "latest"], "no complete checkpoint-<step> folder"),
        (["--resume", "latest", "--overwrite"], "contradict each other"),
    ],
)
def test_bad_configurations_are_refused_before_training(toy, tmp_path, extra, match):
    with pytest.raises((SystemExit, ValueError), match=match):
        train(_args(toy, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_second_run_into_a_used_output_dir_is_refused_until_resume_or_overwrite(toy, tmp_path):
    out = tmp_path / "used"
    train(_args(toy, out, "--max-train-steps", "1"))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(
        SystemExit, match=r"is not empty \(adapter, metrics.jsonl\).*--resume latest.*--overwrite"
    ):
        train(_args(toy, out, "--max-train-steps", "2"))
    assert (out / "metrics.jsonl").read_text() == before  # refused before any work
    (out / "notes.txt").write_text("mine")
    train(_args(toy, out, "--max-train-steps", "2", "--overwrite"))
    assert [r["step"] for r in _metrics(out)] == [1, 2]  # the earlier run's row is gone, not duplicated
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes only what a run wrote


def test_resume_latest_in_the_same_folder_rewrites_no_step_twice(toy, tmp_path):
    out = tmp_path / "same"
    train(_args(toy, out, "--max-train-steps", "4", "--checkpointing-steps", "3"))
    first = {r["step"]: r["loss"] for r in _metrics(out)}
    train(_args(toy, out, "--max-train-steps", "4", "--resume", "latest"))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 4 was dropped at resume and trained again
    assert rows[3]["loss"] == pytest.approx(first[4], rel=1e-6)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]


def test_resume_from_a_named_incomplete_checkpoint_is_refused_saying_why(toy, tmp_path):
    unfinished = tmp_path / "old" / "checkpoint-3"
    unfinished.mkdir(parents=True)
    (unfinished / "trainable.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(
        SystemExit, match=r"checkpoint-3 is not a complete checkpoint: no checkpoint_complete\.json"
    ):
        train(_args(toy, tmp_path / "new", "--resume", str(unfinished)))
    assert not (tmp_path / "new" / "metrics.jsonl").exists()
