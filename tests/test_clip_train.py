"""clip_ext.train: open_clip's own trainer with our flags (in-process runs of its main on toy-world CSVs;
``--help`` as a subprocess, since it is about what the command imports)."""

import math
import re
import subprocess
import sys
import time

import pytest
import torch
from test_clip_open_clip_compat import assert_same_names, run_ours

import clip_ext.train as clip_train
from clip_ext.logit_scale import FROM_SCRATCH, init_logit_scale
from clip_ext.memory_bank import BankStateError
from clip_ext.region_data import load_region_table
from clip_ext.train import extra_parser, parse_args
from vlext.toyworld import write_clip_csv

OUR_FLAGS = ["--memory-bank-size", "--memory-bank-warmup-steps", "--memory-bank-features", "--logit-scale-init",
             "--diag", "--memory-bank-dedup", "--region-data", "--region-loss-weight", "--min-box-area",
             "--min-box-side", "--hard-negative-weight", "--skip-bad-images"]  # fmt: skip


def trainer_argv(tmp_path, name, *extra, n=32, batch_size=8):
    data = tmp_path / "data"
    if not (data / "train.csv").exists():
        write_clip_csv(data, n, seed=0, split="train")
    return [
        "--model", "clip-ext-tiny", "--train-data", str(data / "train.csv"), "--dataset-type", "csv",
        "--batch-size", str(batch_size), "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--device", "cpu",
        "--precision", "fp32", "--seed", "0", "--logs", str(tmp_path / "logs"), "--name", name, *extra,
    ]  # fmt: skip


def run_trainer(tmp_path, name, *extra, n=32, batch_size=8):
    """clip_ext.train.main in this process (it restores open_clip_train's names and logger levels on return
    and on error); a refusal raises SystemExit with its message. Returns the trained model."""
    return run_ours(trainer_argv(tmp_path, name, *extra, n=n, batch_size=batch_size))


def log_steps(log_path):
    """Optimizer steps of the run, read from open_clip's own per-step progress lines (logged every step)."""
    return sum(1 for line in log_path.read_text().splitlines() if "Train Epoch:" in line)


def test_help_shows_our_flags_and_open_clips_without_importing_torch(tmp_path):
    code = ("import sys, runpy; sys.argv = ['clip_ext.train', '--help']\n"
            "try:\n    runpy.run_module('clip_ext.train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'open_clip') if m in sys.modules])")  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "clip_ext.train", "--help"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)  # fmt: skip
    seconds = time.perf_counter() - start
    assert result.returncode == 0
    for flag in [*OUR_FLAGS, "--warmup", "--accum-freq", "--train-data"]:
        assert flag in result.stdout, flag
    assert seconds < 10, f"--help took {seconds:.1f} s"  # 0.4 s measured; a torch import alone takes longer
    heavy = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert "HEAVY []" in heavy.stdout, heavy.stdout[-500:] + heavy.stderr[-2000:]


def test_our_flags_cannot_swallow_open_clip_flags_by_prefix():
    assert extra_parser().allow_abbrev is False
    args = parse_args(["--model", "clip-ext-tiny", "--warmup", "7", "--memory-bank-size", "64"])
    assert args.warmup == 7 and args.memory_bank_size == 64
    with pytest.raises(SystemExit):
        parse_args(["--memory-bank", "64"])  # an abbreviation of ours is not accepted


def test_bank_off_by_default_and_bad_values_refused():
    args = parse_args(["--model", "clip-ext-tiny"])
    assert args.memory_bank_size == 0 and args.logit_scale_init is None and not args.diag
    with pytest.raises(SystemExit, match="--memory-bank-size must be >= 0"):
        parse_args(["--memory-bank-size", "-1"])
    with pytest.raises(SystemExit, match="contrastive loss only"):
        parse_args(["--memory-bank-size", "64", "--siglip"])


def test_logit_scale_init_applies_only_when_given():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(2.302585))  # e.g. SigLIP's ln 10
    assert init_logit_scale(model, None, pretrained=None) is None  # open_clip's own init stays
    assert model.logit_scale.item() == pytest.approx(2.302585)
    model.logit_scale.data.fill_(4.2)
    assert init_logit_scale(model, None, pretrained="openai") is None  # the checkpoint's value stays
    assert model.logit_scale.item() == pytest.approx(4.2)
    init_logit_scale(model, math.log(100), pretrained="openai")  # explicit request overrides
    assert model.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)
    with pytest.raises(ValueError, match="--logit-scale-init must lie in"):
        init_logit_scale(model, 5.0, pretrained=None)
    with pytest.raises(SystemExit, match=r"--logit-scale-init must lie in \[0, ln\(100\) = 4.6052\]"):
        parse_args(["--logit-scale-init", "5"])


def test_bank_smaller_than_global_batch_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--memory-bank-size 4 is smaller than the global batch 8 "):
        run_trainer(tmp_path, "small", "--epochs", "1", "--memory-bank-size", "4")
    assert not list((tmp_path / "logs/small").rglob("*.pt"))  # refused before any training step
    assert_same_names()


def test_training_saves_the_bank_and_resume_restores_it(tmp_path):
    run_trainer(tmp_path, "run", "--epochs", "1", "--memory-bank-size", "24", "--memory-bank-warmup-steps", "2",
                "--diag", "--log-every-n-steps", "1")  # fmt: skip
    checkpoint = torch.load(tmp_path / "logs/run/checkpoints/epoch_1.pt", map_location="cpu")
    state = checkpoint["clip_ext"]["state_dict"]  # our state, under a key open_clip does not read
    steps = int(state["memory_bank.step"])  # one count per optimizer step of the epoch
    assert steps == log_steps(tmp_path / "logs/run/out.log") >= 3
    assert (
        int(state["memory_bank.filled"]) == min(8 * steps, 24)
        and int(state["memory_bank.ptr"]) == 8 * steps % 24
    )
    assert bool(state["memory_bank.enabled"])
    assert state["memory_bank.image_queue"].norm(dim=-1).min() > 0.99  # normalized embeddings stored
    log = (tmp_path / "logs/run/out.log").read_text()
    assert "diag step 1:" in log and "bank_filled=8" in log and "zero_norm_image_share=0" in log

    run_trainer(tmp_path, "resumed", "--epochs", "2", "--memory-bank-size", "24",
                "--resume", str(tmp_path / "logs/run/checkpoints/epoch_1.pt"))  # fmt: skip
    state2 = torch.load(tmp_path / "logs/resumed/checkpoints/epoch_2.pt", map_location="cpu")["clip_ext"][
        "state_dict"
    ]
    assert int(state2["memory_bank.step"]) == 2 * steps  # continued, not restarted

    with pytest.raises(BankStateError, match="--memory-bank-size is 16") as refused:
        run_trainer(tmp_path, "wrong", "--epochs", "2", "--memory-bank-size", "16",
                    "--resume", str(tmp_path / "logs/run/checkpoints/epoch_1.pt"))  # fmt: skip
    assert "resume with --memory-bank-size 24" in str(refused.value)
    assert not list((tmp_path / "logs/wrong").rglob("*.pt"))  # refused before training
    assert_same_names()


def test_diag_reports_zero_norm_image_share_logit_range_and_bank_state():
    from clip_ext.diagnostics import collect
    from clip_ext.loss import MemoryBankClipLoss
    from clip_ext.memory_bank import MemoryBank

    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    loss = MemoryBankClipLoss(MemoryBank(8, 4), diag=True)  # diag keeps the logits (library default)
    image = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    image[:2] = 0.0  # two dead image embeddings out of four
    loss(image, torch.eye(4), torch.tensor(10.0))
    loss.commit()
    stats = collect(model, loss, loss.bank)
    assert stats["zero_norm_image_share"] == 0.5
    assert stats["logit_scale"] == pytest.approx(10.0)
    assert stats["logits_max"] == pytest.approx(10.0) and stats["logits_min"] == 0.0
    assert (stats["bank_ptr"], stats["bank_filled"], stats["bank_enabled"]) == (4, 4, 1.0)


def test_region_flags_default_weight_and_bad_values(tmp_path):
    args = parse_args(["--model", "clip-ext-tiny"])
    assert args.region_data is None and args.region_loss_weight == 0.0 and not args.memory_bank_dedup
    regions = tmp_path / "r.jsonl"
    regions.write_text("")
    args = parse_args(["--model", "clip-ext-tiny", "--region-data", str(regions), "--min-box-side", "0.05"])
    assert args.region_loss_weight == pytest.approx(0.1) and args.min_box_side == 0.05  # FG-CLIP's weight
    assert parse_args(["--region-data", str(regions), "--region-loss-weight", "0"]).region_loss_weight == 0.0
    with pytest.raises(SystemExit, match="--region-data missing.jsonl: no such file"):
        parse_args(["--region-data", "missing.jsonl"])
    with pytest.raises(SystemExit, match="--region-loss-weight needs --region-data"):
        parse_args(["--region-loss-weight", "0.5"])
    with pytest.raises(SystemExit, match="--region-loss-weight must be >= 0"):
        parse_args(["--region-data", str(regions), "--region-loss-weight", "-1"])
    with pytest.raises(SystemExit, match=r"--min-box-area must be in \[0, 1\)"):
        parse_args(["--region-data", str(regions), "--min-box-area", "-0.1"])
    with pytest.raises(SystemExit, match="--memory-bank-dedup .* needs --memory-bank-size"):
        parse_args(["--memory-bank-dedup"])
    with pytest.raises(SystemExit, match="--region-data works with the CLIP contrastive loss only"):
        parse_args(["--region-data", str(regions), "--siglip"])
    assert args.hard_negative_weight == 0.0  # off unless given
    assert parse_args(["--region-data", str(regions), "--hard-negative-weight"]).hard_negative_weight == 0.5
    given = parse_args(["--region-data", str(regions), "--hard-negative-weight", "0.3", "--warmup", "2"])
    assert given.hard_negative_weight == 0.3 and given.warmup == 2
    with pytest.raises(SystemExit, match="--hard-negative-weight needs --region-data whose regions carry"):
        parse_args(["--hard-negative-weight"])
    with pytest.raises(SystemExit, match="--hard-negative-weight must be >= 0"):
        parse_args(["--region-data", str(regions), "--hard-negative-weight", "-1"])


def _logged(log, name):
    """Per-step values of a loss entry from open_clip's progress lines ("Region_loss: 0.31 (0.30)")."""
    return [float(m) for m in re.findall(rf"{name}: ([-\d.eE+naif]+) \(", log)]


def test_region_loss_trains_with_the_bank_dedup_and_gradient_accumulation(tmp_path):
    # 24 images, batch 4, --accum-freq 2: 3 optimizer steps, each with 2 cached + 2 recomputed forwards
    regions = tmp_path / "data/train_regions.jsonl"
    run_trainer(tmp_path, "region", "--epochs", "1", "--accum-freq", "2", "--region-data", str(regions),
                "--min-box-area", "0.05", "--memory-bank-size", "16", "--memory-bank-dedup", "--diag",
                "--log-every-n-steps", "1", "--report-to", "tensorboard", n=24, batch_size=4)  # fmt: skip
    clip_train._run.tb_writer.close()  # open_clip leaves its SummaryWriter open; process exit would close it
    log = (tmp_path / "logs/region/out.log").read_text()
    # --diag also reaches TensorBoard, one scalar per optimizer step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs/region/tensorboard"))
    events.Reload()
    for tag in ("diag/logit_scale", "diag/bank_filled", "diag/zero_norm_image_share"):
        assert len(events.Scalars(tag)) == 3, tag
    region = _logged(log, "Region_loss")
    assert len(region) == 3 and all(math.isfinite(v) and v > 0 for v in region)
    contrastive, total = _logged(log, "Contrastive_loss"), _logged(log, "Loss")
    assert total[0] == pytest.approx(contrastive[0] + region[0], abs=2e-4)  # added to the total
    assert "region_logit_scale=" in log
    assert "is replaced by a box-aware one" in log and "RandomResizedCrop" in log
    # box filter counts: at dataset build and once per epoch, equal to what the filter drops
    rows = (tmp_path / "data/train.csv").read_text().splitlines()[1:]
    table = load_region_table(regions, [row.split("\t")[0] for row in rows], min_area=0.05, min_side=0.01)
    assert table.counts["dropped_min_area"] > 0
    assert log.count(table.summary()) == 2 and log.count("epoch 0: " + table.summary()) == 1
    state = torch.load(tmp_path / "logs/region/checkpoints/epoch_1.pt", map_location="cpu")["clip_ext"][
        "state_dict"
    ]
    # the region temperature is learnt (it started from the global scale, ln(1/0.07)) and clamped
    assert state["clip_ext_region.logit_scale"] != pytest.approx(FROM_SCRATCH, abs=1e-6)
    assert 0 <= float(state["clip_ext_region.logit_scale"]) <= math.log(100)
    # the bank kept region captions (valid boxes only) and the image ids of the CSV rows
    filled_regions = int(state["memory_bank.region_filled"])
    assert 0 < filled_regions <= 16 and (state["memory_bank.region_id_queue"][:filled_regions] >= 0).all()
    ids = state["memory_bank.id_queue"]
    assert sorted(ids[: int(state["memory_bank.filled"])].tolist()) == sorted(set(ids.tolist()))
    assert 0 <= int(ids.min()) and int(ids.max()) < 24


def test_region_data_that_does_not_match_the_csv_is_refused(tmp_path):
    write_clip_csv(tmp_path / "data", 8, seed=0, split="train")
    write_clip_csv(tmp_path / "other", 8, seed=0, split="val")
    with pytest.raises(SystemExit) as refused:
        run_trainer(
            tmp_path, "mismatch", "--epochs", "1", "--region-data", str(tmp_path / "other/val_regions.jsonl")
        )
    message = str(refused.value)
    assert "val_regions.jsonl does not match --train-data: no line for image" in message
    assert str(tmp_path / "data/images/train/000000.png") in message
    assert not list((tmp_path / "logs/mismatch").rglob("*.pt"))  # refused before training
    assert_same_names()
