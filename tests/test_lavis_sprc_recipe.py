"""SPRC's training recipe by config: the one-cycle schedule follows torch's OneCycleLR step for step, and the
SPRC project YAMLs train through LAVIS's runner with it."""

import math
import re

import pytest
import torch
from lavis_helpers import ROOT
from lavis_inprocess import train
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (registers the scheduler)
from lavis_ext.optim import OneCycleLRScheduler

PROJECTS = ROOT / "lavis_ext" / "projects"


def adamw(betas=(0.9, 0.98)):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0, betas=betas, eps=1e-7)


@pytest.mark.parametrize(
    ("epochs", "trained", "iters", "pct_start", "div_factor"),
    [
        (80, 50, 7, 1 / 50, 25.0),  # SPRC CIRR: an 80-epoch cycle, 50 epochs trained
        (30, 30, 9, 1.5 / 30, 100.0),  # SPRC FashionIQ
        (4, 4, 5, 0.3, 25.0),  # torch's defaults
    ],
)
def test_one_cycle_follows_torch_onecyclelr_per_step(epochs, trained, iters, pct_start, div_factor):
    reference = adamw()
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(
        reference,
        max_lr=1e-5,
        epochs=epochs,
        steps_per_epoch=iters,
        pct_start=pct_start,
        div_factor=div_factor,
    )
    ours = OneCycleLRScheduler(adamw(), max_epoch=trained, init_lr=1e-5, min_lr=0)
    run_cfg = OmegaConf.create(
        {"one_cycle_pct_start": pct_start, "one_cycle_div_factor": div_factor, "one_cycle_epochs": epochs}
    )
    worst_lr = worst_beta = 0.0
    for epoch in range(trained):
        ours.start_epoch(iters, run_cfg)
        for step in range(iters):
            ours.step(
                epoch, step
            )  # LAVIS sets the lr before the batch; torch has stepped epoch*iters+step times
            group, expected = ours.optimizer.param_groups[0], reference.param_groups[0]
            worst_lr = max(worst_lr, abs(group["lr"] - expected["lr"]) / expected["lr"])
            worst_beta = max(worst_beta, abs(group["betas"][0] - expected["betas"][0]))
            assert group["betas"][1] == 0.98
            reference.step()
            torch_sched.step()
    assert worst_lr < 1e-12 and worst_beta < 1e-12


def test_one_cycle_without_momentum_keeps_the_configured_beta1():
    sched = OneCycleLRScheduler(adamw(), max_epoch=2, init_lr=1e-3)
    sched.start_epoch(3, OmegaConf.create({"one_cycle_momentum": False}))
    sched.step(1, 2)
    assert sched.optimizer.param_groups[0]["betas"] == (0.9, 0.98)


def test_one_cycle_refuses_to_step_without_the_epoch_length():
    with pytest.raises(RuntimeError, match="does not know the epoch length"):
        OneCycleLRScheduler(adamw(), max_epoch=2, init_lr=1e-3).step(0, 0)


def test_one_cycle_shorter_than_training_is_refused():
    sched = OneCycleLRScheduler(adamw(), max_epoch=50, init_lr=1e-5)
    with pytest.raises(ValueError, match=r"one_cycle_epochs \(40\) must be >= run.max_epoch \(50\)"):
        sched.start_epoch(10, OmegaConf.create({"one_cycle_epochs": 40}))


@pytest.mark.parametrize(
    ("name", "lr", "epochs", "cycle", "pct_start", "div_factor", "loss_weights"),
    [
        ("cirr_sprc.yaml", 1e-5, 50, 80, 1 / 50, 25.0, 0.4),
        ("fashioniq_sprc.yaml", 2e-5, 30, 30, 1.5 / 30, 100.0, 1.0),
    ],
)
def test_sprc_projects_state_sprcs_published_recipe(
    name, lr, epochs, cycle, pct_start, div_factor, loss_weights
):
    cfg = OmegaConf.load(PROJECTS / name)
    run = cfg.run
    assert (run.lr_sched, run.init_lr, run.max_epoch, run.one_cycle_epochs) == (
        "one_cycle_lr",
        lr,
        epochs,
        cycle,
    )
    assert run.one_cycle_pct_start == pytest.approx(pct_start) and run.one_cycle_div_factor == div_factor
    assert list(run.optimizer_betas) == [0.9, 0.98] and run.optimizer_eps == 1e-7 and run.weight_decay == 0.05
    # a global batch (SPRC's one GPU), not LAVIS's per-GPU key, with every rank's targets as negatives
    assert run.batch_size_train_global == 128 and "batch_size_train" not in run
    assert cfg.model.gather_negatives is True
    assert cfg.model.loss_rtc == cfg.model.loss_align == loss_weights


TINY = [
    "run.device=cpu",
    "run.amp=False",
    "run.distributed=False",
    "run.num_workers=0",
    "run.batch_size_train_global=8",
    "run.batch_size_eval=16",
    "run.max_epoch=2",
    "run.one_cycle_epochs=3",
]


def with_tiny_model(project, folder):
    """A copy of the project YAML with ``model_type: tiny``, so the file the run reads names the model it builds
    (``--options model.model_type=tiny`` does the same since lavis_ext.compat honours it)."""
    cfg = OmegaConf.load(project)
    cfg.model.model_type = "tiny"
    path = folder / project.name
    OmegaConf.save(cfg, path)
    return path


def _toy_data(dataset, folder):
    from vlext.toyworld import write_cirr, write_fashioniq

    if dataset == "cirr":
        return write_cirr(folder / "cirr_dataset", 32, 12, 6, seed=0, image_size=32)
    return write_fashioniq(folder / "fashionIQ_dataset", 8, seed=0, image_size=32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "project, dataset, peak_lr, pct_start, div_factor",
    [("cirr_sprc.yaml", "cirr", 1e-5, 0.02, 25.0), ("fashioniq_sprc.yaml", "fashioniq", 2e-5, 0.05, 100.0)],
)
def test_sprc_yaml_trains_tiny_through_the_runner_with_the_one_cycle_schedule(
    tmp_path, project, dataset, peak_lr, pct_start, div_factor
):
    from lavis_ext.optim import one_cycle_lr, one_cycle_momentum

    data = _toy_data(dataset, tmp_path)
    out = tmp_path / "run"
    _, log = train(  # in this process: what the runner computes and saves, not how it is launched
        *TINY,
        f"datasets.{dataset}.build_info.root={data}",
        f"datasets.{dataset}.vis_processor.train.image_size=32",
        f"datasets.{dataset}.vis_processor.eval.image_size=32",
        f"run.output_dir={out}",
        cfg=with_tiny_model(PROJECTS / project, tmp_path),
    )
    iters = int(re.search(r"Start training epoch 0, (\d+) iters", log).group(1))
    assert "Start training epoch 1" in log
    (job,) = list(out.iterdir())
    checkpoints = sorted(job.glob("checkpoint_*.pth"))
    assert checkpoints, f"no checkpoint in {job}"
    for path in checkpoints:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        group = saved["optimizer"]["param_groups"][0]
        last_step = (saved["epoch"] + 1) * iters - 1  # the lr the last batch of that epoch trained with
        total = 3 * iters
        expected_lr = one_cycle_lr(last_step, total, peak_lr, pct_start, div_factor, 1e4)
        assert group["lr"] == pytest.approx(expected_lr, rel=1e-9)
        assert group["betas"][0] == pytest.approx(one_cycle_momentum(last_step, total, pct_start), rel=1e-9)
        assert group["betas"][1] == 0.98 and group["eps"] == 1e-7 and group["weight_decay"] == 0.05
    assert math.isfinite(float(re.findall(r"loss: ([0-9.]+)", log)[-1]))
