"""Region boxes and hard negatives in webdataset shards, through open_clip's own webdataset pipeline.

A sample of a shard may carry a JSON region member (``--wds-region-key``, by default ``regions.json``, else
the ``json`` member that img2dataset shards carry)::

    000123.jpg  000123.txt  000123.regions.json = {"regions": [{"box": [x0, y0, x1, y1], "caption": "...",
                                                             "hard_negatives": ["...", ...]}]}

boxes in normalized xyxy, as ``--region-data`` lines on the CSV path. A ``json`` member without a
``"regions"`` key is sample metadata (a sample without regions); any other region member must have one.

Where we hook in, and why there. ``open_clip_train.data.get_wds_dataset`` builds a ``wds.DataPipeline``
(shard list or ``ResampledShards2`` with ``--train-data-upsampling-factors``, ``detshuffle2``,
``split_by_node``, ``split_by_worker``, tar expansion, the sample shuffle buffer, then ``select``, ``decode``,
``rename``, ``map_dict``, ``to_tuple("image", "text")``, ``batched``) and returns it inside its
``WebLoader``; nothing of it runs until the loader is iterated. :func:`attach_region_stages` edits that
returned pipeline object (its public ``pipeline`` list) before the first iteration: it inserts
:class:`RegionStage` just before ``decode``, extends ``to_tuple`` by our record and gives ``batched`` our
collation. Everything that decides which sample a worker sees, when and how often (node and worker split,
shuffles, resampling, epochs, ``--train-num-samples``) stays open_clip's own objects, built by its own code.
The alternatives are worse: rebinding names that ``get_wds_dataset`` looks up in its module (``wds``,
``filter_no_caption_or_no_image``) changes them for every pipeline built meanwhile (the val split too) and
for any other caller, and a pipeline of our own would drift from the host's. If the stages we extend are
not found (another open_clip release), :func:`attach_region_stages` stops naming what it looked for.

Why before ``decode``: open_clip decodes with ``handler=log_and_continue``, which would log a malformed JSON
member and drop the sample. :class:`RegionStage` parses the raw bytes itself: a malformed member stops
training naming the shard and the sample's ``__key__``, or with ``--skip-bad-regions`` the member is
ignored (the image and caption train the global loss only), logged and counted. It files its result under a key starting with ``__``, which webdataset's decoder
passes through untouched. Boxes follow the box rule and ``--min-box-area`` / ``--min-box-side`` through the
same :func:`clip_ext.region.filter_boxes` as the CSV path, and captions are tokenized in the workers.

Batches: :func:`collate_region_batch` pads regions to the batch's largest count (at least 1) and hard
negatives likewise; :class:`RegionShardLoader` (main process) pads the region count to the largest over
ranks (the DDP region loss gathers equal shapes), files the extras in the side channel of
:mod:`clip_ext.region_data` and counts what it saw. Caption ids (same caption = not a negative) are a
64-bit hash of the caption text, the same in every worker and rank without a shared vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict

import torch

from clip_ext.region import filter_boxes, kept_box_mask
from clip_ext.region_data import parse_region_list

__all__ = [
    "RegionShardError",
    "RegionStage",
    "collate_region_batch",
    "attach_region_stages",
    "RegionShardLoader",
]

REGION_KEY = "__clip_ext_regions__"  # webdataset's decoder passes "__" keys through untouched
DEFAULT_REGION_KEYS = "regions.json;json"
METADATA_MEMBER = "json"  # img2dataset's per-sample metadata: may carry "regions", need not
SKIP_FLAG = "--skip-bad-regions"
FORMAT_HINT = (
    '{"regions": [{"box": [x0, y0, x1, y1] (normalized), "caption": "...", "hard_negatives": ["...", ...] '
    "(optional)}]}"
)
COUNTS = ("samples", "without_regions", "kept", "dropped_min_side", "dropped_min_area", "skipped",
          "with_negatives")  # fmt: skip
_TOKEN_CACHE = 65536  # distinct captions kept tokenized per worker (short region phrases repeat a lot)


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list) -> dict:
    """``json.loads`` keeps only the last of a repeated key (a second ``"box"`` would silently win)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class RegionShardError(ValueError):
    """A region member of a webdataset sample is malformed."""


def caption_id(caption: str) -> int:
    """A non-negative 63-bit id of the caption text (Python's ``hash`` differs per process)."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def parse_regions(obj, member: str, where: str) -> tuple[list, list[str], list[list[str]]]:
    """(boxes, captions, hard negatives) of one decoded region member, its JSON shape checked (the box rule
    is checked by :func:`clip_ext.region.filter_boxes` in :meth:`RegionStage.checked`)."""
    if not isinstance(obj, dict):
        raise RegionShardError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "regions" not in obj:
        if member == METADATA_MEMBER:
            return [], [], []
        raise RegionShardError(f"{where}: no 'regions' key")
    regions = obj["regions"]
    if not isinstance(regions, list):
        raise RegionShardError(f"{where}: 'regions' must be a list, got {type(regions).__name__}")
    # the box rule is checked a group of samples at a time in RegionStage.checked
    return parse_region_list(regions, where, RegionShardError, box_rule=False)


class RegionStage:
    """A webdataset pipeline stage (runs in the loader workers): parses, checks, filters and tokenizes each
    sample's region member into ``sample[REGION_KEY]``; the sample's other members pass on unchanged.

    Samples pass in order, ``group`` at a time: the box rule and the size filters run once per group on all
    its boxes (torch's per-call overhead on a 3-box tensor is most of the cost), and only a group that
    fails is checked sample by sample, to name the sample."""

    def __init__(self, tokenizer, min_area: float = 0.0, min_side: float = 0.01, hard_negatives: bool = False,
                 skip_bad: bool = False, keys: str = DEFAULT_REGION_KEYS, group: int = 64,
                 token_cache: int | None = None):  # fmt: skip
        token_cache = _TOKEN_CACHE if token_cache is None else token_cache
        if token_cache < 1:
            raise ValueError(f"token_cache must be >= 1 caption, got {token_cache}")
        self.tokenizer, self.min_area, self.min_side = tokenizer, min_area, min_side
        self.token_cache = token_cache
        self.hard_negatives, self.skip_bad, self.group = hard_negatives, skip_bad, group
        self.keys = [k.strip().lower() for k in keys.split(";") if k.strip()]
        if not self.keys:
            raise ValueError(f"--wds-region-key must name at least one member, got {keys!r}")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first
        self._length: int | None = None

    def _context_length(self) -> int:
        if self._length is None:
            self._length = int(self.tokenizer(["a"]).shape[-1])
        return self._length

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        """Token rows of ``captions``, from a least-recently-used cache of ``token_cache`` captions.

        The rows of this call are taken before anything is evicted, so a call mixing cached and new captions
        never looks up one the eviction just removed (the cache used to be cleared and refilled with the new
        captions only: a KeyError after 32,704 samples per worker at the real limit, issue 26)."""
        if not captions:
            return torch.zeros(0, self._context_length(), dtype=torch.long)
        unique = list(dict.fromkeys(captions))
        missing = [c for c in unique if c not in self._cache]
        rows = dict(zip(missing, self.tokenizer(missing).clone())) if missing else {}
        for c in unique:
            if c not in rows:
                rows[c] = self._cache[c]
            self._cache[c] = rows[c]
            self._cache.move_to_end(c)
        while len(self._cache) > self.token_cache:
            self._cache.popitem(last=False)
        return torch.stack([rows[c] for c in captions])

    def _bad(self, sample: dict, error: RegionShardError) -> tuple[list, list, list, int]:
        """A malformed member: stop naming it, or with --skip-bad-regions train the sample without regions."""
        if not self.skip_bad:
            raise RegionShardError(f"{error}; expected {FORMAT_HINT}. Fix the shard, or pass {SKIP_FLAG} to "
                                   "train such samples on the global loss only (each logged, counted per "
                                   "epoch)") from None  # fmt: skip
        logging.warning("%s: the sample trains the global loss only: %s", SKIP_FLAG, error)
        return [], [], [], 1

    def _parsed(self, sample: dict) -> tuple[str, list, list, list, int]:
        member = next((k for k in self.keys if k in sample), None)
        where = f"webdataset sample {sample.get('__key__')!r} of {sample.get('__url__')}"
        if member is None:
            misnamed = [k for k in sample if not k.startswith("__") and "region" in k.lower()]
            if misnamed:
                # a region member under another name would train every sample without regions
                raise RegionShardError(f"{where}: member {misnamed[0]!r} is not a region member this run reads; "
                                       f"--wds-region-key names {';'.join(self.keys)!r} (first present wins). "
                                       f"Rename the member, or pass --wds-region-key '{misnamed[0]}'")  # fmt: skip
            return where, [], [], [], 0
        where += f", member {member!r}"
        raw = sample.pop(member)
        for other in self.keys:  # open_clip's decoder never sees a region member
            sample.pop(other, None)
        try:
            try:
                obj = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RegionShardError(f"{where}: not valid JSON ({e})") from None
            except _DuplicateKey as e:
                raise RegionShardError(f"{where}: key {e.args[0]!r} appears twice in one object (JSON keeps "
                                       "only the last)") from None  # fmt: skip
            return (where, *parse_regions(obj, member, where), 0)
        except RegionShardError as e:
            return (where, *self._bad(sample, e))

    def checked(self, samples: list[dict]) -> list[dict]:
        """The region records of ``samples`` (see :func:`collate_region_batch`)."""
        parsed = [list(self._parsed(sample)) for sample in samples]
        everything = torch.tensor([b for p in parsed for b in p[1]], dtype=torch.float32).reshape(-1, 4)
        try:
            filter_boxes(everything, self.min_area, self.min_side, where="group")
        except ValueError:
            for sample, p in zip(samples, parsed):  # find the sample(s) breaking the box rule
                try:
                    filter_boxes(torch.tensor(p[1]).reshape(-1, 4), self.min_area, self.min_side, where=p[0])
                except ValueError as e:
                    p[1:] = self._bad(sample, RegionShardError(str(e)))
            everything = torch.tensor([b for p in parsed for b in p[1]], dtype=torch.float32).reshape(-1, 4)
        keep = kept_box_mask(everything, self.min_area, self.min_side)
        side_ok = kept_box_mask(everything, 0.0, self.min_side)  # the side rule alone (areas are >= 0)
        records, first = [], 0
        for sample, (_, boxes, captions, negatives, skipped) in zip(samples, parsed):
            rows = slice(first, first + len(boxes))
            first += len(boxes)
            mask = keep[rows].tolist()
            captions = [c for c, k in zip(captions, mask) if k]
            negatives = [n for n, k in zip(negatives, mask) if k]
            dropped_side = int((~side_ok[rows]).sum())
            record = {
                "boxes": everything[rows][keep[rows]],
                "text": self._tokens(captions),
                "ids": torch.tensor([caption_id(c) for c in captions], dtype=torch.long),
                "counts": [
                    1,
                    int(not captions),
                    len(captions),
                    dropped_side,
                    len(boxes) - len(captions) - dropped_side,
                    skipped,
                    sum(1 for n in negatives if n),
                ],  # fmt: skip
                "key": f"{sample.get('__url__')}#{sample.get('__key__')}",
            }
            if self.hard_negatives:
                m = max((len(n) for n in negatives), default=0)
                tokens = torch.zeros(len(captions), m, self._context_length(), dtype=torch.long)
                valid = torch.zeros(len(captions), m, dtype=torch.bool)
                for k, hard in enumerate(negatives):
                    if hard:
                        tokens[k, : len(hard)] = self._tokens(hard)
                        valid[k, : len(hard)] = True
                record.update(hn_text=tokens, hn_valid=valid)
            records.append(record)
        return records

    def __call__(self, samples):
        group = []
        for sample in samples:
            group.append(sample)
            if len(group) == self.group:
                yield from self._flush(group)
                group = []
        yield from self._flush(group)

    def _flush(self, group: list[dict]):
        if group:
            for sample, record in zip(group, self.checked(group)):
                sample[REGION_KEY] = record
                yield sample


def _pad(tensors: list[torch.Tensor], size: int, dim: int = 0, value=0) -> torch.Tensor:
    """Stack ``tensors`` after padding each along ``dim`` to ``size``."""
    out = []
    for t in tensors:
        shape = list(t.shape)
        shape[dim] = size - t.shape[dim]
        out.append(torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=dim))
    return torch.stack(out)


def collate_region_batch(samples: list[tuple]) -> list:
    """``(image, text, record)`` samples -> ``[images, texts, extras]``, regions padded to the batch's largest
    count R >= 1 (zero box, no tokens, id -1, valid False), hard negatives to the largest M >= 1."""
    images = torch.stack([s[0] for s in samples])
    texts = torch.stack([s[1] for s in samples])
    records = [s[2] for s in samples]
    r = max(1, max(len(rec["ids"]) for rec in records))
    extras = {
        "region_boxes": _pad([rec["boxes"] for rec in records], r),
        "region_valid": torch.stack([torch.arange(r) < len(rec["ids"]) for rec in records]),
        "region_text": _pad([rec["text"] for rec in records], r),
        "region_caption_ids": _pad([rec["ids"] for rec in records], r, value=-1),
        "_counts": torch.tensor([rec["counts"] for rec in records], dtype=torch.long).sum(0),
        "_keys": [rec["key"] for rec in records],
    }
    if "hn_text" in records[0]:
        m = max(1, max(rec["hn_valid"].shape[1] for rec in records))
        text = [_pad([rec["hn_text"]], m, dim=1)[0] for rec in records]
        valid = [_pad([rec["hn_valid"]], m, dim=1, value=False)[0] for rec in records]
        extras["region_hard_negative_text"] = _pad(text, r)
        extras["region_hard_negative_valid"] = _pad(valid, r, value=False)
    return [images, texts, extras]


def _is(stage, name: str) -> bool:
    return getattr(getattr(stage, "f", None), "__name__", None) == name


def _train_pipeline(loader):
    """The ``wds.DataPipeline`` inside open_clip's ``WebLoader`` (itself a pipeline over a torch DataLoader)."""
    stages = getattr(loader, "pipeline", None)
    inner = stages[0] if isinstance(stages, list) and stages else loader
    return getattr(inner, "dataset", None)


def attach_region_stages(loader, stage: RegionStage) -> None:
    """Extend the pipeline open_clip's ``get_wds_dataset`` built and put in ``loader`` (see the module
    docstring), in place, before its workers start."""
    import webdataset as wds

    dataset = _train_pipeline(loader)
    pipeline = getattr(dataset, "pipeline", None)
    if not isinstance(pipeline, list):
        raise SystemExit(f"clip_ext: open_clip's webdataset train data is a {type(dataset).__name__} without a "
                         "stage list; clip_ext supports open_clip_torch 3.x")  # fmt: skip
    found = {
        name: [i for i, s in enumerate(pipeline) if _is(s, name)]
        for name in ("_decode", "_to_tuple", "_batched")
    }
    tuples = [i for i in found["_to_tuple"] if tuple(pipeline[i].args) == ("image", "text")]
    if len(found["_decode"]) != 1 or len(tuples) != 1 or len(found["_batched"]) != 1:
        raise SystemExit(
            "clip_ext: open_clip's webdataset pipeline no longer has one decode, one to_tuple('image', 'text') "
            f"and one batched stage (stages: {[str(s) for s in pipeline]}); clip_ext supports open_clip_torch 3.x"
        )
    batched = pipeline[found["_batched"][0]]
    pipeline[found["_batched"][0]] = wds.batched(
        *batched.args, **{**batched.kw, "collation_fn": collate_region_batch}
    )
    pipeline[tuples[0]] = wds.to_tuple("image", "text", REGION_KEY, **pipeline[tuples[0]].kw)
    pipeline.insert(found["_decode"][0], stage)


class RegionShardLoader:
    """The host's ``WebLoader`` as ``train_one_epoch`` expects it (``(images, texts)`` batches, ``num_batches``,
    ``num_samples``); each batch's region extras go to ``channel`` keyed by its image tensor, moved to the
    training device and dtype here (see :class:`clip_ext.region_data.SideChannelLoader`)."""

    def __init__(self, loader, channel, device, dtype):
        self.loader, self.channel, self.device, self.dtype = loader, channel, torch.device(device), dtype
        self.num_samples, self.num_batches = loader.num_samples, loader.num_batches
        self.counts = torch.zeros(len(COUNTS), dtype=torch.long)
        self.last_counts: dict[str, int] = {}  # what epoch_summary() last reported

    def __len__(self) -> int:
        return self.num_batches

    @staticmethod
    def _world() -> int:
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _pad_to_ranks(self, extras: dict) -> dict:
        """Pad the region count to the largest of all ranks: the DDP region loss gathers equal shapes."""
        if self._world() == 1:
            return extras
        r = torch.tensor([extras["region_valid"].shape[1]], device=self.device)
        torch.distributed.all_reduce(r, op=torch.distributed.ReduceOp.MAX)
        r = int(r)
        padded = {}
        for key, value in extras.items():
            if key.startswith("region_") and value.shape[1] < r:
                shape = list(value.shape)
                shape[1] = r - value.shape[1]
                fill = -1 if key == "region_caption_ids" else 0
                value = torch.cat([value, torch.full(shape, fill, dtype=value.dtype, device=value.device)], 1)
            padded[key] = value
        return padded

    def _receive(self, images, texts, extras):
        """One batch from the workers: count it, move it, file its extras; returns what the host gets."""
        self.counts += extras.pop("_counts")
        extras.pop("_keys")
        images = images.to(device=self.device, dtype=self.dtype, non_blocking=True)
        extras = {k: v.to(self.device, non_blocking=True) for k, v in extras.items()}
        self.channel.put(images, self._pad_to_ranks(extras))
        return images, texts

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                images, texts, extras = next(batches)
            except StopIteration:
                return
            except RegionShardError as e:  # raised in a worker, re-raised here with the worker's traceback
                raise SystemExit(str(e).rsplit("RegionShardError: ", 1)[-1].strip()) from None
            yield self._receive(images, texts, extras)

    def epoch_summary(self) -> str:
        """Counts since the last call, summed over ranks (every rank must call it)."""
        counts = self.counts.to(self.device)
        if self._world() > 1:
            torch.distributed.all_reduce(counts)
        c = dict(zip(COUNTS, counts.tolist()))
        self.counts.zero_()
        self.last_counts = c
        return (f"webdataset regions: {c['samples']} samples, {c['without_regions']} without regions (global loss "
                f"only), {c['kept']} boxes kept, {c['dropped_min_side']} dropped by --min-box-side, "
                f"{c['dropped_min_area']} dropped by --min-box-area, {c['with_negatives']} regions with hard "
                f"negatives, {c['skipped']} malformed region members skipped ({SKIP_FLAG})")  # fmt: skip
