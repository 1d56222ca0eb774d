"""clip_ext bad inputs of issue 27 (and the token cache of issue 26, finding 4): each refused before work,
naming where and what is accepted, or fixed; each case is listed in docs/what_happens_when_clip.md."""

import json
import re

import open_clip
import pytest
import torch
from test_clip_open_clip_compat import assert_same_names, run_ours

from clip_ext import region_shards
from clip_ext.region_data import RegionDataError, load_region_table
from clip_ext.region_shards import REGION_KEY, RegionShardError, RegionStage
from clip_ext.train import parse_args
from vlext.toyworld.clip_shards import write_clip_shards

BOX = [0.1, 0.1, 0.6, 0.6]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("clip-ext-tiny")


# --- numeric flags: range, NaN and inf ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, accepted",
    [
        ("--region-loss-weight", "nan", "must be a finite number, got nan"),
        ("--hard-negative-weight", "inf", "must be a finite number, got inf"),
        ("--min-box-area", "nan", "must be a finite number, got nan"),
        (
            "--min-box-side",
            "1.0",
            "must be in [0, 1) (a share of the image side; 1 drops every box), got 1.0",
        ),
        ("--min-box-area", "-0.1", "must be in [0, 1) (a share of the image; 1 drops every box), got -0.1"),
        ("--logit-scale-init", "nan", "must be a finite number, got nan"),
        ("--memory-bank-warmup-steps", "-2", "must be >= 0, got -2"),
        ("--memory-bank-size", "-1", "must be >= 0 (0 = off), got -1"),
        ("--lr", "nan", "must be a finite number, got nan"),
    ],
)
def test_every_numeric_flag_is_checked_for_range_and_nan(tmp_path, flag, value, accepted):
    regions = tmp_path / "r.jsonl"
    regions.write_text("")
    with pytest.raises(SystemExit) as refused:
        parse_args(["--region-data", str(regions), flag, value])
    assert str(refused.value) == f"{flag} {accepted}"


# --- annotations that contradict themselves or are misspelt: CSV path ---------------------------------


def _jsonl(tmp_path, region):
    path = tmp_path / "regions.jsonl"
    path.write_text(json.dumps({"filepath": "a.png", "regions": [{"box": BOX, "caption": "a dog"}]}) + "\n"
                    + json.dumps({"filepath": "b.png", "regions": [region]}) + "\n")  # fmt: skip
    return path


@pytest.mark.parametrize(
    "region, problem",
    [
        ({"box": BOX, "caption": "a red square", "hard_negatives": ["a blue square", "A  Red square"]},
         "region 0 lists its own caption 'a red square' among its hard_negatives ('A  Red square'); a hard "
         "negative must differ from the caption (e.g. another colour word)"),
        ({"box": BOX, "caption": "a red square", "hard_negative": ["a blue square"]},
         "region 0 has unknown key 'hard_negative' (did you mean 'hard_negatives'?); a region accepts only "
         "'box', 'caption', 'hard_negatives'"),
    ],
)  # fmt: skip
def test_region_jsonl_refuses_own_caption_as_hard_negative_and_unknown_keys(tmp_path, region, problem):
    path = _jsonl(tmp_path, region)
    with pytest.raises(RegionDataError) as refused:
        load_region_table(path, ["a.png", "b.png"], 0.0, 0.01)
    assert str(refused.value) == f"{path}:2: {problem}"


# --- the same in shards, plus a misnamed member and a repeated key --------------------------------------


def _sample(key, members):
    sample = {"__key__": key, "__url__": "shards/000003.tar", "png": b"", "txt": b"a caption"}
    sample.update({name: value if isinstance(value, bytes) else json.dumps(value).encode()
                   for name, value in members.items()})  # fmt: skip
    return sample


GOOD = {"regions": [{"box": BOX, "caption": "a dog"}]}
WHERE = "webdataset sample '000017' of shards/000003.tar"


@pytest.mark.parametrize(
    "members, problem",
    [
        ({"regions.json": {"regions": [{"box": BOX, "caption": "a cat", "hard_negatives": ["a cat"]}]}},
         ", member 'regions.json': region 0 lists its own caption 'a cat' among its hard_negatives"),
        ({"regions.json": {"regions": [{"box": BOX, "caption": "a cat", "hard_negative": ["a dog"]}]}},
         ", member 'regions.json': region 0 has unknown key 'hard_negative' (did you mean 'hard_negatives'?)"),
        ({"regions.json": b'{"regions": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": "x", "box": [0, 0, 1, 1]}]}'},
         ", member 'regions.json': key 'box' appears twice in one object (JSON keeps only the last)"),
        ({"region.json": GOOD},
         ": member 'region.json' is not a region member this run reads; --wds-region-key names "
         "'regions.json;json' (first present wins). Rename the member, or pass --wds-region-key 'region.json'"),
    ],
)  # fmt: skip
def test_shards_refuse_at_read_time_naming_shard_key_and_what_is_accepted(tokenizer, members, problem):
    stage = RegionStage(tokenizer, hard_negatives=True)
    with pytest.raises(RegionShardError) as refused:
        list(stage([_sample("000000", {"regions.json": GOOD}), _sample("000017", members)]))
    assert str(refused.value).startswith(WHERE + problem)


def test_the_token_cache_keeps_every_caption_of_the_sample_it_serves(tokenizer, monkeypatch):
    """Issue 26 finding 4: at the cache limit a sample mixing a cached and a new caption raised KeyError."""
    monkeypatch.setattr(region_shards, "_TOKEN_CACHE", 2)
    stage = RegionStage(tokenizer)
    regions = [{"box": BOX, "caption": c} for c in ("a", "b", "c")]
    samples = [_sample(f"{k:06d}", {"regions.json": {"regions": regions[k : k + 2]}}) for k in range(2)]
    samples.append(_sample("000002", {"regions.json": {"regions": regions}}))  # 3 captions, limit 2
    records = [s[REGION_KEY] for s in stage(samples)]
    for record, caps in zip(records, (["a", "b"], ["b", "c"], ["a", "b", "c"])):
        assert torch.equal(record["text"], tokenizer(caps))
    assert list(stage._cache) == ["b", "c"]  # the least recently used caption was evicted


# --- webdataset without region flags: a crash at start for every user of the path -----------------------


@pytest.mark.parametrize("extra", [[], ["--memory-bank-size", "8"]], ids=["plain", "bank"])
def test_webdataset_without_region_flags_trains_end_to_end(tmp_path, extra):
    shard = write_clip_shards(tmp_path / "wds", 8, shards=1, seed=0, image_size=32)[0]
    run_ours([
        "--model", "clip-ext-tiny", "--train-data", str(shard), "--dataset-type", "webdataset",
        "--train-num-samples", "8", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1", "--workers", "0",
        "--device", "cpu", "--precision", "fp32", "--seed", "0", "--epochs", "1", "--logs", str(tmp_path / "logs"),
        "--name", "run", "--log-every-n-steps", "1", "--save-frequency", "1", *extra,
    ])  # fmt: skip
    log = (tmp_path / "logs/run/out.log").read_text()
    assert len(re.findall(r"Contrastive_loss: [\d.]+", log)) == 2  # 8 samples, 2 steps of 4
    checkpoint = torch.load(
        tmp_path / "logs/run/checkpoints/epoch_1.pt", map_location="cpu", weights_only=False
    )
    assert checkpoint["epoch"] == 1
    if extra:
        assert int(checkpoint["clip_ext"]["state_dict"]["memory_bank.filled"]) == 8
    assert_same_names()
