"""Bad inputs to ``lavis_ext.train`` / ``lavis_ext.visualize`` are refused before work starts (issue 23).

Each test states one refusal: what was wrong, where, and what is accepted, raised before the model is built
(or, for a resume, before an epoch is trained), so no run folder or checkpoint is left behind.
"""

import json
import tempfile

import pytest
from lavis_helpers import CFG
from lavis_inprocess import run_main, train

import lavis_ext  # noqa: F401  (registrations)
from lavis_ext.config_check import ConfigError
from lavis_ext.datasets.cir_datasets import AnnotationError, read_cirr


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from vlext.toyworld import write_cirr

    return write_cirr(tmp_path_factory.mktemp("bad_lavis") / "cirr_dataset", 16, 6, 6, seed=0, image_size=32)


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """One tiny epoch, run with the process's temp directory pointed at an empty folder of its own."""
    temp = tmp_path_factory.mktemp("tempdir")
    out = tmp_path_factory.mktemp("trained") / "out"
    saved = tempfile.tempdir
    tempfile.tempdir = str(temp)
    try:
        train(
            f"datasets.cirr.build_info.root={toy}", f"run.output_dir={out}", "run.batch_size_train=8", cfg=CFG
        )
    finally:
        tempfile.tempdir = saved
    (job,) = list(out.iterdir())
    return {"checkpoint": job / "checkpoint_last.pth", "out": out, "temp": temp}


def copy_of(toy, tmp_path):
    import shutil

    return shutil.copytree(toy, tmp_path / "cirr_dataset", symlinks=True)


def refused(tmp_path, *options, error=ConfigError):
    """main() with these options from tmp_path; the error message. No checkpoint may have been written."""
    from lavis_ext.train import main

    argv = ["--cfg-path", CFG, "--options", f"run.output_dir={tmp_path / 'out'}", *options]
    with pytest.raises(error) as raised:
        run_main(main, argv, cwd=tmp_path)
    assert list((tmp_path / "out").rglob("*.pth")) == []
    return str(raised.value)


def test_a_training_run_leaves_nothing_in_the_temp_directory(trained):
    assert trained["checkpoint"].is_file()
    assert sorted(p.name for p in trained["temp"].iterdir()) == []


def test_an_empty_val_split_is_refused_when_the_datasets_are_built(toy, tmp_path):
    data = copy_of(toy, tmp_path)
    (data / "cirr" / "captions" / "cap.rc2.val.json").write_text("[]")
    message = refused(tmp_path, f"datasets.cirr.build_info.root={data}", error=AnnotationError)
    assert "cap.rc2.val.json holds no rows: the 'val' split is empty" in message


def test_an_empty_image_list_is_refused(toy, tmp_path):
    data = copy_of(toy, tmp_path)
    (data / "cirr" / "image_splits" / "split.rc2.val.json").write_text("{}")
    message = refused(tmp_path, f"datasets.cirr.build_info.root={data}", error=AnnotationError)
    assert "split.rc2.val.json must hold a non-empty JSON object" in message


def test_a_split_the_run_evaluates_but_no_dataset_builds_is_refused(toy, tmp_path):
    message = refused(
        tmp_path,
        f"datasets.cirr.build_info.root={toy}",
        "datasets.cirr.build_info.splits=[train]",
        error=ValueError,
    )
    assert (
        "run.valid_splits names split 'val', which no dataset built (built: {'cirr': ['train']})" in message
    )


def test_a_duplicated_pairid_is_refused_naming_both_rows(toy, tmp_path):
    data = copy_of(toy, tmp_path)
    captions = data / "cirr" / "captions" / "cap.rc2.test1.json"
    rows = json.loads(captions.read_text())
    assert len(rows) == 6
    rows[4]["pairid"] = rows[1]["pairid"]
    captions.write_text(json.dumps(rows))
    with pytest.raises(AnnotationError, match=rf"row 4: pairid {rows[1]['pairid']} repeats row 1's"):
        read_cirr(data, "test1")
    rows[4]["pairid"] = str(rows[1]["pairid"])  # the same key in the submission file
    captions.write_text(json.dumps(rows))
    with pytest.raises(AnnotationError, match=rf"row 4: pairid '{rows[1]['pairid']}' repeats row 1's"):
        read_cirr(data, "test1")


@pytest.mark.parametrize(
    "option, expected",
    [
        ("run.max_epoch=0", "run.max_epoch must be an int > 0, got 0"),
        ("run.max_epoch=abc", "run.max_epoch must be an int > 0, got 'abc'"),
        ("run.max_epoch=1.5", "run.max_epoch must be an int > 0, got 1.5"),
        ("run.batch_size_eval=0", "run.batch_size_eval must be an int > 0, got 0"),
        ("run.init_lr=-1e-4", "run.init_lr must be a number >= 0.0, got -0.0001"),
        ("run.min_lr=-1", "run.min_lr must be a number >= 0.0, got -1"),
    ],
)
def test_run_values_that_train_nothing_or_fail_late_are_refused(toy, tmp_path, option, expected):
    assert expected in refused(tmp_path, f"datasets.cirr.build_info.root={toy}", option)


def test_output_dir_that_is_a_file_is_refused(toy, tmp_path):
    from lavis_ext.train import main

    (tmp_path / "out").write_text("a file")
    argv = ["--cfg-path", CFG, "--options", f"datasets.cirr.build_info.root={toy}", "run.output_dir=out"]
    with pytest.raises(ConfigError, match=r"run.output_dir=\S+/out is a file; it must be a folder"):
        run_main(main, argv, cwd=tmp_path)


def test_resume_path_that_is_a_folder_is_refused_naming_what_is_accepted(toy, trained, tmp_path):
    folder = trained["checkpoint"].parent
    message = refused(tmp_path, f"datasets.cirr.build_info.root={toy}", f"run.resume_ckpt_path={folder}")
    assert f"run.resume_ckpt_path={folder} is a folder; give a checkpoint file" in message
    assert "run.resume_ckpt_path=latest" in message


def test_resume_from_the_last_epoch_with_no_epoch_left_is_refused(toy, trained, tmp_path):
    message = refused(
        tmp_path,
        f"datasets.cirr.build_info.root={toy}",
        f"run.resume_ckpt_path={trained['checkpoint']}",
        error=ValueError,
    )
    assert (
        "finished epoch 0; run.max_epoch=1 leaves no epoch to train. Raise run.max_epoch above 1" in message
    )


def visualize(toy, tmp_path, name, *options, flags=()):
    from lavis_ext.visualize import main

    out = tmp_path / name
    argv = ["--cfg-path", CFG, "--out", out, "--n", 2, "--topk", 3, *flags, "--options"]
    _, log = run_main(main, [*argv, f"datasets.cirr.build_info.root={toy}", *options])
    return json.loads((out / "rankings.json").read_text()), log


def test_visualize_without_weights_is_refused_before_the_model_is_built(toy, tmp_path):
    from lavis_ext.visualize import main

    argv = ["--cfg-path", CFG, "--out", tmp_path / "viz", "--options", f"datasets.cirr.build_info.root={toy}"]
    with pytest.raises(ConfigError) as error:
        run_main(main, argv)
    assert "visualize would rank with randomly initialised weights: model type 'tiny'" in str(error.value)
    assert "--random-weights" in str(error.value) and "model.finetuned=<checkpoint>" in str(error.value)
    assert not (tmp_path / "viz").exists()


def test_visualize_ranks_with_the_resume_checkpoint_it_is_given(toy, trained, tmp_path):
    ckpt = trained["checkpoint"]
    resumed, log = visualize(toy, tmp_path, "resume", f"run.resume_ckpt_path={ckpt}")
    assert f"weights of checkpoint {ckpt} (epoch 0)" in log
    finetuned, _ = visualize(toy, tmp_path, "finetuned", f"model.finetuned={ckpt}")
    random, _ = visualize(toy, tmp_path, "random", flags=["--random-weights"])
    scores = [[round(s, 5) for s in r["scores"]] for r in resumed]
    assert scores == [[round(s, 5) for s in r["scores"]] for r in finetuned]
    assert scores != [[round(s, 5) for s in r["scores"]] for r in random]
