"""``python -m diffusers_ext.evaluation.evaluate`` end to end on a tiny offline SD pipeline and toy-world layouts: the
rows (baseline, then one per gate scale), the files, the baseline being the plain pipeline from the same
seeds, resume after a crash, refusal of mismatched adapters and re-runs, a tiny OWLv2 with CLIP score and
FID from local weights. The adapter is freshly initialised with open gates, so the numbers are low: these
tests check the wiring, not the quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_ext.evaluation.layout_scoring as layout_scoring
from diffusers_ext.evaluation.evaluate import main
from diffusers_ext.generation import phrase_dim
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_detectors import save_tiny_owlv2
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline, tiny_clip_tokenizer, tiny_sd_pipeline
from vlext.toyworld import write_grounding_jsonl

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    save_tiny_pipeline(root / "pipe", "sd")
    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32)
    with torch.no_grad():  # open gates: a fresh GLIGEN-init adapter would be an exact identity
        for fuser in adapter.fusers:
            fuser.alpha_attn.fill_(0.7)
            fuser.alpha_dense.fill_(0.7)
    adapter.save_pretrained(root / "adapter")
    data = write_grounding_jsonl(root / "data", 2)
    return root, data


def _args(root, data, out, *extra):
    return [
        "--data", str(data), "--pretrained-model", str(root / "pipe"), "--adapter", str(root / "adapter"),
        "--out", str(out), "--steps", str(STEPS), "--schedule", "none", "--batch-size", "2",
        "--detector", "toy-colour", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(setup):
    root, data = setup
    out = root / "out"
    assert main(_args(root, data, out, "--gate-scales", "0.5", "2")) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_rows_are_the_baseline_then_one_per_gate_scale_with_counts(finished):
    _, summary = finished
    rows = summary["rows"]
    assert [(r["setting"], r["adapter"], r["gate_scale"]) for r in rows] == [
        ("baseline", False, None),
        ("gate_0.5", True, 0.5),
        ("gate_2", True, 2.0),
    ]
    for r in rows:
        assert r["n_images"] == 2 and r["n_objects"] == 5  # toy rows 0 and 1 hold 3 + 2 objects
        assert 0.0 <= r["mean_iou"] <= 1.0 and 0.0 <= r["share_iou_gt_0.5"] <= 1.0
        assert 0.0 <= r["ap"] <= 1.0 and 0.0 <= r["ap50"] <= 1.0
        assert r["clip_score"] is None and r["fid"] is None
    assert any("CLIP score skipped" in n for n in summary["notes"])
    assert any("FID skipped" in n for n in summary["notes"])


def test_it_writes_per_image_results_a_table_and_a_grid(finished):
    out, _ = finished
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["row"], r["seed"]) for r in lines] == [
        (s, i, 0) for s in ("baseline", "gate_0.5", "gate_2") for i in (0, 1)
    ]
    assert all(len(r["objects"]) == len(r["where"] and r["objects"]) for r in lines)
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| setting |") and [t.split("|")[1].strip() for t in table[2:]] == [
        "baseline",
        "gate_0.5",
        "gate_2",
    ]
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (256 + 4), 3 * (256 + 4 + 20))


def test_baseline_is_the_plain_pipeline_and_the_adapter_changes_the_image(setup, finished):
    from diffusers import DiffusionPipeline

    root, data = setup
    out, _ = finished
    row = json.loads(Path(data).read_text().splitlines()[0])
    pipe = DiffusionPipeline.from_pretrained(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(
        prompt=[row["caption"]], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(0)]
    )
    plain = np.asarray(plain.images[0], dtype=np.int16)
    baseline = np.asarray(Image.open(out / "images" / "baseline" / "000000_s0.png"), dtype=np.int16)
    grounded = np.asarray(Image.open(out / "images" / "gate_2" / "000000_s0.png"), dtype=np.int16)
    assert np.abs(plain - baseline).max() <= 1
    assert np.abs(grounded - baseline).mean() > 1.0


def test_resume_after_a_crash_skips_finished_images_and_gives_identical_rows(setup, finished, monkeypatch):
    root, data = setup
    out = root / "crashed"
    real, calls = layout_scoring.score_image, []

    def crash_on_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(layout_scoring, "score_image", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(root, data, out, "--gate-scales", "0.5", "2"))
    monkeypatch.setattr(layout_scoring, "score_image", real)
    done = sorted(p.relative_to(out / "records") for p in (out / "records").rglob("*.json"))
    assert [str(p) for p in done] == [
        "baseline/000000_s0.json",
        "baseline/000001_s0.json",
        "gate_0.5/000000_s0.json",
    ]
    stamps = {p: (out / "records" / p).stat().st_mtime_ns for p in done}
    assert not (out / "summary.json").exists()

    assert main(_args(root, data, out, "--gate-scales", "0.5", "2")) == 0
    assert {p: (out / "records" / p).stat().st_mtime_ns for p in done} == stamps
    assert json.loads((out / "summary.json").read_text())["rows"] == finished[1]["rows"]


def test_a_rerun_with_other_settings_in_the_same_folder_is_refused(setup, finished, capsys):
    root, data = setup
    out, _ = finished
    before = sorted((out / "images").rglob("*.png"))
    args = _args(root, data, out, "--gate-scales", "0.5", "2")
    args[args.index("--steps") + 1] = "3"
    assert main(args) == 2
    assert "holds results of a different run (steps: 2 before, 3 now)" in capsys.readouterr().err
    assert sorted((out / "images").rglob("*.png")) == before


def test_an_adapter_for_another_pipeline_is_refused_before_generation(setup, tmp_path, capsys):
    root, data = setup
    pipe = tiny_sd_pipeline()
    SpatialAdapter.for_unet(pipe.unet, phrase_dim=64, hidden_dim=32).save_pretrained(tmp_path / "sdxl_like")
    args = _args(root, data, tmp_path / "out")
    args[args.index("--adapter") + 1] = str(tmp_path / "sdxl_like")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "64-d phrase features" in err and "32-d" in err
    assert not (tmp_path / "out" / "images").exists()


def _tiny_clip_folder(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer(max_length=77)
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


class _MeanColour(torch.nn.Module):
    """A 6-d FID feature: mean and std of each colour channel."""

    def forward(self, x):
        x = x.float() / 255.0
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_tiny_owlv2_detector_with_clip_score_and_fid_from_local_files(setup, tmp_path):
    root, data = setup
    owl = save_tiny_owlv2(tmp_path / "owlv2")
    clip = _tiny_clip_folder(tmp_path / "clip")
    torch.jit.save(torch.jit.script(_MeanColour()), tmp_path / "features.pt")
    args = _args(root, data, tmp_path / "out", "--gate-scales", "1", "--seeds", "0", "1", "--clip-model", str(clip),
                 "--fid-features", str(tmp_path / "features.pt"))  # fmt: skip
    args[args.index("--detector") + 1] = str(owl)
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["setting"] for r in summary["rows"]] == ["baseline", "gate_1"]
    for r in summary["rows"]:
        assert r["n_images"] == 4 and r["n_detected"] == r["n_objects"] == 10
        assert 0.0 <= r["clip_score"] <= 1.0
        assert r["fid"] is not None and np.isfinite(r["fid"]) and r["fid"] >= 0.0
    assert summary["detector"] == str(owl) and summary["notes"] == []
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert len(record["detections"]) == 10 * len(record["objects"])


def test_help_runs_from_another_directory_and_the_module_imports_no_torch(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "diffusers_ext.evaluation.evaluate", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and "--gate-scales" in run.stdout and "--fid-features" in run.stdout
    # the command's own module defers torch/diffusers to main(); loaded alone it imports neither
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('ev', {str(REPO / 'diffusers_ext' / 'evaluation' / 'evaluate.py')!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._parser(); "
        "print(sorted(k for k in ('torch', 'diffusers', 'transformers') if k in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == "[]"


@pytest.mark.parametrize("kind, lang", [("sdxl", "en"), ("kolors", "zh")])
def test_sdxl_and_kolors_pipelines_run_end_to_end(tmp_path, kind, lang):
    from diffusers import DiffusionPipeline

    save_tiny_pipeline(tmp_path / "pipe", kind)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe), hidden_dim=32).save_pretrained(
        tmp_path / "ad"
    )
    data = write_grounding_jsonl(tmp_path / "data", 1, lang=lang)  # Kolors: Chinese captions and phrases
    args = [
        "--data", str(data), "--pretrained-model", str(tmp_path / "pipe"), "--adapter", str(tmp_path / "ad"),
        "--out", str(tmp_path / "out"), "--steps", "2", "--schedule", "none", "--detector", "toy-colour",
        "--gate-scales", "1",
    ]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]
    assert [(r["setting"], r["n_images"]) for r in rows] == [("baseline", 1), ("gate_1", 1)]
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert record["objects"][0]["phrase"] == json.loads(data.read_text().splitlines()[0])["phrases"][0]


def test_the_command_runs_as_a_user_runs_it_with_relative_paths(setup):
    root, _ = setup
    cmd = [
        sys.executable, "-m", "diffusers_ext.evaluation.evaluate", "--data", "data/grounding.en.jsonl", "--pretrained-model",
        "pipe", "--adapter", "adapter", "--out", "relative_out", "--detector", "toy-colour", "--steps", "1",
        "--schedule", "none", "--limit", "1", "--gate-scales", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| baseline | 1 |" in run.stdout and "| gate_1 | 1 |" in run.stdout
    summary = json.loads((root / "relative_out" / "summary.json").read_text())
    assert summary["run"]["data"] == str((root / "data" / "grounding.en.jsonl").resolve())
