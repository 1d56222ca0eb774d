"""clip_ext.train keeps open_clip's conventions: its logit-scale init, checkpoints any open_clip user can load,
and open_clip_train left as it was found. References run from open_clip's own installed code
(``open_clip.create_model``, ``open_clip_train.main.main``), in-process on the tiny config."""

import json
import logging
import math
import re
import subprocess
import sys

import open_clip
import open_clip_train.main as host
import pytest
import torch

import clip_ext.train as clip_train
from clip_ext import MODEL_CONFIG_DIR
from clip_ext.checkpoint import merge_extra_state
from vlext.toyworld import write_clip_csv

ORIGINAL_HOST_NAMES = {name: getattr(host, name) for name in clip_train.REBOUND}
EXTRA = ("memory_bank.", "clip_ext_region.")


def _quiet(fn, argv):
    """Run an open_clip_train-style main; its setup_logging adds root handlers on every call, undo them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return fn(argv)
    finally:
        for handler in root.handlers[len(handlers) :]:
            handler.close()
        root.handlers[:], root.level = handlers, level


def tiny_argv(data, logs, name, *extra, epochs=1, model="clip-ext-tiny"):
    return [
        "--model", model, "--train-data", str(data / "train.csv"), "--dataset-type", "csv", "--batch-size", "4",
        "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--seed", "0",
        "--logs", str(logs), "--name", name, "--epochs", str(epochs), *extra,
    ]  # fmt: skip


def run_host(argv, monkeypatch):
    """Plain open_clip_train.main.main; returns the model its own create_model_and_transforms built."""
    built = []
    original = host.create_model_and_transforms

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        built.append(out[0])
        return out

    monkeypatch.setattr(host, "create_model_and_transforms", spy)
    _quiet(host.main, argv)
    monkeypatch.setattr(host, "create_model_and_transforms", original)
    return built[0]


def run_ours(argv):
    _quiet(clip_train.main, argv)
    return clip_train._run.model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_compat")
    write_clip_csv(root / "data", 8, seed=0, image_size=32, split="train")
    return root


@pytest.fixture(scope="module")
def bank_checkpoint(world):
    """One epoch (2 optimizer steps) with a bank of 8 and the region loss: a checkpoint with our extras."""
    run_ours(tiny_argv(world / "data", world / "logs", "bank", "--memory-bank-size", "8", "--region-data",
                       str(world / "data/train_regions.jsonl"), "--save-frequency", "1"))  # fmt: skip
    return world / "logs/bank/checkpoints/epoch_1.pt"


def assert_same_names():
    changed = [name for name in clip_train.REBOUND if getattr(host, name) is not ORIGINAL_HOST_NAMES[name]]
    assert not changed, f"open_clip_train.main names left rebound: {changed}"


# --- 1. open_clip's logit-scale init stands unless --logit-scale-init is given ---------------------------


@pytest.mark.parametrize(
    "case,extra,log_scale,bias",
    [("clip", [], math.log(1 / 0.07), None), ("siglip", ["--siglip"], math.log(10), -10.0)],
)
def test_logit_scale_and_bias_are_what_open_clip_train_builds(
    world, monkeypatch, case, extra, log_scale, bias
):
    reference = run_host(
        tiny_argv(world / "data", world / "logs", f"host-{case}", *extra, epochs=0), monkeypatch
    )
    ours = run_ours(tiny_argv(world / "data", world / "logs", f"ours-{case}", *extra, epochs=0))
    assert ours.logit_scale.item() == reference.logit_scale.item() == pytest.approx(log_scale, abs=1e-6)
    if bias is None:
        assert reference.logit_bias is None and ours.logit_bias is None
    else:
        assert ours.logit_bias.item() == reference.logit_bias.item() == bias
    assert_same_names()


def test_a_model_configs_own_init_logit_scale_stands(world, tmp_path, monkeypatch):
    config = json.loads((MODEL_CONFIG_DIR / "clip-ext-tiny.json").read_text())
    config["init_logit_scale"] = 3.25
    (tmp_path / "clip-ext-tiny-scale325.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    model = "clip-ext-tiny-scale325"
    reference = open_clip.create_model(model)
    host_model = run_host(
        tiny_argv(world / "data", world / "logs", "host-cfg", epochs=0, model=model), monkeypatch
    )
    ours = run_ours(tiny_argv(world / "data", world / "logs", "ours-cfg", epochs=0, model=model))
    assert ours.logit_scale.item() == host_model.logit_scale.item() == reference.logit_scale.item() == 3.25
    explicit = run_ours(tiny_argv(world / "data", world / "logs", "ours-cfg-x", "--logit-scale-init", "4.0",
                                  epochs=0, model=model))  # fmt: skip
    assert explicit.logit_scale.item() == 4.0  # given: it overrides


# --- 2. checkpoints for everyone -------------------------------------------------------------------------


def test_bank_checkpoint_keeps_our_state_under_its_own_key(bank_checkpoint):
    checkpoint = torch.load(bank_checkpoint, map_location="cpu", weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if k.startswith(EXTRA)]
    ours = checkpoint["clip_ext"]["state_dict"]
    assert int(ours["memory_bank.step"]) == 2 and int(ours["memory_bank.filled"]) == 8
    assert "clip_ext_region.logit_scale" in ours
    assert set(checkpoint["state_dict"]) == set(open_clip.create_model("clip-ext-tiny").state_dict())


def test_open_clip_create_model_loads_a_bank_checkpoint(bank_checkpoint):
    weights = torch.load(bank_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = open_clip.create_model("clip-ext-tiny", pretrained=str(bank_checkpoint))
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert model.logit_scale.item() != pytest.approx(
        math.log(1 / 0.07), abs=1e-6
    )  # trained, not re-initialised


def test_open_clip_train_pretrained_and_clip_ext_pretrained_load_a_bank_checkpoint(
    world, bank_checkpoint, monkeypatch
):
    weights = torch.load(bank_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    plain = run_host(tiny_argv(world / "data", world / "logs", "host-pre", "--pretrained", str(bank_checkpoint),
                               epochs=0), monkeypatch)  # fmt: skip
    ours = run_ours(tiny_argv(world / "data", world / "logs", "ours-pre", "--pretrained", str(bank_checkpoint),
                              "--memory-bank-size", "16", epochs=0))  # fmt: skip
    for key, value in weights.items():
        assert torch.equal(plain.state_dict()[key], value), key
        assert torch.equal(ours.state_dict()[key], value), key
    assert int(ours.memory_bank.filled) == 0 and int(ours.memory_bank.step) == 0  # weights only, bank empty
    assert ours.memory_bank.size == 16  # another bank size is fine with --pretrained
    assert (
        ours.logit_scale.item() == weights["logit_scale"].item()
    )  # the checkpoint's scale, not re-initialised


def test_resume_with_clip_ext_restores_the_bank(world, bank_checkpoint):
    saved = torch.load(bank_checkpoint, map_location="cpu", weights_only=True)["clip_ext"]["state_dict"]
    model = run_ours(tiny_argv(world / "data", world / "logs", "resumed", "--memory-bank-size", "8", "--region-data",
                               str(world / "data/train_regions.jsonl"), "--resume", str(bank_checkpoint),
                               epochs=2))  # fmt: skip
    assert int(model.memory_bank.step) == int(saved["memory_bank.step"]) + 2  # continued, not restarted
    resumed = torch.load(world / "logs/resumed/checkpoints/epoch_2.pt", map_location="cpu", weights_only=True)
    assert int(resumed["clip_ext"]["state_dict"]["memory_bank.step"]) == 4


def test_a_plain_open_clip_checkpoint_resumes_in_clip_ext_with_an_empty_bank(world, monkeypatch):
    run_host(tiny_argv(world / "data", world / "logs", "plain"), monkeypatch)
    plain = world / "logs/plain/checkpoints/epoch_1.pt"
    model = run_ours(tiny_argv(world / "data", world / "logs", "from-plain", "--memory-bank-size", "8", "--resume",
                               str(plain), epochs=2))  # fmt: skip
    assert int(model.memory_bank.step) == 2  # only the resumed epoch's steps
    assert "checkpoint has no memory bank state" in (world / "logs/from-plain/out.log").read_text()


def test_export_writes_a_plain_state_dict_from_either_format(world, bank_checkpoint, tmp_path):
    old_format = merge_extra_state(torch.load(bank_checkpoint, map_location="cpu", weights_only=True))
    old_format.pop("clip_ext")
    torch.save(old_format, tmp_path / "old.pt")  # what clip_ext wrote before: the bank inside state_dict
    with pytest.raises(SystemExit, match=r"python -m clip_ext.export .*old.pt OUT.pt"):
        run_ours(tiny_argv(world / "data", world / "logs", "old-pre", "--pretrained", str(tmp_path / "old.pt"),
                           epochs=0))  # fmt: skip
    assert_same_names()
    (tmp_path / "ckpt").mkdir()
    torch.save(old_format, tmp_path / "ckpt/epoch_1.pt")
    result = subprocess.run([sys.executable, "-m", "clip_ext.export", "ckpt/epoch_1.pt", "out/plain.pt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    exported = torch.load(tmp_path / "out/plain.pt", weights_only=True)
    assert set(exported) == set(open_clip.create_model("clip-ext-tiny").state_dict())
    model = open_clip.create_model("clip-ext-tiny", pretrained=str(tmp_path / "out/plain.pt"))
    assert torch.equal(model.logit_scale.detach(), old_format["state_dict"]["logit_scale"])


# --- 3. clean integration ---------------------------------------------------------------------------------


def test_main_restores_open_clip_train_names_after_a_failure(world):
    with pytest.raises(SystemExit, match="smaller than the global batch 4"):
        run_ours(tiny_argv(world / "data", world / "logs", "fails", "--memory-bank-size", "2"))
    assert_same_names()


def test_main_leaves_logger_levels_as_it_found_them(world):
    """open_clip's setup_logging raises every logger to INFO; after main, torch._dynamo's is quiet again (its
    exit hooks printed compilation metrics at the end of every run)."""
    import logging

    dynamo = logging.getLogger("torch._dynamo")
    before = dynamo.level, logging.root.level
    run_ours(tiny_argv(world / "data", world / "logs", "levels", epochs=1))
    assert (dynamo.level, logging.root.level) == before


def test_torchscript_with_a_bank_or_region_loss_is_refused_before_training(world):
    with pytest.raises(
        SystemExit, match=r"--torchscript cannot be combined with --memory-bank-size: open_clip"
    ):
        run_ours(tiny_argv(world / "data", world / "logs", "jit", "--torchscript", "--memory-bank-size", "8"))
    with pytest.raises(SystemExit, match=r"--torchscript cannot be combined with --region-data"):
        clip_train.parse_args(["--torchscript", "--region-data", str(world / "data/train_regions.jsonl")])
    assert not (world / "logs/jit").exists()  # refused before the run folder was made
    assert_same_names()


def test_amp_warmup_lag_is_logged_once_with_the_bank_and_trainer_steps(tmp_path):
    write_clip_csv(tmp_path / "data", 16, seed=0, image_size=32, split="train")
    argv = tiny_argv(tmp_path / "data", tmp_path / "logs", "amp", "--memory-bank-size", "8",
                     "--memory-bank-warmup-steps", "2", "--log-every-n-steps", "1")  # fmt: skip
    argv[argv.index("fp32")] = "amp"  # fp16 autocast + GradScaler: it skips steps while it calibrates
    model = run_ours(argv)
    log = (tmp_path / "logs/amp/out.log").read_text()
    found = re.findall(r"GradScaler skipped (\d+) of the (\d+) optimizer steps run so far .* it is at step (\d+) "
                       r"while the trainer is at step (\d+), and it switches on (\d+) trainer step", log)  # fmt: skip
    assert len(found) == 1, found  # logged once
    skipped, run, bank_step, trainer_step, later = map(int, found[0])
    assert skipped >= 1 and bank_step == run - skipped and trainer_step == run and later == skipped
    trainer_steps = log.count("Train Epoch: 0 [")  # open_clip logs every step (--log-every-n-steps 1): 4
    assert trainer_steps == 4 and int(model.memory_bank.step) <= trainer_steps - skipped
    assert_same_names()
