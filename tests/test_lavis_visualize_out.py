"""``lavis_ext.visualize``: a split it cannot rank is named with the accepted ones before the model is built,
and ``--out`` is replaced as a whole folder, never mixed with a previous run's panels (issue 27)."""

import json

import pytest
from lavis_helpers import ROOT
from lavis_inprocess import run_main

TINY = ROOT / "lavis_ext" / "projects" / "cirr_tiny.yaml"


@pytest.fixture(scope="module")
def toy_cirr(tmp_path_factory):
    from vlext.toyworld import write_cirr

    return write_cirr(tmp_path_factory.mktemp("viz") / "cirr_dataset", 8, 6, 2, seed=0, image_size=32)


def visualize(toy_cirr, out, *flags, n=2, splits="[train,val]"):
    from lavis_ext.visualize import main

    argv = ["--cfg-path", TINY, "--out", out, "--n", n, "--topk", 2, "--random-weights", *flags, "--options"]
    return run_main(
        main,
        [*argv, f"datasets.cirr.build_info.root={toy_cirr}", f"datasets.cirr.build_info.splits={splits}"],
    )


@pytest.mark.parametrize(
    "split, splits, expected",
    [
        ("train", "[train,val]", "--split 'train' is a training split of cirr: triplets with no gallery"),
        ("test", "[train,val,test]", "--split 'test' of cirr has no targets (CIRR's test1 hides them)"),
        ("tset", "[train,val]", "--split 'tset': dataset cirr built no such split"),
    ],
)
def test_a_split_visualize_cannot_rank_is_refused_naming_the_accepted_ones(
    toy_cirr, tmp_path, monkeypatch, split, splits, expected
):
    from lavis.tasks.base_task import BaseTask

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the split was checked")

    monkeypatch.setattr(BaseTask, "build_model", no_model)  # our task inherits it
    with pytest.raises(ValueError) as error:
        visualize(toy_cirr, tmp_path / "viz", "--split", split, splits=splits)
    assert expected in str(error.value)
    assert "accepted: ['val']" in str(error.value)
    assert not (tmp_path / "viz").exists()


def test_a_used_out_is_refused_and_overwrite_leaves_no_stale_panel(toy_cirr, tmp_path):
    out = tmp_path / "viz"
    visualize(toy_cirr, out, n=3)
    assert sorted(p.name for p in out.iterdir()) == [
        "query_0000.png",
        "query_0001.png",
        "query_0002.png",
        "rankings.json",
        "visualize_complete.json",
    ]
    with pytest.raises(
        FileExistsError, match=r"--out \S+/viz already holds 5 file\(s\) \(query_0000.png, .*--overwrite"
    ):
        visualize(toy_cirr, out, n=1)
    assert len(json.loads((out / "rankings.json").read_text())) == 3  # untouched

    visualize(toy_cirr, out, "--overwrite", n=1)
    # the third and second panels of the first run are gone: the folder is the new run's only
    assert sorted(p.name for p in out.iterdir()) == [
        "query_0000.png",
        "rankings.json",
        "visualize_complete.json",
    ]
    marker = json.loads((out / "visualize_complete.json").read_text())
    assert marker["queries"] == 1 and set(marker["files"]) == {"query_0000.png", "rankings.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["viz"]  # no staging folder left beside it
