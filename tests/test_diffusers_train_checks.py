"""The trainer's checks (issues 26 and 27): every flag in its range before anything loads, nothing deleted by
``--overwrite`` before every check has passed, a resume that compares everything deciding which sample a
step sees (and not the defaults it was given), crops that stay with their rows, images decoded once across
processes, and the cache pass holding one encoder at a time."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffusers_ext.layout_rows import CleaningReport
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
from diffusers_ext.training import dataset as dataset_module
from diffusers_ext.training.dataset import GroundingCrops, prepare_rows, verify_images
from diffusers_ext.training.resume_check import check_resumed_flags, recorded_flags
from diffusers_ext.training.train_spatial_adapter import build_parser, train
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return {"jsonl": write_grounding_jsonl(root / "data", 4, seed=0, image_size=64),
            "sd": save_tiny_pipeline(root / "sd", "sd"), "root": root}  # fmt: skip


def _argv(toy, out, *extra, jsonl=None):
    return ["--mixed-data", str(jsonl or toy["jsonl"]), "--pretrained-model", str(toy["sd"]), "--output-dir",
            str(out), "--batch-size", "2", "--hidden-dim", "16", "--max-objs", "4", "--lr", "1e-3", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(toy):
    out = toy["root"] / "first"
    train(_argv(toy, out, "--max-train-steps", "1", "--checkpointing-steps", "1"))
    return out


# ---- flags ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-rank", "2", "--lora-alpha", "0"], "--lora-alpha must be > 0 (LoRA scales its update by alpha / rank), got 0.0"),
        (["--lora-rank", "2", "--lora-alpha=-4"], "--lora-alpha must be > 0 (LoRA scales its update by alpha / rank), got -4.0"),
        (["--lora-alpha", "8"], "--lora-alpha 8.0 without --lora-rank: LoRA is off (--lora-rank 0)"),
        (["--resolution", "0"], "--resolution must be a positive number of pixels (a multiple of the VAE's scale factor"),
        (["--resolution=-8"], "--resolution must be a positive number of pixels"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
        (["--gate-init-value", "inf"], "--gate-init-value must be a finite number, got inf"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--log-gate-stats=-1"], "--log-gate-stats must be >= 0, got -1"),
        (["--cache-batch-size", "0"], "--cache-batch-size must be >= 1, got 0"),
        (["--seed=-1"], "--seed must be >= 0, got -1"),  # numpy's crop generator refused it at the first sample
    ],
)  # fmt: skip
def test_numeric_flags_are_refused_for_range_and_nan_before_the_pipeline_loads(
    toy, tmp_path, monkeypatch, extra, message
):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)  # loading would be a TypeError
    with pytest.raises(SystemExit) as error:
        train(_argv(toy, tmp_path / "out", *extra))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_cache_dir_that_is_a_file_is_refused_before_work(toy, tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(
        SystemExit, match=r"--cache-dir .*cache is a file; give a folder for the conditioning cache"
    ):
        train(_argv(toy, tmp_path / "out", "--cache-dir", str(tmp_path / "cache")))


def test_a_resolution_that_is_not_a_multiple_of_the_vae_scale_is_refused_with_a_fix(toy, tmp_path):
    with pytest.raises(
        SystemExit, match=r"--resolution 60 is not a multiple of the VAE's scale factor \d+ .* use e\.g\. "
    ):
        train(_argv(toy, tmp_path / "out", "--resolution", "60"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_unknown_layers_are_refused_naming_presets_and_prefixes_before_the_pipeline_loads(
    toy, tmp_path, monkeypatch
):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", None)  # loading would be a TypeError
    with pytest.raises(SystemExit) as error:
        train(_argv(toy, tmp_path / "out", "--layers", "bogus"))
    message = str(error.value)
    assert message.startswith(
        "--layers: ['bogus'] are neither a fuser preset nor a block-name prefix of this UNet"
    )
    assert "Presets: all, " in message and "Prefixes of this UNet: down_blocks.0, " in message
    assert "mid_block" in message


def test_a_layers_preset_trains(toy, tmp_path):
    result = train(_argv(toy, tmp_path / "out", "--layers", "mid", "--max-train-steps", "1"))
    fusers = {n.split(".")[2] for n in result["trainable"] if n.startswith("adapter.fusers.")}
    assert fusers == {"0"} and result["steps"] == 1  # "mid": the one mid-block transformer of the tiny UNet


# ---- --overwrite deletes nothing before every check has passed ------------------------------------------------


def _bad_rows(toy, tmp_path):
    rows = [json.loads(line) for line in toy["jsonl"].read_text().splitlines()]
    rows[1]["boxes"][0] = [10, 10, 40, 40]  # pixel coordinates
    path = toy["jsonl"].parent / "pixel_boxes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("layers", r"--layers: \['down_blocks.9'\] are neither a fuser preset nor a block-name prefix"),
        ("pixel box", r"pixel_boxes.jsonl:2: box 0 = \[10.0, 10.0, 40.0, 40.0\] lies outside \[0, 1\]"),
        ("resolution", r"--resolution 60 is not a multiple"),
        ("bad image", r"1 of 4 images cannot be read"),
    ],
)
def test_overwrite_deletes_nothing_until_every_check_has_passed(toy, first_run, tmp_path, case, match):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    before = sorted(p.name for p in out.iterdir())
    jsonl = None
    extra = {"layers": ["--layers", "down_blocks.9"], "resolution": ["--resolution", "60"]}.get(case, [])
    if case == "pixel box":
        jsonl = _bad_rows(toy, tmp_path)
    if case == "bad image":
        data = tmp_path / "data"
        shutil.copytree(toy["jsonl"].parent, data)
        jsonl = data / toy["jsonl"].name
        image = data / json.loads(jsonl.read_text().splitlines()[2])["image"]
        image.write_bytes(image.read_bytes()[:100])
    with pytest.raises((SystemExit, ValueError, OSError), match=match):
        train(_argv(toy, out, "--overwrite", *extra, jsonl=jsonl))
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "adapter" / "config.json").is_file() and (out / "checkpoint-1").is_dir()


# ---- resume ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changed, named",
    [
        (["--no-crop"], "--crop 'center' in the checkpoint, 'none' now"),
        (["--no-random-flip"], "--random-flip True in the checkpoint, False now"),
        (["--resolution", "128"], "--resolution 64 in the checkpoint, 128 now"),
    ],
)
def test_resume_refuses_a_changed_crop_flip_or_resolution_naming_the_flag(
    toy, first_run, tmp_path, changed, named
):
    argv = _argv(
        toy, tmp_path / "out", "--max-train-steps", "2", "--resume", str(first_run / "checkpoint-1"), *changed
    )
    with pytest.raises(SystemExit) as error:
        train(argv)
    assert named in str(error.value) and "cannot change in a resumed run" in str(error.value)


def test_resume_refuses_rows_edited_in_place(toy, first_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy["jsonl"].parent, data)
    jsonl = data / toy["jsonl"].name
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    saved = json.loads((first_run / "checkpoint-1" / "trainer_state.json").read_text())["flags"]
    saved["mixed_data"], saved["image_dir"] = str(jsonl.resolve()), None  # the same path, other content
    rows[0]["caption"] = "something else"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = build_parser().parse_args(_argv(toy, tmp_path / "out", jsonl=jsonl))
    from diffusers_ext.training.resume_check import data_fingerprint
    from diffusers_ext.training.train_spatial_adapter import read_rows

    args.world_size, args.data_fingerprint = 1, data_fingerprint(read_rows(args)[0])
    with pytest.raises(
        SystemExit,
        match=r"the content of the --mixed-data rows \(SHA-256 .*\): '[0-9a-f]{64}' in the checkpoint, '[0-9a-f]{64}' now",
    ):
        check_resumed_flags(saved, args, "ckpt")  # fmt: skip


def test_resume_accepts_the_defaults_it_was_given_spelt_out(toy, first_run, tmp_path):
    flags = json.loads((first_run / "checkpoint-1" / "trainer_state.json").read_text())["flags"]
    assert (flags["resolution"], flags["gate_init_value"], flags["world_size"]) == (64, 0.0, 1)
    out = tmp_path / "out"
    result = train(_argv(toy, out, "--max-train-steps", "2", "--resume", str(first_run / "checkpoint-1"),
                         "--resolution", "64", "--gate-init-value", "0"))  # fmt: skip
    assert result["steps"] == 2


def test_resume_refuses_another_number_of_processes():
    args = SimpleNamespace(**{a.dest: a.default for a in build_parser()._actions if a.dest != "help"})
    args.world_size, args.data_fingerprint = 1, "d"
    saved = {**recorded_flags(args), "world_size": 2}
    with pytest.raises(SystemExit, match=r"the number of processes: 2 in the checkpoint, 1 now"):
        check_resumed_flags(saved, args, "ckpt")


# ---- data -------------------------------------------------------------------------------------------------------


def test_rows_are_cleaned_with_the_crop_they_train_on(tmp_path):
    """Issue 26 finding 6: prepare_rows cleaned with the crop of a row's old index, then renumbered the rows, so
    with --random-crop kept rows could have no box in the crop they trained on."""
    rows = []
    for i in range(16):
        Image.new("RGB", (256, 64)).save(tmp_path / f"{i}.png")
        x = 0.05 + 0.9 * ((i * 7) % 16) / 16  # one narrow box somewhere along a wide image
        rows.append(
            {"image": f"{i}.png", "caption": "c", "boxes": [[x - 0.04, 0.2, x + 0.04, 0.8]], "phrases": ["p"]}
        )
    dataset = GroundingCrops(rows, tmp_path, 64, crop="random", flip=True, seed=3, min_area=0.0, max_objs=4)
    report = CleaningReport()
    kept = prepare_rows(dataset, report)
    assert 0 < len(kept) < 16  # some rows lost their box, so the rows were renumbered
    for epoch0_index in range(len(kept)):
        _, boxes, _ = dataset.layout(0, epoch0_index)
        assert boxes, f"kept row {epoch0_index} has no box in the crop it trains on"


def test_images_are_decoded_once_across_processes(tmp_path, monkeypatch):
    """Issue 26 finding 8: every rank decoded every image. Each now decodes its share and the bad ones are
    gathered, so all ranks keep the same rows."""
    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "where": f"rows.jsonl:{i + 1}"})
    (tmp_path / "3.png").write_bytes(b"not a png")  # in rank 1's share (rows 1, 3, 5)
    decoded = []
    real = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: decoded.append(path.name) or real(path))
    shares = {}

    def gather_of(rank):  # accelerate's gather_object: every rank's list, in rank order
        def gather(mine):
            shares[rank] = list(mine)
            return [x for r in sorted(shares) for x in shares[r]]

        return gather

    kept = {}
    for rank in (1, 0):  # rank 1 first, so that rank 0's gather receives rank 1's share
        kept[rank] = verify_images(rows, tmp_path, skip_bad=True, report=CleaningReport(), log=lambda _: None,
                                   progress=False, rank=rank, world=2, gather=gather_of(rank))  # fmt: skip
    assert sorted(decoded) == [f"{i}.png" for i in range(6)]  # each image once in all
    assert [r["image"] for r in kept[0]] == [
        "0.png",
        "1.png",
        "2.png",
        "4.png",
        "5.png",
    ]  # rank 1's bad one too


# ---- the cache pass ------------------------------------------------------------------------------------------------


def test_the_cache_pass_runs_before_the_unet_moves_and_holds_one_encoder_at_a_time(
    toy, tmp_path, monkeypatch
):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(toy["sd"])
    moves, batches = [], []
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        real = module.to
        monkeypatch.setattr(module, "to", lambda *a, _n=name, _to=real, **k: moves.append(_n) or _to(*a, **k))
    real_encode = pipe.vae.encode
    monkeypatch.setattr(
        pipe.vae, "encode", lambda x, *a, **k: batches.append(len(x)) or real_encode(x, *a, **k)
    )
    cache = ["--cache-dir", str(tmp_path / "c"), "--cache-latents", "--cache-batch-size", "3"]
    train(_argv(toy, tmp_path / "out", "--max-train-steps", "1", *cache), pipeline=pipe)
    # text encoder in and out, then the VAE in and out (8 images: 4 rows x 2 flips), and only then the UNet
    assert moves == ["text_encoder", "text_encoder", "vae", "vae", "unet"]
    assert batches == [3, 3, 2]
