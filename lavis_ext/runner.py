"""``runner_safe``: LAVIS's ``RunnerBase`` with what "no work lost, nothing silently wrong" needs.

``python -m lavis_ext.train`` uses it in place of ``runner_base`` (same loop, same checkpoint layout).
What it changes, each a failure seen with ``runner_base``:

- **Run folders never collide.** LAVIS names the job folder by the minute minus its last digit, so runs
  started within ten minutes shared one folder (checkpoints overwritten, logs interleaved).
  :func:`claim_run_folder` creates ``<output_dir>/<YYYYmmddHHMMSS>`` atomically (``os.mkdir``) and adds
  ``_1``, ``_2``, ... when it exists.
- **Checkpoints are crash-safe.** :func:`atomic_save` writes a temporary file, fsyncs it and renames it
  over the final name; a SIGKILL during ``torch.save`` used to leave a truncated ``checkpoint_best.pth``,
  destroying the previous best. ``checkpoint_last.pth`` is kept beside the best after every epoch.
- **Resume is complete.** Checkpoints carry ``best_agg_metric``/``best_epoch`` (LAVIS restarted them at 0,
  so the first evaluation after a resume overwrote a better best) and the RNG states, so the next epoch
  draws the same batches as an uninterrupted run. ``run.resume_ckpt_path: latest`` takes the newest
  readable checkpoint under ``run.output_dir``, skipping unreadable ones with a warning naming them.
- **Evaluation uses the weights asked for.** ``run.evaluate: True`` with ``run.resume_ckpt_path`` loads that
  checkpoint (LAVIS ignored it and evaluated the random init), and never saves ``checkpoint_best.pth``.
- **AdamW betas and eps are config keys**: ``run.optimizer_betas`` (default ``[0.9, run.beta2 or 0.999]``)
  and ``run.optimizer_eps`` (default 1e-8); SPRC trains with (0.9, 0.98) and 1e-7, LAVIS hard-codes 0.9.

Checkpoint files are read with :func:`lavis_ext.models.checkpoint_io.read_state_dict`, so a resume path may
also be an SPRC or bare state-dict file; those give weights only, and the log says so.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lavis.common.dist_utils import (
    get_world_size,
    is_dist_avail_and_initialized,
    is_main_process,
    main_process,
)
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase

from lavis_ext.models.checkpoint_io import CheckpointFormatError, read_state_dict
from vlext.atomic_files import atomic_torch_save, newest_complete

__all__ = ["SafeRunner", "atomic_save", "claim_run_folder", "find_latest_checkpoint"]

CHECKPOINT_GLOB = "checkpoint_*.pth"

logger = logging.getLogger(__name__)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name beside ``path``, fsync, then rename over ``path``
    (:func:`vlext.atomic_files.atomic_torch_save`).

    A reader (or a resume after a crash) sees either the previous complete file or the new complete one.
    """
    atomic_torch_save(obj, path, torch.save)


def new_job_id() -> str:
    """To the second: LAVIS's ``now()[:-1]`` has ten-minute resolution."""
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def claim_run_folder(output_dir: str | os.PathLike, job_id: str) -> str:
    """Create ``output_dir/job_id`` (or ``job_id_1``, ``_2``, ...) that no other run uses; return its name.

    ``os.mkdir`` fails when the folder exists, so two runs started in the same second still get two folders.
    Under torchrun rank 0 claims and the other ranks receive the name.
    """
    name = None
    if not is_dist_avail_and_initialized() or is_main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for suffix in range(10_000):
            candidate = job_id if suffix == 0 else f"{job_id}_{suffix}"
            try:
                os.mkdir(Path(output_dir) / candidate)
            except FileExistsError:
                continue
            name = candidate
            break
        else:
            raise RuntimeError(f"could not create a new run folder under {output_dir} for job {job_id}")
    if is_dist_avail_and_initialized():
        holder = [name]
        dist.broadcast_object_list(holder, src=0)
        name = holder[0]
    return name


def find_latest_checkpoint(output_dir: str | os.PathLike) -> tuple[str, dict, dict]:
    """Newest readable ``checkpoint_*.pth`` in ``output_dir`` or its job folders: ``(path, state_dict, meta)``.

    Newest by modification time (each is written by an atomic rename, so its time is its completion time);
    a file that cannot be read is skipped with a warning naming it.
    """
    root = Path(output_dir)
    candidates = [*root.glob(CHECKPOINT_GLOB), *root.glob(f"*/{CHECKPOINT_GLOB}")]
    read = {}

    def problem(path: Path) -> str | None:
        try:
            read[path] = read_state_dict(path)
        except (CheckpointFormatError, OSError, RuntimeError) as err:
            return str(err)
        return None

    found, skipped = newest_complete(candidates, problem, key=lambda p: p.stat().st_mtime)
    for path, err in skipped:
        logger.warning(f"skipping unreadable checkpoint {path}: {err}")
    if found is not None:
        return (str(found), *read[found])
    raise FileNotFoundError(
        f"run.resume_ckpt_path=latest: no readable checkpoint ({CHECKPOINT_GLOB}) in {root} or its run folders"
    )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy_state = np.random.get_state()
    state["numpy"] = [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@registry.register_runner("runner_safe")
class SafeRunner(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id):
        self.best_agg_metric = 0.0
        self.best_epoch = 0
        self._best_path: str | None = (
            None  # a best checkpoint of the run resumed from, if none of our own yet
        )
        self._rng_to_restore = None
        super().__init__(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id)

    # ------------------------------------------------------------------ output folder
    def setup_output_dir(self):
        """``run.output_dir`` as given (absolute after :func:`lavis_ext.config_check.resolve_paths`)."""
        output_dir = Path(self.config.run_cfg.output_dir).expanduser().resolve() / self.job_id
        result_dir = output_dir / "result"
        output_dir.mkdir(parents=True, exist_ok=True)
        result_dir.mkdir(parents=True, exist_ok=True)
        registry.register_path("result_dir", str(result_dir))
        registry.register_path("output_dir", str(output_dir))
        self.result_dir, self.output_dir = result_dir, output_dir
        logger.info(f"Output folder: {output_dir}")

    # ------------------------------------------------------------------ optimizer
    @property
    def optimizer(self):
        if self._optimizer is None:
            run = self.config.run_cfg
            decay, no_decay, count = [], [], 0
            for name, param in self.model.named_parameters():
                if not param.requires_grad:
                    continue
                # LAVIS's rule: no weight decay on biases, norms and other 1-d parameters
                if param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name:
                    no_decay.append(param)
                else:
                    decay.append(param)
                count += param.numel()
            logger.info(f"number of trainable parameters: {count}")
            betas = run.get("optimizer_betas")
            betas = (0.9, float(run.get("beta2", 0.999))) if betas is None else tuple(float(b) for b in betas)
            eps = float(run.get("optimizer_eps", 1e-8))
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas) or not eps > 0:
                raise ValueError(
                    f"run.optimizer_betas must be two numbers in [0, 1) and run.optimizer_eps > 0, got "
                    f"{list(betas)} and {eps}"
                )
            weight_decay = float(run.weight_decay)
            self._optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                lr=float(run.init_lr),
                weight_decay=weight_decay,
                betas=betas,
                eps=eps,
            )
        return self._optimizer

    # ------------------------------------------------------------------ the loop
    def train(self):
        start_time = time.time()
        self.log_config()
        if self.evaluate_only:
            self._load_weights_for_evaluation()
        elif self.resume_ckpt_path:
            self._load_checkpoint(self.resume_ckpt_path)
        if self._rng_to_restore is not None:
            if get_world_size() == 1:
                _set_rng_state(self._rng_to_restore)
            else:  # the checkpoint holds rank 0's generators only; every rank keeps its own seed instead
                logger.info("RNG states are restored for single-process runs only; ranks keep their seeds.")

        cur_epoch = self.start_epoch
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                logger.info("Start training")
                self.log_stats(split_name="train", stats=self.train_epoch(cur_epoch))
            for split_name in self.valid_splits:
                logger.info(f"Evaluating on {split_name}.")
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is None or not is_main_process():
                    continue
                assert "agg_metrics" in val_log, "No agg_metrics found in validation log."
                improved = val_log["agg_metrics"] > self.best_agg_metric and split_name == "val"
                if improved and not self.evaluate_only:
                    self.best_epoch, self.best_agg_metric = cur_epoch, val_log["agg_metrics"]
                    self._save_checkpoint(cur_epoch, is_best=True)
                val_log.update({"best_epoch": self.best_epoch})
                self.log_stats(val_log, split_name)
            if self.evaluate_only:
                break
            if not self.valid_splits:
                self._save_checkpoint(cur_epoch, is_best=False, name=f"checkpoint_{cur_epoch}.pth")
            self._save_checkpoint(cur_epoch, is_best=False, name="checkpoint_last.pth")
            dist.barrier()

        test_epoch = "best" if self.valid_splits and not self.evaluate_only else cur_epoch
        self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
        logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")

    # ------------------------------------------------------------------ checkpoints
    @main_process
    def _save_checkpoint(self, cur_epoch, is_best=False, name=None):
        model = self.unwrap_dist_model(self.model)
        trainable = {k: v.requires_grad for k, v in model.named_parameters()}
        # LAVIS's rule: frozen parameters come from the pretrained weights and are not saved
        state_dict = {k: v for k, v in model.state_dict().items() if trainable.get(k, True)}
        path = Path(self.output_dir) / (
            name or ("checkpoint_best.pth" if is_best else f"checkpoint_{cur_epoch}.pth")
        )
        best_path = str(Path(self.output_dir) / "checkpoint_best.pth") if is_best else self._best_checkpoint()
        save_obj = {
            "model": state_dict,
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            "best_agg_metric": float(self.best_agg_metric),
            "best_epoch": int(self.best_epoch),
            "best_path": best_path,
            "rng_state": _rng_state(),
        }
        logger.info(f"Saving checkpoint at epoch {cur_epoch} to {path}.")
        atomic_save(save_obj, path)

    def _best_checkpoint(self) -> str | None:
        own = Path(self.output_dir) / "checkpoint_best.pth"
        return str(own) if own.is_file() else self._best_path

    def _read(self, path: str) -> tuple[str, dict, dict]:
        if path == "latest":
            found = find_latest_checkpoint(self.config.run_cfg.output_dir)
            logger.info(f"run.resume_ckpt_path=latest: newest readable checkpoint is {found[0]}")
            return found
        state_dict, meta = read_state_dict(path)
        return path, state_dict, meta

    def _load_weights(self, state_dict: dict, path: str) -> None:
        result = self.unwrap_dist_model(self.model).load_state_dict(state_dict, strict=False)
        trainable = {k for k, v in self.unwrap_dist_model(self.model).named_parameters() if v.requires_grad}
        missing = sorted(set(result.missing_keys) & trainable)
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {path} does not fit the model: missing trainable {missing[:10]} "
                f"({len(missing)} in all), unexpected {result.unexpected_keys[:10]} "
                f"({len(result.unexpected_keys)} in all)"
            )

    def _load_weights_for_evaluation(self) -> None:
        if not self.resume_ckpt_path:
            return  # model.finetuned / pretrained were loaded when the model was built (LAVIS logs it)
        path, state_dict, meta = self._read(self.resume_ckpt_path)
        self._load_weights(state_dict, path)
        logger.info(f"Evaluating the weights of checkpoint {path} (epoch {meta.get('epoch', '?')}).")

    def _load_checkpoint(self, url_or_filename):
        path, state_dict, meta = self._read(url_or_filename)
        self._load_weights(state_dict, path)
        if meta.get("format") != "lavis" or "optimizer" not in meta:
            logger.info(
                f"Resume checkpoint from {path}: weights only ({meta.get('format')} format has no optimizer "
                "state); training starts at epoch 0 with a fresh optimizer."
            )
            return
        self.optimizer.load_state_dict(meta["optimizer"])
        if self.scaler and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.start_epoch = int(meta["epoch"]) + 1
        if self.start_epoch >= self.max_epoch:
            raise ValueError(
                f"checkpoint {path} finished epoch {meta['epoch']}; run.max_epoch={self.max_epoch} leaves no "
                f"epoch to train. Raise run.max_epoch above {meta['epoch'] + 1} to continue, or evaluate it "
                "with run.evaluate=True"
            )
        self.best_agg_metric = float(meta.get("best_agg_metric", 0.0))
        self.best_epoch = int(meta.get("best_epoch", 0))
        self._best_path = meta.get("best_path")
        self._rng_to_restore = meta.get("rng_state")
        logger.info(
            f"Resume checkpoint from {path} (epoch {meta['epoch']}; best agg_metrics so far "
            f"{self.best_agg_metric} at epoch {self.best_epoch})."
        )

    def _reload_best_model(self, model):
        path = self._best_checkpoint()
        if path is None or not Path(path).is_file():
            logger.warning(
                "No best checkpoint was saved (agg_metrics never rose above 0); testing the last weights."
            )
            return model
        logger.info(f"Loading checkpoint from {path}.")
        state_dict, _ = read_state_dict(path)
        self._load_weights(state_dict, path)
        return model
