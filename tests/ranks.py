"""Starting the ranks of a two-process test: forked workers (lavis) or torchrun on a test file (clip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_forked_ranks(worker, out_dir: Path, world: int, *args) -> list:
    """``worker(rank, store, out_dir, *args)`` in ``world`` forked processes; each rank's ``rank<r>.pt``.

    Fork: the children inherit the imported host (no 20 s re-import); a ``file://`` store under ``out_dir``:
    no port to pick. A one-process group left by an earlier in-process test would be inherited by the
    forked ranks, so it is destroyed first.
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    torch.multiprocessing.start_processes(
        worker, args=(str(out_dir / "store"), str(out_dir), *args), nprocs=world, start_method="fork"
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def torchrun_test_file(test_file: str, out_dir: Path, nproc: int = 2, timeout: int = 300) -> None:
    """Run ``test_file`` as a script under ``torchrun --standalone`` with ``CLIP_EXT_DIST_OUT=out_dir``
    and one thread per rank (as torchrun gives each rank); fails the test with the ranks' stderr."""
    env = {**os.environ, "CLIP_EXT_DIST_OUT": str(out_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    result = subprocess.run(
        [*cmd, str(Path(test_file).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
