"""Evaluate a release in one command: ``cirr_eval.yaml`` loads an SPRC-format checkpoint through
``model.finetuned``, prints val recalls and writes the CIRR test1 submission files."""

import json

import pytest
import torch
from lavis_helpers import ROOT, run_train
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401
from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt

TINY_EVAL = [
    "run.device=cpu",
    "run.amp=False",
    "run.distributed=False",
    "run.num_workers=0",
    "run.batch_size_eval=16",
    "datasets.cirr.vis_processor.eval.image_size=32",
    "datasets.cirr.vis_processor.train.image_size=32",
]


@pytest.mark.slow
def test_cirr_eval_yaml_evaluates_an_sprc_release_and_writes_submissions(tmp_path):
    from vlext.toyworld import write_cirr

    data = write_cirr(tmp_path / "cirr_dataset", 8, 12, 10, seed=0, image_size=32)
    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("tiny")).model
    torch.manual_seed(5)
    state = Blip2QformerCirAlignPrompt.from_config(cfg).state_dict()
    release = tmp_path / "sprc_cirr.pt"
    torch.save({"epoch": 49, "Blip2QformerCirAlignPrompt": state}, release)

    # a copy of the project with the tiny model type, so the file the run reads names the model it builds
    project = OmegaConf.load(ROOT / "lavis_ext" / "projects" / "cirr_eval.yaml")
    project.model.model_type = "tiny"
    tiny_project = tmp_path / "cirr_eval.yaml"
    OmegaConf.save(project, tiny_project)
    out = tmp_path / "eval"
    log = run_train(
        *TINY_EVAL,
        f"model.finetuned={release}",
        f"datasets.cirr.build_info.root={data}",
        f"run.output_dir={out}",
        cfg=tiny_project,
        timeout=900,
    )
    assert f"loaded checkpoint {release} (sprc layout)" in log
    (job,) = list(out.iterdir())
    (line,) = (job / "evaluate.txt").read_text().splitlines()
    metrics = json.loads(line)
    assert metrics["split"] == "val"
    assert {"recall_at_1", "recall_at_5", "recall_subset_at_1", "agg_metrics"} <= set(metrics)
    assert f"'recall_at_5': {metrics['recall_at_5']}" in log  # printed, not only written
    assert not list(job.glob("checkpoint_*.pth"))  # evaluating writes no checkpoint
    recall = json.loads((job / "result" / "recall_submission_test.json").read_text())
    subset = json.loads((job / "result" / "recall_subset_submission_test.json").read_text())
    assert recall.pop("version") == subset.pop("version") == "rc2"
    assert recall.pop("metric") == "recall" and subset.pop("metric") == "recall_subset"
    assert len(recall) == len(subset) == 10
    assert all(len(names) == 3 for names in subset.values())
