"""Annotations that contradict themselves are refused when the dataset is read, naming file and row (issue 27).

Each case used to be ranked without a word: a CIRR target outside its image set was ranked as a member
(Rs@1 0 -> 16.7), a target equal to the reference counted as an R@50 hit on galleries of 51 or fewer.
"""

import json
import shutil

import pytest

import lavis_ext  # noqa: F401  (registrations)
from lavis_ext.datasets.cir_datasets import AnnotationError, read_cirr, read_fashioniq


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from vlext.toyworld import write_cirr

    return write_cirr(tmp_path_factory.mktemp("cirr") / "cirr_dataset", 12, 6, 6, seed=0, image_size=32)


@pytest.fixture(scope="module")
def toy_fiq(tmp_path_factory):
    from vlext.toyworld import write_fashioniq

    return write_fashioniq(tmp_path_factory.mktemp("fiq") / "fashionIQ_dataset", 2, seed=0, image_size=32)


def edited(root, tmp_path, relpath, edit):
    data = shutil.copytree(root, tmp_path / root.name, symlinks=True)
    rows = json.loads((data / relpath).read_text())
    edit(rows)
    (data / relpath).write_text(json.dumps(rows))
    return data


VAL = "cirr/captions/cap.rc2.val.json"


def _outside_set(rows):
    rows[2]["img_set"]["members"] = [m for m in rows[2]["img_set"]["members"] if m != rows[2]["target_hard"]]


def _target_is_reference(rows):
    rows[3]["target_hard"] = rows[3]["reference"]


def _reference_outside_set(rows):
    rows[1]["img_set"]["members"] = [m for m in rows[1]["img_set"]["members"] if m != rows[1]["reference"]]


def _member_twice(rows):
    members = rows[4]["img_set"]["members"]
    rows[4]["img_set"]["members"] = [*members, members[-1]]


@pytest.mark.parametrize(
    "edit, split, expected",
    [
        (_outside_set, "val", r"row 2 \(pairid 2\): target_hard '[^']+' is not in img_set.members \["),
        (
            _target_is_reference,
            "val",
            r"row 3 \(pairid 3\): target_hard '[^']+' is the reference image itself",
        ),
        (
            _target_is_reference,
            "train",
            r"row 3 \(pairid 3\): target_hard '[^']+' is the reference image itself",
        ),
        (_reference_outside_set, "val", r"row 1 \(pairid 1\): reference '[^']+' is not in img_set.members"),
        (_member_twice, "val", r"row 4 \(pairid 4\): img_set.members lists \['[^']+'\] more than once"),
    ],
)
def test_a_cirr_row_that_contradicts_itself_is_refused_naming_file_and_row(
    toy, tmp_path, edit, split, expected
):
    relpath = f"cirr/captions/cap.rc2.{split}.json"
    data = edited(toy, tmp_path, relpath, edit)
    with pytest.raises(AnnotationError, match=rf"cap.rc2.{split}.json {expected}"):
        read_cirr(data, split)


def test_the_toy_cirr_rows_are_consistent(toy):
    for split in ("train", "val", "test1"):
        assert read_cirr(toy, split)[0]


def test_a_fashioniq_row_whose_target_is_its_candidate_is_refused(toy_fiq, tmp_path):
    def same(rows):
        rows[1]["target"] = rows[1]["candidate"]

    data = edited(toy_fiq, tmp_path, "captions/cap.shirt.val.json", same)
    with pytest.raises(
        AnnotationError, match=r"cap.shirt.val.json row 1: target '[^']+' is the candidate image"
    ):
        read_fashioniq(data, "val")


def test_a_contradicting_row_stops_the_run_before_the_model_is_built(toy, tmp_path):
    """Through ``python -m lavis_ext.train``: refused when the datasets are built, no checkpoint written."""
    from lavis_helpers import CFG
    from lavis_inprocess import run_main

    from lavis_ext.train import main

    data = edited(toy, tmp_path, VAL, _outside_set)
    argv = [
        "--cfg-path",
        CFG,
        "--options",
        f"run.output_dir={tmp_path / 'out'}",
        f"datasets.cirr.build_info.root={data}",
    ]
    with pytest.raises(
        AnnotationError, match=r"row 2 \(pairid 2\): target_hard .* is not in img_set.members"
    ):
        run_main(main, argv, cwd=tmp_path)
    assert list((tmp_path / "out").rglob("*.pth")) == []
