"""Evaluation protocols as published, and the same recalls from 2 gloo ranks as from one process.

FashionIQ: SPRC (src/blip_fine_tune_2.py / blip_validate.py, after CLIP4Cir) builds one ``classic`` val dataset
per category, ranks that category's queries against its own images only (reference not removed), takes
R@10 / R@50 per category, their means over categories, and the average of the two means. The reference below
is written from that definition (argsort of each row, position of the target name), not from our ranker.
"""

import os

import numpy as np
import pytest
import torch
from lavis_helpers import build_datasets
from omegaconf import OmegaConf
from ranks import run_forked_ranks

import lavis_ext  # noqa: F401  (registers builders, processor, task, model)

torch.set_num_threads(1)
WORLD = 2


def _model():
    from lavis.models import load_model

    torch.manual_seed(0)
    return load_model("blip2_cir_align_prompt", "tiny", is_eval=True)


@pytest.fixture(scope="module")
def toy_fashioniq(tmp_path_factory):
    from vlext.toyworld import write_fashioniq

    return write_fashioniq(tmp_path_factory.mktemp("fiq") / "fashionIQ_dataset", 12, seed=0, image_size=32)


@pytest.fixture(scope="module")
def toy_cirr(tmp_path_factory):
    from vlext.toyworld import write_cirr

    return write_cirr(tmp_path_factory.mktemp("cirr") / "cirr_dataset", 12, 14, 6, seed=0, image_size=32)


def _evaluate(model, dataset, tmp_path, **task_args):
    from lavis.common.registry import registry

    tmp_path.mkdir(parents=True, exist_ok=True)
    registry.mapping["paths"]["output_dir"] = str(tmp_path)
    task = registry.get_task_class("composed_image_retrieval")(**task_args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=dataset.collater)
    result = task.evaluation(model, loader)
    return result, task.after_evaluation(result, split_name="val", epoch=0)


def _sprc_fashioniq(model, dataset, categories):
    """SPRC's compute_fiq_val_metrics per category, then the means, from its definition."""
    at10, at50, per = [], [], {}
    for category in categories:
        names = [n for n in dataset.gallery.names if n.startswith(f"{category}-")]
        images = torch.stack([dataset.gallery[dataset.gallery_index[n]]["image"] for n in names])
        index_features = model.extract_target_features(images)
        rows = [i for i, t in enumerate(dataset.triplets) if t["category"] == category]
        queries = [dataset[i] for i in rows]
        pred_sim = model.inference(
            model.extract_reference_features(torch.stack([q["image"] for q in queries])),
            index_features,
            [q["text_input"] for q in queries],
        )
        sorted_names = np.array(names)[torch.argsort(1 - pred_sim, dim=-1).numpy()]
        targets = np.array([dataset.triplets[i]["target"] for i in rows])[:, None]
        labels = torch.tensor(sorted_names == targets)
        assert labels.sum(-1).tolist() == [1] * len(rows)
        per[category] = (
            (labels[:, :10].sum() / len(labels)).item() * 100,
            (labels[:, :50].sum() / len(labels)).item() * 100,
        )
        at10.append(per[category][0])
        at50.append(per[category][1])
    mean10, mean50 = sum(at10) / len(at10), sum(at50) / len(at50)
    return per, mean10, mean50, (mean10 + mean50) / 2


def test_fashioniq_ranks_each_category_against_its_own_gallery_as_sprc_does(toy_fashioniq, tmp_path):
    model = _model()
    val = build_datasets("fashioniq", toy_fashioniq, ["val"])["val"]
    # 24 images per category; the union (72) is what the queries used to be ranked against
    assert {c: len(p) for c, p in val.galleries.items()} == {"dress": 24, "shirt": 24, "toptee": 24}
    result, metrics = _evaluate(model, val, tmp_path, rank_chunk=4, rank_gallery_chunk=7)
    per, mean10, mean50, average = _sprc_fashioniq(model, val, ("dress", "shirt", "toptee"))
    for category, (r10, r50) in per.items():
        assert metrics[f"{category}_recall_at_10"] == pytest.approx(r10, abs=1e-4)
        assert metrics[f"{category}_recall_at_50"] == pytest.approx(r50, abs=1e-4)
    assert metrics["average_recall_at_10"] == pytest.approx(mean10, abs=1e-4)
    assert metrics["average_recall_at_50"] == pytest.approx(mean50, abs=1e-4)
    assert metrics["agg_metrics"] == pytest.approx(average, abs=1e-4)
    # every rank is below the category's gallery size: no query was ranked against another category
    for category, positions in val.galleries.items():
        rows = [i for i, t in enumerate(val.triplets) if t["category"] == category]
        assert int(result["ranks"][rows].max()) < len(positions)


def _eval_worker(rank, store, out_dir, roots):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        results = {}
        for name, root in roots.items():
            dataset = build_datasets(name, root, ["val"])["val"]
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=5, sampler=sampler, collate_fn=dataset.collater
            )
            from lavis.common.registry import registry

            registry.mapping["paths"]["output_dir"] = os.path.join(out_dir, f"{name}{rank}")
            os.makedirs(registry.mapping["paths"]["output_dir"], exist_ok=True)
            task = registry.get_task_class("composed_image_retrieval")(rank_chunk=3)
            result = task.evaluation(model, loader)
            results[name] = {
                "metrics": task.after_evaluation(result, split_name="val", epoch=0),
                "ranks": result["ranks"],
                "ranks_subset": result["ranks_subset"],
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_evaluation_gives_the_one_process_recalls(toy_fashioniq, toy_cirr, tmp_path):
    """Each rank ranks its share of the queries (then gathered): the same ranks and recalls as one process."""
    roots = {"fashioniq": str(toy_fashioniq), "cirr": str(toy_cirr)}
    ranks = run_forked_ranks(_eval_worker, tmp_path, WORLD, roots)
    model = _model()
    for name, root in roots.items():
        dataset = build_datasets(name, root, ["val"])["val"]
        result, metrics = _evaluate(model, dataset, tmp_path / name, rank_chunk=3)
        for got in ranks:
            assert torch.equal(got[name]["ranks"], result["ranks"])
            if name == "cirr":
                assert torch.equal(got[name]["ranks_subset"], result["ranks_subset"])
            assert got[name]["metrics"] == pytest.approx(metrics, abs=1e-9)


def test_the_gallery_is_decoded_with_the_run_configs_loader_workers(toy_cirr, tmp_path, monkeypatch):
    """It was decoded with num_workers=0 whatever run.num_workers said (the gallery is most of the images)."""
    import lavis_ext.tasks.composed_image_retrieval as task_module

    seen = []
    real = task_module.DataLoader

    def recording(dataset, **kwargs):
        seen.append(kwargs["num_workers"])
        return real(dataset, **{**kwargs, "num_workers": 0})

    monkeypatch.setattr(task_module, "DataLoader", recording)
    model = _model()
    val = build_datasets("cirr", toy_cirr, ["val"])["val"]
    task = task_module.ComposedImageRetrievalTask()
    task.run_cfg = OmegaConf.create({"num_workers": 3})
    task.evaluation(model, torch.utils.data.DataLoader(val, batch_size=5, collate_fn=val.collater))
    assert seen == [3]
