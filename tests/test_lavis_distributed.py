"""Distributed blip2_cir_align_prompt on CPU (gloo): cross-rank negatives, and LAVIS's runner under torchrun."""

import os

import pytest
import torch
from lavis_helpers import CFG, launch
from lavis_inprocess import train
from omegaconf import OmegaConf
from ranks import run_forked_ranks

import lavis_ext  # noqa: F401  (registers the model)
from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt

CAPTIONS = [
    "make the red circle larger",
    "remove the green star",
    "turn the blue square into a star",
    "add a yellow triangle",
]
WORLD = 2


def tiny_model(**overrides):
    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("tiny")).model
    for key, value in overrides.items():
        cfg[key] = value
    torch.manual_seed(0)
    return Blip2QformerCirAlignPrompt.from_config(cfg).eval()  # eval: no dropout, ranks comparable


def full_batch():
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(len(CAPTIONS), 3, 32, 32, generator=g),
        "target": torch.randn(len(CAPTIONS), 3, 32, 32, generator=g),
        "text_input": CAPTIONS,
    }


def _gather_worker(rank, store, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        data = full_batch()
        per_rank = len(CAPTIONS) // WORLD
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        local = {"image": data["image"][mine], "target": data["target"][mine], "text_input": CAPTIONS[mine]}
        results = {}
        for gather in (True, False):
            model = tiny_model(gather_negatives=gather)
            out = model(local)
            out["loss"].backward()
            grad = model.vision_proj.weight.grad.clone()
            torch.distributed.all_reduce(grad)  # what DDP does, before dividing by the world size
            results[gather] = {
                **{k: v.detach() for k, v in out.items()},
                "vision_proj_grad": grad / WORLD,
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def gather_run(tmp_path_factory):
    return run_forked_ranks(_gather_worker, tmp_path_factory.mktemp("gather"), WORLD)


@pytest.fixture(scope="module")
def single_process():
    model = tiny_model()
    out = model(full_batch())
    out["loss"].backward()
    return {**{k: v.detach() for k, v in out.items()}, "vision_proj_grad": model.vision_proj.weight.grad}


@pytest.mark.parametrize("key", ["loss_itc", "loss_rtc", "loss"])
def test_gathered_negatives_give_the_single_process_loss_of_the_concatenated_batch(
    gather_run, single_process, key
):
    mean_over_ranks = sum(rank[True][key] for rank in gather_run) / WORLD
    assert torch.allclose(mean_over_ranks, single_process[key], atol=1e-6)
    # in-batch negatives only (SPRC) see half the targets: a different, smaller-task loss
    in_batch = sum(rank[False][key] for rank in gather_run) / WORLD
    if key != "loss_align":
        assert not torch.allclose(in_batch, single_process[key], atol=1e-4)


def test_gradient_flows_to_other_ranks_targets(gather_run, single_process):
    """vision_proj only sees targets, so its gradient matches only if other ranks' targets pass gradient back."""
    for rank in gather_run:
        assert torch.allclose(rank[True]["vision_proj_grad"], single_process["vision_proj_grad"], atol=1e-6)
        assert not torch.allclose(
            rank[False]["vision_proj_grad"], single_process["vision_proj_grad"], atol=1e-4
        )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _val_metrics(output_dir):
    import json
    from pathlib import Path

    (job,) = list(Path(output_dir).iterdir())
    lines = [json.loads(line) for line in (job / "evaluate.txt").read_text().splitlines()]
    assert [line["split"] for line in lines] == ["val"]
    return job, lines[0]


def test_torchrun_two_processes_train_and_evaluate_like_one_process(tmp_path):
    """2 gloo ranks train through lavis_ext.train and rank the gathered gallery; evaluating the saved
    checkpoint in one process on the same data gives the same recall numbers."""
    import sys

    from vlext.toyworld import write_cirr

    data = write_cirr(tmp_path / "cirr_dataset", 32, 12, 6, seed=0, image_size=32)
    common = [f"datasets.cirr.build_info.root={data}", "run.batch_size_train=4", "run.batch_size_eval=5"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    log = launch(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        + ["-m", "lavis_ext.train", "--cfg-path", str(CFG), "--options", *common]
        + [f"run.output_dir={tmp_path / 'ddp'}"],
        timeout=400,
    )
    # 32 triplets, 4 per rank: 4 steps with two ranks sharing the data (8 in one process)
    assert "Start training epoch 0, 4 iters per inner epoch" in log, log[-2000:]
    # LAVIS's batch is per GPU: the log names the global batch and how the run differs from one process
    assert (
        "batch: 4 per GPU x world size 2 = global batch 8; 4 steps/epoch over 32 training triplets; 8 contrastive "
        "negatives per query. This differs from the recipe on one process" in log
    ), log[-3000:]
    assert "an epoch has 4 steps instead of 8" in log
    job, ddp = _val_metrics(tmp_path / "ddp")
    checkpoint = job / "checkpoint_best.pth"
    assert checkpoint.is_file(), f"no best checkpoint (agg_metrics {ddp['agg_metrics']})"

    # one process: in this one (the property is the numbers, not the launch; saves a 20 s import)
    _, log = train(
        *common,
        f"run.output_dir={tmp_path / 'single'}",
        "run.evaluate=True",
        "model.load_finetuned=True",
        f"model.finetuned={checkpoint}",
        cfg=CFG,
    )
    assert f"loaded checkpoint {checkpoint}".lower() in log.lower(), log[-2000:]
    _, single = _val_metrics(tmp_path / "single")
    keys = [k for k in ddp if k.startswith("recall") or k in ("r_mean", "agg_metrics")]
    assert len(keys) == 9
    assert {k: ddp[k] for k in keys} == pytest.approx({k: single[k] for k in keys}, abs=1e-9)
