"""``python -m lavis_ext.train --cfg-path X [--options k=v ...]``: LAVIS's train.py with our registrations.

LAVIS's ``train.py`` is not part of the ``salesforce-lavis`` wheel; this is the same flow (config, distributed
init, seeds, logger, task, datasets, model, runner) written against the wheel's public pieces, after
``import lavis_ext`` has applied the compatibility shims and registered the model, builders and task. Every
LAVIS run option works: training, ``run.evaluate: True``, ``run.resume_ckpt_path``, best-checkpoint selection
by ``agg_metrics``, and launch under ``torchrun`` (gloo on CPU). Before anything is built the config is
checked (:mod:`lavis_ext.config_check`: unknown keys refused, relative paths made absolute against the
working directory, evaluation of random weights refused), and ``runner_base`` is replaced by
:class:`lavis_ext.runner.SafeRunner` (unique run folders, atomic checkpoints, complete resume).

Nothing heavy is imported before the arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse

__all__ = ["main", "parse_args"]

_EPILOG = """\
Relative paths in the YAML and --options (run.output_dir, run.resume_ckpt_path, model.finetuned,
model.pretrained, datasets.*.build_info.root) are relative to the current working directory.
run.resume_ckpt_path=latest resumes from the newest readable checkpoint under run.output_dir.
run.evaluate=True evaluates run.resume_ckpt_path or model.finetuned; it refuses random weights.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lavis_ext.train",
        description="Train or evaluate a LAVIS model (with lavis_ext registered)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cfg-path", required=True, help="path to the project YAML")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override config entries, e.g. run.max_epoch=2 model.use_gated_fusion=True (LAVIS's syntax)",
    )
    return parser.parse_args(argv)


def _setup_seeds(config) -> None:
    import random

    import numpy as np
    import torch
    from lavis.common.dist_utils import get_rank

    seed = config.run_cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _single_process_group() -> None:
    """LAVIS's runner calls ``dist.barrier()`` after every epoch even when not distributed (its GPU users
    always launch with torchrun); a one-process gloo group makes a plain ``python -m`` run work too."""
    import torch

    if torch.distributed.is_initialized():
        return
    # An in-memory store: a file store left a lavis_ext_pg_* folder in the temp directory after every run.
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)


def _log_batch_plan(plan: dict, cfg, datasets) -> None:
    """Name per-GPU batch, world size, global batch and steps per epoch (a warning when they differ from the
    same config on one process): LAVIS's batch_size_train is per GPU and nothing said so."""
    import logging

    from lavis_ext.batch_plan import describe_batch_plan

    run = cfg.run_cfg
    splits = run.get("train_splits") or []
    if run.get("evaluate", False) or not splits or plan["per_gpu"] is None:
        return
    n_train = sum(len(d[s]) for d in datasets.values() for s in splits if s in d)
    # LAVIS's loader: a DistributedSampler (ceil(n / world) per rank) and drop_last for training. Computed,
    # not read from runner.train_loader: building it here would draw its shuffle seed before a resume
    # restores the RNG states.
    per_rank = -(-n_train // plan["world_size"])
    steps = per_rank // plan["per_gpu"]
    line, differs = describe_batch_plan(
        plan, steps, n_train, bool(cfg.model_cfg.get("gather_negatives", True))
    )
    (logging.warning if differs else logging.info)(line)


def main(argv=None):
    import logging
    from pathlib import Path

    args = parse_args(argv)
    if not Path(args.cfg_path).is_file():
        raise FileNotFoundError(f"--cfg-path {args.cfg_path!r} is not a file")

    # Shims, then our registrations, before anything of LAVIS runs (``import lavis_ext`` does the same; done
    # here explicitly so that this module never depends on the package having been imported eagerly).
    from lavis_ext import compat

    compat.apply()
    import lavis_ext.datasets  # noqa: F401
    import lavis_ext.models  # noqa: F401
    import lavis_ext.processors  # noqa: F401
    import lavis_ext.tasks  # noqa: F401
    from lavis_ext import config_check
    from lavis_ext.runner import SafeRunner, claim_run_folder, new_job_id

    user_cfg = config_check.load_user_config(args.cfg_path, args.options)
    config_check.check_keys(user_cfg)

    import lavis.common.optims  # noqa: F401  (registers the lr schedulers, as LAVIS's train.py does)
    import lavis.tasks as tasks
    from lavis.common.config import Config
    from lavis.common.dist_utils import init_distributed_mode
    from lavis.common.logger import setup_logger
    from lavis.common.registry import registry

    cfg = Config(args)
    resolved = config_check.resolve_paths(cfg.config, user_cfg, Path.cwd())
    evaluation = config_check.check_evaluation(cfg.config, user_cfg)
    config_check.check_run_values(cfg.config, user_cfg)

    init_distributed_mode(cfg.run_cfg)
    from lavis.common.dist_utils import get_world_size

    from lavis_ext.batch_plan import apply_batch_plan

    # before anything is built: a global batch the world size does not divide is refused here
    plan = apply_batch_plan(cfg.run_cfg, get_world_size() if cfg.run_cfg.distributed else 1)
    if not cfg.run_cfg.distributed:
        _single_process_group()
    _setup_seeds(cfg)
    setup_logger()
    for key, value in resolved.items():
        logging.info(f"{key} -> {value} (relative paths are relative to the working directory)")
    if evaluation:
        logging.info(f"run.evaluate=True: {evaluation}")
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    # The runner registers its output paths and the registry refuses a second registration; clear the
    # previous run's so that main() can run more than once in one process (the demo trains twice).
    for name in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(name, None)
    runner_name = cfg.run_cfg.get("runner", "runner_base")
    # runner_safe is runner_base's loop with unique folders, atomic checkpoints and complete resume.
    runner_cls = SafeRunner if runner_name == "runner_base" else registry.get_runner_class(runner_name)
    job_id = claim_run_folder(cfg.run_cfg.output_dir, str(cfg.run_cfg.get("job_id", new_job_id())))
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    _log_batch_plan(plan, cfg, datasets)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
