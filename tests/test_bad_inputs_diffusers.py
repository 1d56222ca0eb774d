"""Bad inputs to the diffusers extension are refused (or warned about) where they enter (issue 23): layout
rows, ``generate``, ``load_spatial_adapter``, the evaluation's flags and the trainer's flags and resume."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_ext.generation import generate, phrase_dim
from diffusers_ext.layout_rows import read_grounding_rows
from diffusers_ext.loaders import load_spatial_adapter
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline, tiny_sd_pipeline
from diffusers_ext.training.train_spatial_adapter import train
from vlext.toyworld import write_grounding_jsonl

torch.set_num_threads(1)
ROW = {
    "image": "a.png",
    "caption": "a red circle",
    "boxes": [[0.1, 0.1, 0.5, 0.5]],
    "phrases": ["a red circle"],
}
PHRASES, BOXES = ["a red circle"], [[0.1, 0.1, 0.6, 0.6]]


def rows_of(tmp_path, *lines):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path):
    return read_grounding_rows(path, min_area=0.0, min_side=0.0, max_objs=4)


@pytest.mark.parametrize(
    "caption, shown", [(None, "NoneType None"), (["a", "b"], "list ['a', 'b']"), (3, "int 3")]
)
def test_a_caption_that_is_not_a_string_is_refused_naming_the_line(tmp_path, caption, shown):
    path = rows_of(tmp_path, json.dumps(ROW), json.dumps({**ROW, "caption": caption}))
    with pytest.raises(
        ValueError, match=re.escape(f"rows.jsonl:2: 'caption' must be a string (\"\" for none), got {shown}")
    ):
        read(path)


def test_a_row_with_a_key_twice_is_refused(tmp_path):
    line = json.dumps(ROW)[:-1] + ', "boxes": [[0.5, 0.5, 0.9, 0.9]]}'
    with pytest.raises(ValueError, match=r"rows.jsonl:1: key 'boxes' appears twice in one object"):
        read(rows_of(tmp_path, line))


def test_phrases_as_one_string_and_an_unnested_box_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"phrases must be a list of strings, one per box, got str 'a cat'; "
                                         r"for one object write \['a cat'\]"):  # fmt: skip
        read(rows_of(tmp_path, json.dumps({**ROW, "phrases": "a cat"})))
    with pytest.raises(ValueError, match=r"boxes must be a list of \[x0, y0, x1, y1\] lists, one per phrase, got "
                                         r"\[0.1, 0.1, 0.5, 0.5\]; for one box write \[\[0.1, 0.1, 0.5, 0.5\]\]"):  # fmt: skip
        read(rows_of(tmp_path, json.dumps({**ROW, "boxes": [0.1, 0.1, 0.5, 0.5]})))


@pytest.fixture(scope="module")
def pipe_and_adapter():
    pipe = tiny_sd_pipeline()
    torch.manual_seed(0)
    adapter = SpatialAdapter.for_unet(pipe.unet, phrase_dim=phrase_dim(pipe), max_objs=4, hidden_dim=16)
    adapter.install(pipe)
    return pipe, adapter


def test_generate_refuses_phrases_as_a_string_and_an_unnested_box(pipe_and_adapter):
    pipe, adapter = pipe_and_adapter
    with pytest.raises(ValueError, match=r"for one object write \['a red circle'\]"):
        generate(pipe, adapter, "x", "a red circle", BOXES, num_inference_steps=1, schedule=None)
    with pytest.raises(ValueError, match=r"layout 0: boxes must be a list of .* for one box write \[\[0.1"):
        generate(pipe, adapter, "x", PHRASES, BOXES[0], num_inference_steps=1, schedule=None)


def test_generate_takes_prompt_embeds_without_a_prompt(pipe_and_adapter):
    pipe, adapter = pipe_and_adapter
    embeds, negative = pipe.encode_prompt(["a red circle"], "cpu", 1, True)
    kwargs = dict(
        num_inference_steps=1, output_type="latent", schedule=None, generator=torch.Generator().manual_seed(0)
    )
    by_embeds = generate(pipe, adapter, None, PHRASES, BOXES, prompt_embeds=embeds, negative_prompt_embeds=negative,
                         **kwargs)  # fmt: skip
    kwargs["generator"] = torch.Generator().manual_seed(0)
    by_text = generate(pipe, adapter, "a red circle", PHRASES, BOXES, **kwargs)
    assert by_embeds.images.shape == (1, 4, 8, 8)
    assert torch.allclose(by_embeds.images, by_text.images, atol=1e-5)


def test_a_schedule_that_grounds_no_step_warns_in_generate(pipe_and_adapter):
    pipe, adapter = pipe_and_adapter
    with pytest.warns(
        UserWarning, match=r"\(beta=0.3\) grounds none of the 2 denoising steps .* use at least 4 "
    ):
        _, scales = generate(pipe, adapter, "x", PHRASES, BOXES, num_inference_steps=2, output_type="latent",
                             return_scales=True)  # fmt: skip
    assert scales == [0.0, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, scales = generate(pipe, adapter, "x", PHRASES, BOXES, num_inference_steps=4, output_type="latent",
                             return_scales=True)  # fmt: skip
    assert scales == [1.0, 0.0, 0.0, 0.0]


def evaluate_refusal(tmp_path, capsys, *extra):
    """main() with these flags; it must exit 2 before reading anything; returns its error line."""
    from diffusers_ext.evaluation.evaluate import main

    (tmp_path / "pipe").mkdir(exist_ok=True)
    argv = ["--data", str(tmp_path / "none.jsonl"), "--pretrained-model", str(tmp_path / "pipe"), "--adapter",
            str(tmp_path / "ad"), "--detector", "toy-colour", *extra]  # fmt: skip
    assert main(argv) == 2
    return capsys.readouterr().err


def test_evaluate_refuses_steps_at_which_the_schedule_grounds_nothing(tmp_path, capsys):
    message = evaluate_refusal(tmp_path, capsys, "--out", str(tmp_path / "out"), "--steps", "2")
    assert "--steps 2: the grounding schedule (beta=0.3) grounds none of the 2 denoising steps" in message
    assert "use at least 4 steps for this schedule, or ground every step (--schedule none)" in message
    message = evaluate_refusal(
        tmp_path, capsys, "--out", str(tmp_path / "out"), "--steps", "5", "--schedule", "0.1", "0.1", "0.8"
    )
    assert "abc=[0.1, 0.1, 0.8]" in message and "use at least 10 steps" in message
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out.txt").write_text("mine")
    message = evaluate_refusal(tmp_path, capsys, "--out", str(tmp_path / "out.txt"))
    assert "is a file; it must be a folder (created if missing)" in message
    assert (tmp_path / "out.txt").read_text() == "mine"


def test_loading_an_adapter_folder_missing_a_tensor_names_it(pipe_and_adapter, tmp_path):
    pipe, adapter = pipe_and_adapter
    adapter.save_pretrained(tmp_path / "ad")
    weights = tmp_path / "ad" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["fusers.0.ff_in.weight"]
    save_file(state, weights)
    fresh = tiny_sd_pipeline()
    with pytest.raises(ValueError, match=r"its weights do not match its config.json \(missing_keys: 1, first "
                                         r"\['fusers.0.ff_in.weight'\]\)"):  # fmt: skip
        load_spatial_adapter(fresh, tmp_path / "ad")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_train")
    return {"jsonl": write_grounding_jsonl(root / "data", 4, seed=0, image_size=64),
            "sd": save_tiny_pipeline(root / "sd", "sd")}  # fmt: skip


def trainer_args(toy, out, *extra):
    return ["--mixed-data", str(toy["jsonl"]), "--pretrained-model", str(toy["sd"]), "--output-dir", str(out),
            "--batch-size", "2", "--hidden-dim", "16", "--max-objs", "4", "--lr", "1e-3", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--lr=-1e-4"], "--lr must be > 0, got -0.0001"),
        (["--ema-decay", "1"], r"--ema-decay must be in [0, 1), got 1.0"),
        (["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a GPU (CUDA or MPS)"),
    ],
)
def test_trainer_flags_are_refused_before_the_pipeline_loads(toy, tmp_path, monkeypatch, extra, message):
    import diffusers

    if "fp16" in extra and torch.cuda.is_available():
        pytest.skip("the fp16 refusal is for machines without a GPU")
    monkeypatch.setattr(
        diffusers.DiffusionPipeline, "from_pretrained", None
    )  # loading it would be a TypeError
    with pytest.raises(SystemExit) as error:
        train(trainer_args(toy, tmp_path / "out", *extra))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def first_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    train(trainer_args(toy, out, "--max-train-steps", "1", "--checkpointing-steps", "1"))
    return out


def test_a_checkpoint_records_the_flags_of_its_run(first_run):
    flags = json.loads((first_run / "checkpoint-1" / "trainer_state.json").read_text())["flags"]
    assert flags["lr"] == 1e-3 and flags["max_objs"] == 4 and flags["hidden_dim"] == 16


@pytest.mark.parametrize(
    "changed, named",
    [
        (["--hidden-dim", "32"], "--hidden-dim 16 in the checkpoint, 32 now"),
        (["--max-objs", "3"], "--max-objs 4 in the checkpoint, 3 now"),
        (["--seed", "1"], "--seed 0 in the checkpoint, 1 now"),
    ],
)
def test_resume_with_a_changed_architecture_or_data_flag_is_refused(toy, first_run, tmp_path, changed, named):
    argv = trainer_args(
        toy, tmp_path / "out", "--max-train-steps", "2", "--resume", str(first_run / "checkpoint-1")
    )
    argv += changed  # the later flag wins in argparse
    with pytest.raises(SystemExit) as error:
        train(argv)
    assert named in str(error.value) and "cannot change in a resumed run" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_resume_with_a_new_lr_names_it_and_trains_with_it(toy, first_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = trainer_args(
        toy, out, "--max-train-steps", "2", "--resume", str(first_run / "checkpoint-1"), "--lr", "3e-3"
    )
    train(argv)
    assert (
        "--resume: --lr 0.003 overrides the checkpoint's 0.001 from the resumed step on"
        in capsys.readouterr().err
    )
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and row["lr"] == pytest.approx(3e-3)


def test_every_compared_flag_is_a_trainer_flag_and_old_checkpoints_are_named():
    from types import SimpleNamespace

    from diffusers_ext.training.resume_check import FIXED, OVERRIDABLE, check_resumed_flags
    from diffusers_ext.training.train_spatial_adapter import build_parser

    dests = {action.dest for action in build_parser()._actions}
    assert set(FIXED) <= dests and set(OVERRIDABLE) <= dests and not set(FIXED) & set(OVERRIDABLE)
    args = SimpleNamespace(**{name: 1 for name in (*FIXED, *OVERRIDABLE)})
    (line,) = check_resumed_flags(None, args, "ckpt")
    assert (
        line
        == "--resume ckpt: the checkpoint records no flags (an older version wrote it); they are not compared"
    )
