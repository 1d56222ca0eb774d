"""``python -m lavis_ext.train --help`` answers without importing torch or LAVIS."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_module_parses_arguments_without_importing_torch_or_lavis():
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('train', 'lavis_ext/train.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "args = module.parse_args(['--cfg-path', 'x.yaml', '--options', 'run.max_epoch=2'])\n"
        "heavy = sorted(m for m in ('torch', 'lavis', 'numpy', 'transformers') if m in sys.modules)\n"
        "print(args.cfg_path, args.options, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "x.yaml ['run.max_epoch=2'] []"


def test_help_answers_in_seconds(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "lavis_ext.train", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "--cfg-path" in result.stdout and "--options" in result.stdout
    assert elapsed < 10, f"--help took {elapsed:.1f} s"
