"""CIR recall on hand-made similarity matrices, SPRC's target pad, the cirr/fashioniq builders and the task."""

import json
import re

import pytest
import torch
from lavis_helpers import build_datasets
from PIL import Image

import lavis_ext  # noqa: F401  (registers builders, processor, task)
from lavis_ext.processors.target_pad import target_pad
from lavis_ext.tasks.recall import cirr_metrics, fashioniq_metrics, subset_ranks, target_ranks

torch.set_num_threads(1)


def test_target_rank_counts_items_scored_above_the_target():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.3, 0.4, 0.1]])
    assert target_ranks(sim, torch.tensor([2, 1])).tolist() == [2, 1]


def test_excluded_reference_does_not_count_against_the_target():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.7]])
    # the reference (index 0) scores highest; CIRR removes it, so the target at index 3 is first
    assert target_ranks(sim, torch.tensor([3]), exclude=torch.tensor([0])).tolist() == [0]
    assert target_ranks(sim, torch.tensor([3])).tolist() == [1]


def test_subset_rank_only_counts_other_members():
    sim = torch.tensor([[0.9, 0.8, 0.5, 0.7, 0.95]])
    members = torch.tensor([[0, 2, 3, -1]])  # 4 (0.95) and 1 (0.8) are not members; 0 is the reference
    assert subset_ranks(sim, torch.tensor([2]), members, exclude=torch.tensor([0])).tolist() == [1]


def test_cirr_metrics_from_known_ranks():
    ranks = torch.tensor([0, 3, 7, 20, 60])
    ranks_subset = torch.tensor([0, 0, 1, 2, 2])
    metrics = cirr_metrics(ranks, ranks_subset)
    assert metrics["recall_at_1"] == pytest.approx(20.0)
    assert metrics["recall_at_5"] == pytest.approx(40.0)
    assert metrics["recall_at_10"] == pytest.approx(60.0)
    assert metrics["recall_at_50"] == pytest.approx(80.0)
    assert metrics["recall_subset_at_1"] == pytest.approx(40.0)
    assert metrics["recall_subset_at_2"] == pytest.approx(60.0)
    assert metrics["recall_subset_at_3"] == pytest.approx(100.0)
    assert metrics["agg_metrics"] == metrics["r_mean"] == pytest.approx(40.0)


def test_fashioniq_metrics_average_categories():
    metrics = fashioniq_metrics({"dress": torch.tensor([5, 60]), "shirt": torch.tensor([20, 30])})
    assert metrics["dress_recall_at_10"] == pytest.approx(50.0)
    assert metrics["shirt_recall_at_10"] == pytest.approx(0.0)
    assert metrics["shirt_recall_at_50"] == pytest.approx(100.0)
    assert metrics["average_recall_at_10"] == pytest.approx(25.0)
    assert metrics["average_recall_at_50"] == pytest.approx(75.0)
    assert metrics["agg_metrics"] == pytest.approx(50.0)


def test_ranks_reject_out_of_range_targets():
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        target_ranks(torch.zeros(1, 3), torch.tensor([3]))


def test_target_pad_limits_the_aspect_ratio():
    padded = target_pad(Image.new("RGB", (200, 100)), 1.25)
    assert padded.size == (200, 160)  # side 200/1.25 = 160: 30 px black above and below
    assert padded.getpixel((0, 0)) == (0, 0, 0)
    assert target_pad(Image.new("RGB", (110, 100)), 1.25).size == (110, 100)


@pytest.fixture(scope="module")
def toy_cirr(tmp_path_factory):
    from vlext.toyworld import write_cirr

    return write_cirr(tmp_path_factory.mktemp("cirr") / "cirr_dataset", 12, 12, 6, seed=0, image_size=32)


def test_cirr_builder_reads_the_official_layout(toy_cirr):
    datasets = build_datasets("cirr", toy_cirr, ["train", "val", "test"])
    item = datasets["train"][0]
    assert item["image"].shape == item["target"].shape == (3, 32, 32)
    assert isinstance(item["text_input"], str) and item["text_input"]
    val = datasets["val"]
    assert len(val) == 12 and val.has_targets
    assert len(val.gallery) == len(
        json.loads((toy_cirr / "cirr/image_splits/split.rc2.val.json").read_text())
    )
    assert not datasets["test"].has_targets


def test_missing_image_is_named(toy_cirr, tmp_path):
    import shutil

    root = tmp_path / "cirr_dataset"
    shutil.copytree(toy_cirr, root)
    relpath = next(iter(json.loads((root / "cirr/image_splits/split.rc2.val.json").read_text()).values()))
    (root / relpath).unlink()
    with pytest.raises(FileNotFoundError, match=relpath.split("/")[-1]):
        build_datasets("cirr", root, ["val"])


def test_corrupt_image_is_named(toy_cirr, tmp_path):
    import shutil

    root = tmp_path / "cirr_dataset"
    shutil.copytree(toy_cirr, root)
    rows = json.loads((root / "cirr/captions/cap.rc2.train.json").read_text())
    relpath = json.loads((root / "cirr/image_splits/split.rc2.train.json").read_text())[rows[0]["reference"]]
    (root / relpath).write_bytes(b"not a png")
    dataset = build_datasets("cirr", root, ["train"])["train"]
    with pytest.raises(ValueError, match=relpath.split("/")[-1] + ": not a readable image"):
        dataset[0]


def test_fashioniq_builder_joins_both_captions(tmp_path):
    from vlext.toyworld import write_fashioniq

    root = write_fashioniq(tmp_path / "fashionIQ_dataset", n_per_category=3, seed=0, image_size=32)
    datasets = build_datasets("fashioniq", root, ["train", "val"])
    assert len(datasets["train"]) == 9
    row = json.loads((root / "captions/cap.dress.val.json").read_text())[0]
    first = datasets["val"].triplets[0]["caption"]
    assert first.startswith(row["captions"][0].strip(".?, ")) and " and " in first


def test_task_evaluation_matches_a_brute_force_ranking(toy_cirr):
    """Ranking in query x gallery chunks equals sorting each query's full score list (reference removed)."""
    from lavis.common.registry import registry
    from lavis.models import load_model

    torch.manual_seed(0)
    model = load_model("blip2_cir_align_prompt", "tiny", is_eval=True)
    val = build_datasets("cirr", toy_cirr, ["val"])["val"]
    task = registry.get_task_class("composed_image_retrieval")(rank_chunk=5, rank_gallery_chunk=3)
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=val.collater)
    result = task.evaluation(model, loader)
    gallery = torch.stack([val.gallery[i]["image"] for i in range(len(val.gallery))])
    queries = [val[i] for i in range(len(val))]
    sim = model.inference(
        model.extract_reference_features(torch.stack([q["image"] for q in queries])),
        model.extract_target_features(gallery),
        [q["text_input"] for q in queries],
    )
    for q, row in enumerate(val.triplets):
        order = [
            i for i in sim[q].argsort(descending=True).tolist() if i != val.gallery_index[row["reference"]]
        ]
        assert result["ranks"][q].item() == order.index(val.gallery_index[row["target"]])
        members = [val.gallery_index[m] for m in row["members"] if m != row["reference"]]
        subset_order = [i for i in order if i in members]
        assert result["ranks_subset"][q].item() == subset_order.index(val.gallery_index[row["target"]])


def test_cirr_test_split_writes_submission_files(toy_cirr, tmp_path):
    from lavis.common.registry import registry
    from lavis.models import load_model

    torch.manual_seed(0)
    model = load_model("blip2_cir_align_prompt", "tiny", is_eval=True)
    test = build_datasets("cirr", toy_cirr, ["test"])["test"]
    task = registry.get_task_class("composed_image_retrieval")()
    registry.mapping["paths"]["result_dir"] = str(tmp_path)
    loader = torch.utils.data.DataLoader(test, batch_size=8, collate_fn=test.collater)
    metrics = task.after_evaluation(task.evaluation(model, loader), split_name="test", epoch="best")
    assert metrics == {"agg_metrics": 0.0}
    recall = json.loads((tmp_path / "recall_submission_test.json").read_text())
    subset = json.loads((tmp_path / "recall_subset_submission_test.json").read_text())
    assert recall["version"] == "rc2" and subset["metric"] == "recall_subset"
    for row in test.triplets:
        top = recall[str(row["pairid"])]
        assert len(top) == min(50, len(test.gallery) - 1) and row["reference"] not in top
        top3 = subset[str(row["pairid"])]
        assert len(top3) == 3 and set(top3) <= set(row["members"]) - {row["reference"]}


@pytest.mark.parametrize("key", ["rank_chunk", "rank_gallery_chunk"])
def test_task_rejects_non_positive_chunks(key):
    from lavis.common.registry import registry

    with pytest.raises(ValueError, match=f"run.{key} must be a positive int, got 0"):
        registry.get_task_class("composed_image_retrieval")(**{key: 0})


def test_lavis_import_leaves_truncated_images_refused():
    """LAVIS turns PIL's LOAD_TRUNCATED_IMAGES on at import; lavis_ext.compat turns it back off."""
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def copy_of(toy_cirr, tmp_path):
    import shutil

    root = tmp_path / "cirr_dataset"
    shutil.copytree(toy_cirr, root)
    return root


def test_truncated_image_is_named_not_padded(toy_cirr, tmp_path):
    root = copy_of(toy_cirr, tmp_path)
    rows = json.loads((root / "cirr/captions/cap.rc2.train.json").read_text())
    relpath = json.loads((root / "cirr/image_splits/split.rc2.train.json").read_text())[rows[0]["reference"]]
    data = (root / relpath).read_bytes()
    (root / relpath).write_bytes(data[: len(data) * 2 // 3])
    dataset = build_datasets("cirr", root, ["train"])["train"]
    with pytest.raises(ValueError, match=relpath.split("/")[-1] + ": not a readable image .*truncated"):
        dataset[0]


def edit_rows(root, split, edit):
    path = root / f"cirr/captions/cap.rc2.{split}.json"
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[3].pop("target_hard"), "row 3: 'target_hard' is missing or null"),
        (lambda rows: rows[2].pop("caption"), "row 2: 'caption' is missing or null"),
        (lambda rows: rows[1].update(caption=None), "row 1: 'caption' is missing or null"),
        (lambda rows: rows[4].update(caption="  "), "row 4: 'caption' must be a non-empty str"),
        (
            lambda rows: rows[0].update(reference="nope"),
            "row 0: 'reference' image 'nope' is not in the split",
        ),
        (lambda rows: rows[5]["img_set"].pop("members"), "row 5: 'members' is missing"),
    ],
    ids=["no_target_hard", "no_caption", "null_caption", "blank_caption", "unknown_reference", "no_members"],
)
def test_malformed_cirr_row_is_named_by_file_and_row(toy_cirr, tmp_path, edit, message):
    from lavis_ext.datasets.cir_datasets import AnnotationError

    root = copy_of(toy_cirr, tmp_path)
    path = edit_rows(root, "train", edit)
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        build_datasets("cirr", root, ["train"])


def test_malformed_captions_json_is_named(toy_cirr, tmp_path):
    from lavis_ext.datasets.cir_datasets import AnnotationError

    root = copy_of(toy_cirr, tmp_path)
    path = root / "cirr/captions/cap.rc2.val.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(AnnotationError, match=re.escape(f"{path} is not valid JSON")):
        build_datasets("cirr", root, ["val"])


def test_cirr_test1_rows_need_no_target(toy_cirr):
    datasets = build_datasets("cirr", toy_cirr, ["test"])
    assert len(datasets["test"]) == 6 and not datasets["test"].has_targets


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[1].pop("target"), "row 1: 'target' is missing or null"),
        (
            lambda rows: rows[0].update(captions=["only one"]),
            "row 0: 'captions' must hold two non-empty strings",
        ),
        (
            lambda rows: rows[2].update(captions=[None, "x"]),
            "row 2: 'captions' must hold two non-empty strings",
        ),
        (lambda rows: rows[0].pop("candidate"), "row 0: 'candidate' is missing or null"),
    ],
    ids=["no_target", "one_caption", "null_caption", "no_candidate"],
)
def test_malformed_fashioniq_row_is_named_by_file_and_row(tmp_path, edit, message):
    from lavis_ext.datasets.cir_datasets import AnnotationError
    from vlext.toyworld import write_fashioniq

    root = write_fashioniq(tmp_path / "fashionIQ_dataset", n_per_category=3, seed=0, image_size=32)
    path = root / "captions/cap.shirt.train.json"
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        build_datasets("fashioniq", root, ["train"])
