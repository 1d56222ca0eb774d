"""LAVIS task ``composed_image_retrieval``: train with the model's loss, evaluate CIRR / FashionIQ recall.

Evaluation encodes the gallery once as target query features (N x Q x D), encodes every query once, and
ranks all queries against the gallery in chunks of queries and of gallery items
(:mod:`lavis_ext.tasks.recall`), so memory stays bounded for a 100k-image gallery. Under DDP each rank encodes
its share of the gallery and of the queries; features are gathered so every rank ranks the same matrix and
reports the same ``agg_metrics``, the number LAVIS's runner uses to keep the best checkpoint. On CIRR's test
split (no targets) it writes the submission files the CIRR server expects.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from torch.utils.data import DataLoader, Subset

from lavis_ext.optim import OneCycleLRScheduler
from lavis_ext.tasks.recall import cirr_metrics, fashioniq_metrics, subset_ranks, target_ranks
from vlext.atomic_files import atomic_write_json, atomic_write_text

__all__ = ["ComposedImageRetrievalTask"]

logger = logging.getLogger(__name__)


def _gather(indices: list[int], feats: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows from every rank, put back in dataset order (each rank holds some (index, row) pairs), on
    ``device``: ranking runs where the model is."""
    if is_dist_avail_and_initialized() and get_world_size() > 1:
        parts = [None] * get_world_size()
        torch.distributed.all_gather_object(parts, (indices, feats.cpu()))
    else:
        parts = [(indices, feats)]
    all_indices = torch.tensor([i for part in parts for i in part[0]], dtype=torch.long)
    rows = torch.cat([part[1].to(device) for part in parts])
    order = torch.empty(int(all_indices.max()) + 1, dtype=torch.long)
    order[all_indices] = torch.arange(len(all_indices))  # duplicates from padded samplers collapse here
    return rows[order.to(device)]


def _gather_rows(rows: torch.Tensor, values: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Per-query results ranked on several ranks (``values[i]`` belongs to query ``rows[i]``), as one (n, ...)
    tensor in query order on every rank; None when no rank produced that result."""
    if is_dist_avail_and_initialized() and get_world_size() > 1:
        parts = [None] * get_world_size()
        torch.distributed.all_gather_object(parts, (rows, values))
    else:
        parts = [(rows, values)]
    parts = [(r, v) for r, v in parts if v is not None]
    if not parts:
        return None
    all_rows = torch.cat([r for r, _ in parts])
    merged = torch.cat([v for _, v in parts])
    if sorted(all_rows.tolist()) != list(range(n)):
        raise RuntimeError(f"ranked queries do not cover the {n} queries exactly once")
    out = torch.empty_like(merged)
    out[all_rows] = merged
    return out


@registry.register_task("composed_image_retrieval")
class ComposedImageRetrievalTask(BaseTask):
    def __init__(
        self,
        rank_chunk: int = 1024,
        gallery_fp16: bool = False,
        write_submission: bool = False,
        rank_gallery_chunk: int = 2048,
    ):
        super().__init__()
        for name, value in (("rank_chunk", rank_chunk), ("rank_gallery_chunk", rank_gallery_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"run.{name} must be a positive int, got {value!r}")
        self.rank_chunk = rank_chunk
        # Scoring temporary: rank_chunk x rank_gallery_chunk x Q floats (256 MB at the defaults, Q = 32).
        self.rank_gallery_chunk = rank_gallery_chunk
        self.gallery_fp16 = gallery_fp16
        self.write_submission = write_submission

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        task = cls(
            rank_chunk=run_cfg.get("rank_chunk", 1024),
            gallery_fp16=run_cfg.get("gallery_fp16", False),
            write_submission=run_cfg.get("write_submission", False),
            rank_gallery_chunk=run_cfg.get("rank_gallery_chunk", 2048),
        )
        task.run_cfg = run_cfg
        return task

    def build_datasets(self, cfg):
        """LAVIS's datasets, refused when a split the run trains or evaluates was not built: LAVIS trained
        a whole epoch and then stopped at ``data_loader for split val is None``, saving nothing."""
        datasets = super().build_datasets(cfg)
        run = cfg.run_cfg
        wanted = {"valid_splits": run.get("valid_splits") or [], "test_splits": run.get("test_splits") or []}
        if not run.get("evaluate", False):
            wanted["train_splits"] = run.get("train_splits") or []
        built = {name: sorted(splits) for name, splits in datasets.items()}
        for key, splits in wanted.items():
            for split in splits:
                if not any(split in dataset for dataset in datasets.values()):
                    raise ValueError(
                        f"run.{key} names split {split!r}, which no dataset built (built: {built}); add it to "
                        f"datasets.<name>.build_info.splits or remove it from run.{key}"
                    )
        return datasets

    def train_epoch(self, epoch, model, data_loader, optimizer, lr_scheduler, *args, **kwargs):
        """LAVIS's epoch, after telling a one-cycle schedule how long an epoch is (LAVIS schedulers only
        learn epoch numbers, and a one-cycle curve is laid out over the total number of steps)."""
        if isinstance(lr_scheduler, OneCycleLRScheduler):
            lr_scheduler.start_epoch(len(data_loader), getattr(self, "run_cfg", None))
        return super().train_epoch(epoch, model, data_loader, optimizer, lr_scheduler, *args, **kwargs)

    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=True):
        dataset = data_loader.dataset
        device = model.device
        shard = Subset(dataset.gallery, range(get_rank(), len(dataset.gallery), get_world_size()))
        # the gallery is most of the images an evaluation decodes: run.num_workers, as the query loader has
        workers = int(getattr(self, "run_cfg", {}).get("num_workers", 0) or 0)
        gallery_loader = DataLoader(
            shard, batch_size=data_loader.batch_size, num_workers=workers, pin_memory=device.type == "cuda"
        )
        indices, feats = [], []
        for samples in gallery_loader:
            feats.append(model.extract_target_features(samples["image"].to(device), fp16=self.gallery_fp16))
            indices.extend(samples["index"].tolist())
        gallery = _gather(indices, torch.cat(feats), device)

        indices, feats = [], []
        for samples in data_loader:
            reference = model.extract_reference_features(samples["image"].to(device))
            feats.append(model.extract_composed_features(reference, list(samples["text_input"])))
            indices.extend(samples["index"].tolist())
        queries = _gather(indices, torch.cat(feats), device)
        return self._rank(model, dataset, queries, gallery)

    def _groups(self, dataset):
        """(query indices, gallery positions or None for all) per gallery a query is ranked against:
        FashionIQ's categories each have their own (SPRC's protocol), CIRR has one."""
        if dataset.galleries is None:
            return [(torch.arange(len(dataset.triplets)), None)]
        groups = []
        for group, positions in dataset.galleries.items():
            rows = [q for q, t in enumerate(dataset.triplets) if t.get("category") == group]
            if rows:
                groups.append((torch.tensor(rows), torch.tensor(positions, dtype=torch.long)))
        return groups

    def _rank(self, model, dataset, queries, gallery):
        """Ranks of every query, each rank ranking its share of the queries on the features' device, then
        gathered (every rank used to score the whole query x gallery x Q block on the CPU)."""
        position = dataset.gallery_index
        n_queries = len(dataset.triplets)
        reference = torch.tensor([position[t["reference"]] for t in dataset.triplets])
        target = (
            torch.tensor([position[t["target"]] for t in dataset.triplets]) if dataset.has_targets else None
        )
        members = None
        if dataset.kind == "cirr":
            width = max(len(t["members"]) for t in dataset.triplets)
            members = torch.full((n_queries, width), -1, dtype=torch.long)
            for q, row in enumerate(dataset.triplets):
                members[q, : len(row["members"])] = torch.tensor([position[m] for m in row["members"]])
        rank, world = get_rank(), get_world_size()
        mine, out = [], {"ranks": [], "ranks_subset": [], "top50": [], "top3": []}
        for rows, positions in self._groups(dataset):
            rows = rows[rank::world]  # this rank's share; the others rank the rest
            if positions is None:
                candidates, local = gallery, None
            else:
                candidates = gallery[positions.to(gallery.device)]
                local = torch.full((len(dataset.gallery),), -1, dtype=torch.long)
                local[positions] = torch.arange(len(positions))
            for start in range(0, len(rows), self.rank_chunk):
                chunk = rows[start : start + self.rank_chunk]
                mine.append(chunk)
                self._rank_chunk(
                    model, queries, candidates, local, positions, chunk, reference, target, members, out
                )
        ranked = torch.cat(mine) if mine else torch.empty(0, dtype=torch.long)
        result = {"kind": dataset.kind, "dataset": dataset}
        for key, parts in out.items():
            result[key] = _gather_rows(ranked, torch.cat(parts) if parts else None, n_queries)
        return result

    def _rank_chunk(
        self, model, queries, candidates, local, positions, chunk, reference, target, members, out
    ):
        """Scores of one chunk of queries against ``candidates`` and what the metrics need of them; indices
        stay int64 (exact) and scores fp32 whatever the autocast around the evaluation."""
        device = candidates.device
        to_local = (lambda index: index) if local is None else (lambda index: local[index])
        ref = to_local(reference[chunk]).to(device)
        # the gallery stays as cached (fp16 if gallery_fp16); each block is cast inside similarity
        sim = model.similarity(
            queries[chunk.to(queries.device)].float(), candidates, gallery_chunk=self.rank_gallery_chunk
        )
        if members is not None:  # CIRR never counts the reference itself as a candidate
            sim.scatter_(1, ref[:, None], float("-inf"))
        if target is not None:
            out["ranks"].append(target_ranks(sim, to_local(target[chunk]).to(device)).cpu())
            if members is not None:
                group = to_local(members[chunk].clamp_min(0)).masked_fill(members[chunk] < 0, -1).to(device)
                ranks = subset_ranks(sim, to_local(target[chunk]).to(device), group, ref)
                out["ranks_subset"].append(ranks.cpu())
        elif members is not None:
            top = sim.topk(min(50, sim.size(1) - 1), dim=1).indices.cpu()  # reference is -inf
            out["top50"].append(top if positions is None else positions[top])
            group = members[chunk].to(device)
            member_scores = sim.gather(1, group.clamp_min(0))
            member_scores[(group < 0) | (group == ref[:, None])] = float("-inf")
            out["top3"].append(group.gather(1, member_scores.topk(3, dim=1).indices).cpu())

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        dataset = val_result["dataset"]
        if val_result["ranks"] is None:
            if val_result["top50"] is not None:
                self._write_cirr_submission(val_result, dataset, split_name)
            return {"agg_metrics": 0.0}
        if val_result["kind"] == "cirr":
            metrics = cirr_metrics(val_result["ranks"], val_result["ranks_subset"])
        else:
            by_category = {}
            categories = [t["category"] for t in dataset.triplets]
            for category in dict.fromkeys(categories):
                mask = torch.tensor([c == category for c in categories])
                by_category[category] = val_result["ranks"][mask]
            metrics = fashioniq_metrics(by_category)
        if is_main_process():
            # appended by rewriting the whole file atomically: a crash leaves the previous lines whole
            path = Path(registry.get_path("output_dir")) / "evaluate.txt"
            before = path.read_text() if path.is_file() else ""
            line = json.dumps({"split": split_name, "epoch": epoch, **metrics})
            atomic_write_text(path, before + line + "\n")
        logger.info(f"{split_name} {metrics}")
        return metrics

    def _write_cirr_submission(self, result, dataset, split_name):
        if not is_main_process():
            return
        names = dataset.gallery.names
        recall = {"version": "rc2", "metric": "recall"}
        subset = {"version": "rc2", "metric": "recall_subset"}
        for row, top50, top3 in zip(dataset.triplets, result["top50"].tolist(), result["top3"].tolist()):
            recall[str(row["pairid"])] = [names[i] for i in top50]
            subset[str(row["pairid"])] = [names[i] for i in top3]
        out = registry.get_path("result_dir")
        for prefix, content in (("recall", recall), ("recall_subset", subset)):
            atomic_write_json(Path(out) / f"{prefix}_submission_{split_name}.json", content)
