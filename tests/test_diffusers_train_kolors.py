"""Kolors as a user runs it: a Kolors-layout pipeline folder (ChatGLM text encoder, built offline) trained by
``train_spatial_adapter`` on toy-world rows with Chinese captions and phrases, then ``generate`` with
Chinese phrases on the trained adapter."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import KolorsPipeline

from diffusers_ext import load_spatial_adapter
from diffusers_ext.generation import encode_phrases, generate
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training.train_spatial_adapter import train
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)
HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.slow
def test_kolors_trains_on_chinese_layouts_and_generates_with_chinese_phrases(tmp_path):
    jsonl = write_grounding_jsonl(tmp_path / "data", 4, seed=0, image_size=64, lang="zh")
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    row = max(rows, key=lambda r: len(r["phrases"]))
    assert len(row["phrases"]) >= 2
    assert HAN.search(row["caption"]) and all(HAN.search(p) for p in row["phrases"])
    model = save_tiny_pipeline(tmp_path / "kolors", "kolors")
    out = tmp_path / "run"
    result = train(["--mixed-data", str(jsonl), "--pretrained-model", str(model), "--output-dir", str(out),
                    "--batch-size", "2", "--hidden-dim", "32", "--lr", "1e-2", "--max-train-steps", "2",
                    "--box-dropout", "0", "--caption-dropout", "0"])  # fmt: skip
    assert result["steps"] == 2 and all(np.isfinite(result["losses"]))

    pipe = KolorsPipeline.from_pretrained(model)
    adapter = load_spatial_adapter(pipe, out / "adapter")  # installs it, as a user loads it
    assert adapter.config.phrase_dim == pipe.text_encoder.config.hidden_size  # ChatGLM's width
    assert torch.stack([f.gates() for f in adapter.fusers]).abs().max() > 0  # trained: the gates opened
    features = encode_phrases(pipe, row["phrases"])
    assert torch.cdist(features, features).fill_diagonal_(1.0).min() > 0  # each Chinese phrase its own vector
    run = {"num_inference_steps": 2, "schedule": None, "max_sequence_length": 16, "output_type": "np"}
    images = {
        scale: generate(
            pipe,
            adapter,
            row["caption"],
            row["phrases"],
            row["boxes"],
            gate_scale=scale,
            generator=torch.Generator().manual_seed(0),
            **run,
        ).images  # fmt: skip
        for scale in (0.0, 1.0)
    }
    assert images[1.0].shape == (1, 64, 64, 3) and np.isfinite(images[1.0]).all()
    assert np.abs(images[1.0] - images[0.0]).max() > 1e-4  # the trained adapter moves the image
