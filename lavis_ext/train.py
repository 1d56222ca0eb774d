"""``python -m lavis_ext.train --cfg-path X [--options k=v ...]``: LAVIS's train.py with our registrations.

LAVIS's ``train.py`` is not part of the ``salesforce-lavis`` wheel; this is the same flow (config, distributed
init, seeds, logger, task, datasets, model, runner) written against the wheel's public pieces, after
``import lavis_ext`` has applied the compatibility shims and registered the model, builders and task. Every
LAVIS run option therefore works: training, ``run.evaluate: True``, ``run.resume_ckpt_path``, best-checkpoint
selection by ``agg_metrics``, and launch under ``torchrun`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

import lavis_ext  # noqa: F401  (shims + registrations, before anything of LAVIS runs)

__all__ = ["main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train or evaluate a LAVIS model (with lavis_ext registered)"
    )
    parser.add_argument("--cfg-path", required=True, help="path to the project YAML")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override config entries, e.g. run.max_epoch=2 model.use_gated_fusion=True (LAVIS's syntax)",
    )
    return parser.parse_args(argv)


def _setup_seeds(config) -> None:
    from lavis.common.dist_utils import get_rank

    seed = config.run_cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _single_process_group() -> None:
    """LAVIS's runner calls ``dist.barrier()`` after every epoch even when not distributed (its GPU users
    always launch with torchrun); a one-process gloo group makes a plain ``python -m`` run work too."""
    import os
    import tempfile

    if torch.distributed.is_initialized():
        return
    store = os.path.join(tempfile.mkdtemp(prefix="lavis_ext_pg_"), "store")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def main(argv=None):
    from pathlib import Path

    import lavis.common.optims  # noqa: F401  (registers the lr schedulers, as LAVIS's train.py does)
    import lavis.tasks as tasks
    from lavis.common.config import Config
    from lavis.common.dist_utils import init_distributed_mode
    from lavis.common.logger import setup_logger
    from lavis.common.registry import registry
    from lavis.common.utils import now

    args = parse_args(argv)
    if not Path(args.cfg_path).is_file():
        raise FileNotFoundError(f"--cfg-path {args.cfg_path!r} is not a file")
    cfg = Config(args)
    init_distributed_mode(cfg.run_cfg)
    if not cfg.run_cfg.distributed:
        _single_process_group()
    _setup_seeds(cfg)
    setup_logger()
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    # The runner registers its output paths and the registry refuses a second registration; clear the
    # previous run's so that main() can run more than once in one process (the demo trains twice).
    for name in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(name, None)
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
    runner = runner_cls(
        cfg=cfg, job_id=cfg.run_cfg.get("job_id", now()), task=task, model=model, datasets=datasets
    )
    runner.train()
    return runner


if __name__ == "__main__":
    main()
