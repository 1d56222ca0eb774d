"""Resuming an evaluation and running it on several processes.

Resume (fast, in process): ``--out`` remembers the content of every input (adapter, pipeline, layout rows and
their images), not only their paths, so a retrained adapter saved under the same path is refused, naming
the flag and the file, while an unchanged re-run skips every finished image.

Distributed (slow, 2 CPU processes): ``accelerate launch --multi_gpu --num_processes 2`` with
``ACCELERATE_USE_CPU=true`` (a MULTI_CPU gloo group; see tests/test_diffusers_train_distributed.py for why not
``--cpu``) splits the (setting, batch) jobs between the processes; the main process merges the records into
the same results.jsonl and summary.json as one process, and a re-run after a partial run generates only
the missing images.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import diffusers_ext.evaluation.evaluate as evaluate
from diffusers_ext.generation import phrase_dim
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline, tiny_sd_pipeline
from vlext.toyworld import write_grounding_jsonl

COUNTS = re.compile(r"evaluate: process (\d+) of (\d+): (\d+) images generated, (\d+) already done")


def _save_adapter(folder, gate: float) -> None:
    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32)
    with torch.no_grad():  # open gates: a fresh GLIGEN-init adapter would be an exact identity
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(gate)
            fuser.alpha_dense.fill_(gate)
    adapter.save_pretrained(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_distributed")
    save_tiny_pipeline(root / "pipe", "sd")
    _save_adapter(root / "adapter", 0.7)
    data = write_grounding_jsonl(root / "data", 2)
    return root, data


def _args(root, data, out, *extra):
    return [
        "--data", str(data), "--pretrained-model", str(root / "pipe"), "--adapter", str(root / "adapter"),
        "--out", str(out), "--steps", "2", "--schedule", "none", "--batch-size", "1",
        "--detector", "toy-colour", "--gate-scales", "1", *extra,
    ]  # fmt: skip


def _counts(stderr: str) -> dict[int, tuple[int, int]]:
    """{process: (generated, already done)} from each process's closing line."""
    return {int(m[0]): (int(m[2]), int(m[3])) for m in COUNTS.findall(stderr)}


# ------------------------------------------------------------------------------------------ resume


def test_a_retrained_adapter_under_the_same_path_is_refused_naming_the_adapter_file(inputs, tmp_path, capsys):
    root, data = inputs
    adapter = tmp_path / "adapter"
    _save_adapter(adapter, 0.7)
    args = _args(root, data, tmp_path / "out")
    args[args.index("--adapter") + 1] = str(adapter)
    assert evaluate.main(args) == 0
    images = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").rglob("*.png")}
    assert len(images) == 4  # 2 rows x (baseline, gate_1)
    capsys.readouterr()

    _save_adapter(adapter, 0.3)  # "retrained": same path, same file names, other weights
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "holds results of a different run" in err
    # the weights changed, the config (same hidden_dim, same layers) did not
    assert "--adapter content changed: diffusion_pytorch_model.safetensors changed)" in err
    assert "--pretrained-model content" not in err and "--data content" not in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "images").rglob("*.png")} == images


def test_an_unchanged_rerun_resumes_and_generates_nothing(inputs, tmp_path, capsys):
    root, data = inputs
    out = tmp_path / "out"
    assert evaluate.main(_args(root, data, out)) == 0
    assert _counts(capsys.readouterr().err) == {0: (4, 0)}
    records = {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")}
    summary = json.loads((out / "summary.json").read_text())
    assert evaluate.main(_args(root, data, out)) == 0
    assert _counts(capsys.readouterr().err) == {0: (0, 4)}
    assert {p: p.stat().st_mtime_ns for p in (out / "records").rglob("*.json")} == records
    assert json.loads((out / "summary.json").read_text()) == summary
    # a larger --limit is still the same run: the digests of the rows already done still match
    assert evaluate.main(_args(root, data, out, "--limit", "1")) == 0
    assert _counts(capsys.readouterr().err) == {0: (0, 2)}


def test_a_changed_layout_image_is_refused_naming_its_row(inputs, tmp_path, capsys):
    root, _ = inputs
    data = write_grounding_jsonl(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert evaluate.main(_args(root, data, out)) == 0
    image = tmp_path / "data" / json.loads(data.read_text().splitlines()[1])["image"]
    image.write_bytes(image.read_bytes() + b"\0")  # replaced by another file of the same name
    capsys.readouterr()
    assert evaluate.main(_args(root, data, out)) == 2
    err = capsys.readouterr().err
    assert f"--data content changed: row 1 ({data}:2) image" in err
    assert "--adapter content" not in err


def test_large_files_are_fingerprinted_by_size_and_sampled_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "FULL_HASH_BYTES", 1 << 16)
    monkeypatch.setattr(evaluate, "SAMPLE_BYTES", 1 << 10)
    path = tmp_path / "weights.bin"
    data = bytearray(os.urandom(1 << 20))
    path.write_bytes(data)
    first = evaluate._file_digest(path)
    assert first.startswith(f"sampled-sha256:{1 << 20}:")
    data[5] ^= 0xFF  # inside the first sampled chunk
    path.write_bytes(data)
    assert evaluate._file_digest(path) != first
    small = tmp_path / "config.json"
    small.write_text('{"a": 1}')
    assert evaluate._file_digest(small).startswith("sha256:")


# ------------------------------------------------------------------------------------------ distributed


def _env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffusers_ext.evaluation.evaluate", *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _two_processes(args: list[str], port: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "diffusers_ext.evaluation.evaluate", *args,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_merge_into_the_one_process_results_and_resume_skips_finished_jobs(inputs, tmp_path):
    root, data = inputs
    single = tmp_path / "single"
    _one_process(_args(root, data, single, "--seeds", "0", "1"))  # 4 jobs x 2 settings = 8 batches of 1
    multi = tmp_path / "multi"
    run = _two_processes(_args(root, data, multi, "--seeds", "0", "1"), port=29541)
    assert _counts(run.stderr) == {0: (4, 0), 1: (4, 0)}  # each process generated half
    assert json.loads((multi / "summary.json").read_text()) == json.loads(
        (single / "summary.json").read_text()
    )
    assert (multi / "results.jsonl").read_text() == (single / "results.jsonl").read_text()
    assert (multi / "summary.md").read_text() == (single / "summary.md").read_text()
    assert (multi / "grid.png").read_bytes() == (single / "grid.png").read_bytes()

    # a partial run: three images of process 0's share and one of process 1's never finished
    lost = ["baseline/000000_s0", "gate_1/000001_s0", "baseline/000000_s1", "gate_1/000000_s1"]
    for key in lost:
        (multi / "records" / f"{key}.json").unlink()
        (multi / "images" / f"{key}.png").unlink()
    (multi / "summary.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (multi / "records").rglob("*.json")}
    assert len(kept) == 4
    run = _two_processes(_args(root, data, multi, "--seeds", "0", "1"), port=29542)
    counts = _counts(run.stderr)
    assert sum(g for g, _ in counts.values()) == 4 and sum(d for _, d in counts.values()) == 4
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished jobs were not redone
    assert json.loads((multi / "summary.json").read_text()) == json.loads(
        (single / "summary.json").read_text()
    )
    assert (multi / "results.jsonl").read_text() == (single / "results.jsonl").read_text()
