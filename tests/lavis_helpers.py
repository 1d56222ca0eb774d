"""Run ``python -m lavis_ext.train`` (or torchrun) in a subprocess for the lavis tests (offline, one thread)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "lavis_ext" / "projects" / "cirr_tiny.yaml"


def launch(command, timeout, cwd=ROOT):
    """Run ``command`` (from the repository root unless ``cwd``) offline with one thread; assert it succeeds;
    return its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def run_train(*options, cfg=CFG, timeout=400):
    command = [sys.executable, "-W", "ignore", "-m", "lavis_ext.train", "--cfg-path", str(cfg), "--options"]
    return launch([*command, *options], timeout)


def build_datasets(name, root, splits, image_size=32):
    """The datasets LAVIS's registered builder ``name`` makes from ``root`` for ``splits``, images at ``image_size``."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.default_config_path()).datasets[name]
    cfg.build_info.root = str(root)
    cfg.build_info.splits = splits
    for split in ("train", "eval"):
        cfg.vis_processor[split].image_size = image_size
    return cls(cfg).build_datasets()
