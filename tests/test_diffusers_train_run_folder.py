"""The trainer's output folder: complete checkpoints are recognised by their marker and file sizes, the
newest complete one is found past incomplete ones, folders are replaced only when complete, and
metrics are cut back to the resumed step."""

from __future__ import annotations

import json

import pytest

from diffusers_ext.training.run_folder import (
    MARKER,
    checkpoint_problem,
    clear_previous_run,
    find_latest_checkpoint,
    publish_folder,
    refuse_reused_output_dir,
    staging_folder,
    truncate_metrics,
)


def _checkpoint(root, step, files=None):
    final = root / f"checkpoint-{step}"
    staging = staging_folder(final)
    for name, data in (files or {"trainer_state.json": b"{}", "trainable.safetensors": b"x" * 64}).items():
        (staging / name).write_bytes(data)
    publish_folder(staging, final, marker={"global_step": step})
    return final


def test_a_published_checkpoint_lists_its_files_and_leaves_no_temporary_folder(tmp_path):
    folder = _checkpoint(tmp_path, 7)
    marker = json.loads((folder / MARKER).read_text())
    assert marker == {"global_step": 7, "files": {"trainable.safetensors": 64, "trainer_state.json": 2}}
    assert checkpoint_problem(folder) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]


def test_latest_skips_incomplete_checkpoints_naming_why_and_ignores_other_folders(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)  # numeric order, not string order: 10 > 9 > 2
    (_checkpoint(tmp_path, 11) / "trainable.safetensors").write_bytes(b"x" * 10)  # truncated later
    (_checkpoint(tmp_path, 12) / "trainer_state.json").unlink()
    _checkpoint(tmp_path, 13, {"trainable.safetensors": b"x"})  # sealed without a trainer state
    (tmp_path / "checkpoint-14").mkdir()  # a save that never finished
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / ".checkpoint-15.tmp").mkdir()
    latest, skipped = find_latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-10"
    assert [(p.name, why) for p, why in skipped] == [
        ("checkpoint-14", f"no {MARKER} (the save did not finish)"),
        ("checkpoint-13", "trainer_state.json is not among its files"),
        ("checkpoint-12", "trainer_state.json is missing"),
        ("checkpoint-11", "trainable.safetensors has 10 bytes, 64 were written (truncated or changed)"),
    ]


def test_a_republished_folder_replaces_the_old_one_whole(tmp_path):
    final = tmp_path / "adapter"
    for text in ("old", "new"):
        staging = staging_folder(final)
        (staging / "weights").write_text(text)
        publish_folder(staging, final)
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_metrics_after_the_resumed_step_and_a_half_written_line_are_removed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_used_output_dir_is_refused_and_overwrite_deletes_only_run_outputs(tmp_path):
    refuse_reused_output_dir(tmp_path / "new", resume=None, overwrite=False)  # absent: fine
    refuse_reused_output_dir(tmp_path, resume=None, overwrite=False)  # empty: fine
    _checkpoint(tmp_path, 1)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "my_notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not empty.*--resume latest.*--overwrite"):
        refuse_reused_output_dir(tmp_path, resume=None, overwrite=False)
    assert clear_previous_run(tmp_path) == ["checkpoint-1", "metrics.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["my_notes.txt"]
