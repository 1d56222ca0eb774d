"""``python -m diffusers_ext.training.train_spatial_adapter --help`` answers at once: the trainer imports only the
standard library before its arguments are parsed (torch and diffusers load inside ``train``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

CMD = [sys.executable, "-X", "importtime", "-m", "diffusers_ext.training.train_spatial_adapter", "--help"]


def _help(tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(
        CMD,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, time.perf_counter() - start


def _imported(stderr: str) -> set[str]:
    """Top-level package names from ``-X importtime`` lines: ``import time: self | cumulative | name``."""
    return {
        m.group(1).strip().split(".")[0]
        for m in re.finditer(r"^import time:[^|]*\|[^|]*\|\s*(\S+)", stderr, re.M)
    }


def test_help_lists_the_run_folder_and_data_options(tmp_path):
    result, _ = _help(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in (
        "--resume",
        "--overwrite",
        "--skip-bad-images",
        "--mixed-precision",
        "--gradient-checkpointing",
    ):
        assert flag in result.stdout
    assert "'latest'" in result.stdout


def test_help_loads_neither_torch_nor_diffusers_and_answers_within_seconds(tmp_path):
    result, seconds = _help(tmp_path)
    assert result.returncode == 0
    loaded = _imported(result.stderr)
    assert "argparse" in loaded  # the importtime listing was read
    assert not {"torch", "diffusers", "transformers"} & loaded
    assert seconds < 10
