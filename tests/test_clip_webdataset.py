"""Region boxes and hard negatives from webdataset shards (clip_ext.region_shards) through open_clip's own
webdataset pipeline: the toy shards, the region stage's checks, and equality with the CSV path."""

import io
import json
import re
import tarfile

import numpy as np
import open_clip
import open_clip_train.data as host_data
import pytest
import torch
import torch.utils.data
from PIL import Image
from test_clip_open_clip_compat import assert_same_names, run_ours

from clip_ext.loss import MemoryBankClipLoss
from clip_ext.region_shards import REGION_KEY, RegionShardError, RegionStage, collate_region_batch
from clip_ext.train import parse_args
from vlext.toyworld import write_clip_csv
from vlext.toyworld.clip_shards import write_clip_shards


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_toy_shards_hold_the_csv_samples_and_are_byte_identical_per_arguments(tmp_path):
    csv_path = write_clip_csv(tmp_path / "csv", 5, seed=3, image_size=32)
    shards = write_clip_shards(tmp_path / "wds", 5, shards=2, seed=3, image_size=32)
    again = write_clip_shards(tmp_path / "again", 5, shards=2, seed=3, image_size=32)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in again]
    rows = [line.split("\t") for line in csv_path.read_text().splitlines()[1:]]
    regions = [json.loads(line) for line in (tmp_path / "csv/train_regions.jsonl").read_text().splitlines()]
    members = {**_members(shards[0]), **_members(shards[1])}
    assert len(_members(shards[0])) == 3 * 3 and len(_members(shards[1])) == 2 * 3  # sizes 3 + 2
    assert json.loads((shards[0].parent / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 2}
    for i, ((path, title), line) in enumerate(zip(rows, regions)):
        key = f"{i:06d}"
        assert members[f"{key}.txt"].decode() == title
        assert json.loads(members[f"{key}.regions.json"]) == {"regions": line["regions"]}
        shard_pixels = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        assert np.array_equal(shard_pixels, np.asarray(Image.open(path)))


# --- the region stage: checks and counts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("clip-ext-tiny")


def _sample(key, member="regions.json", value=None):
    sample = {"__key__": key, "__url__": "shards/000003.tar", "png": b"", "txt": b"a caption"}
    if value is not None:
        sample[member] = value if isinstance(value, bytes) else json.dumps(value).encode()
    return sample


@pytest.mark.parametrize(
    "value, problem",
    [
        (b"{not json", "not valid JSON"),
        ({"boxes": []}, "no 'regions' key"),
        ({"regions": [{"box": [4, 4, 20, 30], "caption": "a red square"}]}, "lies outside [0, 1]"),
        ({"regions": [{"box": [0.6, 0.1, 0.2, 0.5], "caption": "x"}]}, "needs x0 < x1"),
        ({"regions": [{"box": [0.1, 0.2, 0.3], "caption": "x"}]}, "region 0 box must be 4 numbers"),
        ({"regions": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": ""}]}, "caption must be a non-empty string"),
    ],
)
def test_a_malformed_region_member_stops_naming_shard_key_and_the_flag(tokenizer, value, problem):
    stage = RegionStage(tokenizer)
    with pytest.raises(RegionShardError) as refused:
        list(stage([_sample("000000", value={"regions": []}), _sample("000017", value=value)]))
    message = str(refused.value)
    assert message.startswith("webdataset sample '000017' of shards/000003.tar, member 'regions.json': ")
    assert problem in message and "--skip-bad-regions" in message


def test_with_skip_bad_regions_a_malformed_member_is_ignored_and_counted(tokenizer):
    stage = RegionStage(tokenizer, skip_bad=True)
    good = {"regions": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": "a red square"}]}
    out = list(stage([_sample("a", value=good), _sample("b", value=b"[1,"), _sample("c", value=b"7"),
                      _sample("d", value=good)]))  # fmt: skip
    assert [s["__key__"] for s in out] == [
        "a",
        "b",
        "c",
        "d",
    ]  # image and caption still train the global loss
    # counts: samples, without regions, kept, dropped by side, dropped by area, skipped, with negatives
    assert [s[REGION_KEY]["counts"] for s in out] == [[1, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 0],
                                                      [1, 1, 0, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0, 0]]  # fmt: skip
    assert "regions.json" not in out[1]  # the malformed member does not reach open_clip's decoder


def test_samples_without_regions_and_metadata_json_train_the_global_loss_only(tokenizer):
    stage = RegionStage(tokenizer, min_area=0.05, hard_negatives=True)
    two = {"regions": [{"box": [0.1, 0.1, 0.6, 0.6], "caption": "a red square", "hard_negatives": ["a blue square"]},
                       {"box": [0.1, 0.1, 0.2, 0.2], "caption": "a tiny star"}]}  # fmt: skip
    samples = [
        _sample("none"),  # no region member at all
        _sample("meta", member="json", value={"url": "http://x", "caption": "c"}),  # img2dataset metadata
        _sample("two", value=two),  # the second box is below --min-box-area
    ]
    records = [s[REGION_KEY] for s in stage(samples)]
    # counts: samples, without regions, kept, dropped by side, dropped by area, skipped, with negatives
    assert [r["counts"] for r in records] == [
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 1, 0, 1],
    ]
    batch = collate_region_batch(
        [(torch.zeros(3, 2, 2), torch.zeros(77, dtype=torch.long), r) for r in records]
    )
    extras = batch[2]
    assert extras["region_valid"].tolist() == [[False], [False], [True]]  # padded to R = 1
    assert extras["region_caption_ids"][:2].tolist() == [[-1], [-1]]
    assert torch.equal(extras["region_text"][2, 0], tokenizer(["a red square"])[0])
    assert extras["region_hard_negative_valid"].tolist() == [[[False]], [[False]], [[True]]]
    assert extras["_counts"].tolist() == [3, 2, 1, 0, 1, 0, 1]


def test_flags_of_the_csv_path_are_refused_on_shards_naming_what_applies(tmp_path):
    wds = ["--dataset-type", "webdataset", "--train-data", "s/{000000..000003}.tar"]
    regions = tmp_path / "r.jsonl"
    regions.write_text("")
    with pytest.raises(SystemExit, match="--region-data is a JSONL matched to CSV rows; webdataset shards"):
        parse_args([*wds, "--region-data", str(regions)])
    with pytest.raises(
        SystemExit, match="--skip-bad-images needs --dataset-type csv.*use --skip-bad-regions"
    ):
        parse_args([*wds, "--skip-bad-images"])
    with pytest.raises(SystemExit, match="--skip-bad-regions applies to the region members of"):
        parse_args(["--train-data", "x.csv", "--skip-bad-regions"])
    args = parse_args([*wds, "--hard-negative-weight"])  # auto-detected as well: a .tar suffix
    assert (args.region_source, args.region_loss_weight, args.hard_negative_weight) == (
        "webdataset",
        0.0,
        0.5,
    )
    assert parse_args(
        ["--train-data", "s/{000000..000003}.tar", "--region-loss-weight", "0.1"]
    ).region_source == ("webdataset")
    assert parse_args(wds).region_source is None  # no weight: plain open_clip on shards


# --- end to end: the same numbers as the CSV path -------------------------------------------------------


def _argv(data_args, logs, name, *extra):
    return [
        "--model", "clip-ext-tiny", *data_args, "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
        "--workers", "1", "--device", "cpu", "--precision", "fp32", "--seed", "0", "--epochs", "2",
        "--logs", str(logs), "--name", name, "--min-box-area", "0.02", "--log-every-n-steps", "1", *extra,
    ]  # fmt: skip


class _InFileOrder(torch.utils.data.DataLoader):
    """clip_ext's CSV loader without its shuffle: CSV rows in file order."""

    def __init__(self, *args, shuffle=False, **kwargs):
        super().__init__(*args, shuffle=False, **kwargs)


def _recorded_run(argv, monkeypatch):
    """Train; returns the per-step losses (every entry, as Python floats) and the final state_dict."""
    steps = []
    forward = MemoryBankClipLoss.forward

    def recording(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        steps.append({k: v.item() for k, v in losses.items()})
        return losses

    monkeypatch.setattr(MemoryBankClipLoss, "forward", recording)
    model = run_ours(argv)
    monkeypatch.setattr(MemoryBankClipLoss, "forward", forward)
    return steps, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_webdataset_path_equals_the_csv_path_on_the_same_samples_in_the_same_order(tmp_path, monkeypatch):
    """With the memory bank on (it keeps region captions and their ids too). Order made equal: the CSV loader reads rows in file order (shuffle off); the shard holds the same
    samples in that order, one shard (open_clip's shard shuffle of one shard is the identity), one worker,
    and open_clip's sample shuffle buffer at 1 (its module constants, read when the pipeline is built)."""
    write_clip_csv(tmp_path / "csv", 8, seed=0, image_size=32)
    shard = write_clip_shards(tmp_path / "wds", 8, shards=1, seed=0, image_size=32)[0]
    monkeypatch.setattr(host_data, "_SAMPLE_SHUFFLE_SIZE", 1)
    monkeypatch.setattr(host_data, "_SAMPLE_SHUFFLE_INITIAL", 1)
    losses = "--region-loss-weight", "0.1", "--hard-negative-weight", "0.5", "--memory-bank-size", "8"
    monkeypatch.setattr(torch.utils.data, "DataLoader", _InFileOrder)
    csv_steps, csv_state = _recorded_run(
        _argv(["--train-data", str(tmp_path / "csv/train.csv"), "--dataset-type", "csv", "--region-data",
               str(tmp_path / "csv/train_regions.jsonl")], tmp_path / "logs", "csv", *losses), monkeypatch,
    )  # fmt: skip
    monkeypatch.undo()
    monkeypatch.setattr(host_data, "_SAMPLE_SHUFFLE_SIZE", 1)
    monkeypatch.setattr(host_data, "_SAMPLE_SHUFFLE_INITIAL", 1)
    wds_steps, wds_state = _recorded_run(
        _argv(["--train-data", str(shard), "--dataset-type", "webdataset", "--train-num-samples", "8"],
              tmp_path / "logs", "wds", *losses), monkeypatch,
    )  # fmt: skip
    assert len(csv_steps) == 4 and set(csv_steps[0]) == {
        "contrastive_loss",
        "region_loss",
        "hard_negative_loss",
    }
    assert wds_steps == csv_steps  # every loss of every step, bit for bit
    assert all(s["region_loss"] > 0 and s["hard_negative_loss"] > 0 for s in wds_steps)
    assert csv_state.keys() == wds_state.keys()
    # the bank's region caption ids name captions differently (CSV: index in the file's sorted captions; shards:
    # a hash of the text) but must say the same thing: equal ids exactly where the captions are equal
    ids = "memory_bank.region_id_queue"
    assert [k for k in csv_state if not torch.equal(csv_state[k], wds_state[k])] == [ids]
    a, b = csv_state[ids], wds_state[ids]
    assert torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :]) and int((a >= 0).sum()) == 8
    log = (tmp_path / "logs/wds/out.log").read_text()
    assert "epoch 1: webdataset regions: 8 samples, 0 without regions" in log
    assert "is replaced by a box-aware one" in log
    assert_same_names()


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_a_bad_member_in_a_worker_stops_training_naming_shard_and_key_or_is_skipped(tmp_path):
    """A malformed member raised in a loader worker reaches the user as a clean message; with
    --skip-bad-regions the sample trains the global loss only and is counted, as is a sample without regions."""
    shard = write_clip_shards(tmp_path / "wds", 8, shards=1, seed=0, image_size=32)[0]
    members = _members(shard)
    members["000005.regions.json"] = b'{"regions": [{"box": [3, 4, 20, 30], "caption": "pixels"}]}'
    del members["000002.regions.json"]
    bad = tmp_path / "bad.tar"
    _tar(bad, sorted(members.items()))
    # 8 samples, 2 batches of 4: each epoch reads the whole shard once (in open_clip's shuffled order)
    data = ["--train-data", str(bad), "--dataset-type", "webdataset", "--train-num-samples", "8"]
    with pytest.raises(SystemExit) as refused:
        run_ours(_argv(data, tmp_path / "logs", "stops", "--region-loss-weight", "0.1"))
    message = str(refused.value)
    assert message.startswith(f"webdataset sample '000005' of {bad}, member 'regions.json': box 0 = ")
    assert "lies outside [0, 1]" in message
    assert "Traceback" not in message and "--skip-bad-regions" in message
    assert not list((tmp_path / "logs/stops").rglob("*.pt"))
    assert_same_names()
    run_ours(_argv(data, tmp_path / "logs", "skips", "--region-loss-weight", "0.1", "--skip-bad-regions"))
    log = (tmp_path / "logs/skips/out.log").read_text()
    assert "--skip-bad-regions: the sample trains the global loss only: webdataset sample '000005'" in log
    epochs = [
        line.split("webdataset regions: ")[1] for line in log.splitlines() if ": webdataset regions: " in line
    ]
    assert len(epochs) == 2
    for epoch in epochs:  # 000002 has no member, 000005's is skipped: both train the global loss only
        assert epoch.startswith("8 samples, 2 without regions (global loss only)")
        assert epoch.endswith("1 malformed region members skipped (--skip-bad-regions)")
    assert len(re.findall(r"Region_loss: [\d.]+", log)) == 4


def test_hard_negatives_on_but_absent_from_the_shards_is_warned_each_epoch(tmp_path):
    shard = write_clip_shards(tmp_path / "wds", 4, shards=1, seed=0, image_size=32)[0]
    members = _members(shard)
    for name in [n for n in members if n.endswith(".regions.json")]:
        regions = json.loads(members[name])["regions"]
        members[name] = json.dumps(
            {"regions": [{"box": r["box"], "caption": r["caption"]} for r in regions]}
        ).encode()
    plain = tmp_path / "plain.tar"
    _tar(plain, sorted(members.items()))
    data = [
        "--train-data",
        str(plain),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        "4",
        "--workers",
        "0",
    ]
    run_ours(_argv(data, tmp_path / "logs", "nohn", "--hard-negative-weight", "--epochs", "1"))
    log = (tmp_path / "logs/nohn/out.log").read_text()
    assert re.search(
        r"--hard-negative-weight: none of the [1-9]\d* regions of epoch 0 carried 'hard_negatives'", log
    )
    assert re.findall(r"Hard_negative_loss: ([\d.]+)", log) == ["0.0000"]
