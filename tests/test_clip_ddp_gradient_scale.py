"""Every clip_ext loss term gives the same gradient on 2 processes as on one (issue 29, finding 2).

The test runs this file under ``torchrun --nproc_per_node 2`` (gloo, CPU). Both ranks build the same tiny
towers (a linear image tower, a linear text tower, the global logit scale and the region head's two
temperatures), take their half of one global batch and backpropagate one loss term; their gradients are then
averaged over ranks, which is what DDP does. Rank 0 also backpropagates the same term on one process over the
whole global batch. The ranks hold different numbers of valid regions and of regions with hard negatives,
and one caption repeats across ranks, so a term that is only right for equal shares fails.

With ``--gather-with-grad`` (open_clip's flag for a correct DDP gradient of its contrastive loss) every term
matches the one-process gradient for both ``--local-loss`` settings. Without it open_clip's contrastive
term gives the towers 1 / world size of that gradient; the region InfoNCE follows the same flags, so that
``--region-loss-weight`` keeps its meaning relative to the contrastive loss on any world size.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from ranks import torchrun_test_file

B, R, M, DIN, D, BANK = 3, 2, 2, 6, 4, 16  # per rank: 3 images of 2 regions, 2 hard-negative slots each
TERMS = {  # term: (loss entry, bank)
    "contrastive": ("contrastive_loss", False),
    "contrastive_with_bank": ("contrastive_loss", True),
    "contrastive_with_bank_dedup": ("contrastive_loss", "dedup"),  # --memory-bank-dedup: ids gathered
    "region": ("region_loss", False),
    "region_with_bank_texts": ("region_loss", True),
    "hard_negative": ("hard_negative_loss", False),
}
MODES = {  # mode: (gather_with_grad, local_loss)
    "gather_with_grad": (True, False),
    "gather_with_grad_local_loss": (True, True),
    "no_gather_with_grad": (False, False),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    n, nr = 2 * B, 2 * B * R
    x = {name: torch.randn(rows, DIN, generator=g) for name, rows in
         (("image", n), ("text", n), ("region", nr), ("caption", nr), ("negative", nr * M))}  # fmt: skip
    # rank 0 holds 5 valid regions, rank 1 holds 2; caption 1 (rank 0) comes back as row 7 (rank 1)
    x["valid"] = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    x["ids"] = torch.arange(nr)
    x["ids"][7] = 1
    x["negative_valid"] = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1,
                                        0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # fmt: skip
    x["sample_ids"] = torch.arange(n) % 4  # the bank holds entries of the same samples: masked
    x["bank"] = [torch.nn.functional.normalize(torch.randn(BANK, D, generator=g), dim=-1) for _ in range(3)]
    return x


def _towers():
    from clip_ext.region import RegionHead

    torch.manual_seed(1)
    towers = torch.nn.ModuleDict({"image": torch.nn.Linear(DIN, D), "text": torch.nn.Linear(DIN, D)})
    towers.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    towers.head = RegionHead(math.log(12.0), hard_negatives=True)
    return towers


def _bank(x, dedup=False):
    from clip_ext.memory_bank import MemoryBank

    bank = MemoryBank(BANK, D, region_text=True, track_ids=dedup)
    bank.enqueue(x["bank"][0], x["bank"][1], torch.arange(BANK) % 6 if dedup else None)
    bank.enqueue_regions(x["bank"][2], torch.arange(BANK) % 5)  # ids 0..4: some equal the batch's captions
    bank.optimizer_step()
    return bank


def _gradients(term, x, rank, world, gather_with_grad, local_loss):
    """This process's gradients of one term over its rows of the global batch (all rows when world is 1)."""
    from clip_ext.loss import MemoryBankClipLoss

    entry, with_bank = TERMS[term]
    towers = _towers()
    loss = MemoryBankClipLoss(_bank(x, with_bank == "dedup") if with_bank else None, region_head=towers.head, region_weight=1.0,
                              hard_negative_weight=1.0, local_loss=local_loss, gather_with_grad=gather_with_grad,
                              rank=rank, world_size=world)  # fmt: skip
    per = {"image": B, "text": B, "sample_ids": B, "region": B * R, "caption": B * R, "valid": B * R, "ids": B * R,
           "negative": B * R * M, "negative_valid": B * R * M}  # fmt: skip
    part = {k: x[k][rank * n : (rank + 1) * n] if world > 1 else x[k] for k, n in per.items()}
    normalize = torch.nn.functional.normalize
    losses = loss(
        normalize(towers["image"](part["image"]), dim=-1), normalize(towers["text"](part["text"]), dim=-1),
        towers.logit_scale.exp(), output_dict=True,
        sample_ids=part["sample_ids"] if with_bank == "dedup" else None,
        region_features=normalize(towers["image"](part["region"]), dim=-1),
        region_text_features=normalize(towers["text"](part["caption"]), dim=-1),
        region_valid=part["valid"], region_caption_ids=part["ids"],
        hard_negative_text_features=normalize(towers["text"](part["negative"]), dim=-1),
        hard_negative_valid=part["negative_valid"],
    )  # fmt: skip
    losses[entry].backward()
    return {name: p.grad.clone() for name, p in towers.named_parameters() if p.grad is not None}


def _worker(out: Path) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    x = _inputs()
    record = {}
    for mode, (gather_with_grad, local_loss) in MODES.items():
        for term in TERMS:
            ours = _gradients(term, x, rank, world, gather_with_grad, local_loss)
            reference = _gradients(term, x, 0, 1, gather_with_grad, local_loss)
            ratios = {}
            for name, grad in ours.items():
                dist.all_reduce(grad)
                grad /= world  # DDP averages the ranks' gradients
                ref = reference[name]
                ratios[name] = (grad.norm() / ref.norm()).item() if ref.norm() > 0 else None
                ratios[name + ":equal"] = torch.allclose(grad, ref, rtol=1e-4, atol=1e-6)
            ratios["same_parameters"] = set(ours) == set(reference)
            record[f"{mode}/{term}"] = ratios
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def ratios(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_scale")
    torchrun_test_file(__file__, out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", ["gather_with_grad", "gather_with_grad_local_loss"])
@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_has_the_one_process_gradient_on_two_processes(ratios, mode, term):
    for rank in ratios:
        got = rank[f"{mode}/{term}"]
        # the towers and the term's own temperature all receive a gradient, each equal (allclose on the ranks)
        assert {"image.weight", "text.weight"} <= set(got) and got.pop("same_parameters")
        equal = {k: v for k, v in got.items() if k.endswith(":equal")}
        ratio = {k: v for k, v in got.items() if k not in equal and v is not None}
        assert ratio == pytest.approx(dict.fromkeys(ratio, 1.0), abs=1e-4)
        assert all(equal.values()), equal


def test_without_gather_with_grad_the_region_term_keeps_open_clips_scale(ratios):
    """open_clip's contrastive term gives the towers 1/2 of the one-process gradient on 2 ranks without
    --gather-with-grad; the region InfoNCE follows it, so their relative weight is the flags' on any world."""
    got = ratios[0]
    for name in ("image.weight", "text.weight"):
        contrastive = got["no_gather_with_grad/contrastive"][name]
        assert contrastive == pytest.approx(0.5, abs=1e-4)
        assert got["no_gather_with_grad/region"][name] == pytest.approx(contrastive, abs=1e-4)


def test_a_region_run_on_several_processes_without_gather_with_grad_is_warned(tmp_path, caplog):
    from clip_ext import train

    regions = tmp_path / "r.jsonl"
    regions.write_text("")
    args = train.parse_args(["--model", "clip-ext-tiny", "--region-data", str(regions)])
    args.world_size, args.rank = 2, 0  # as open_clip's init_distributed_device sets them under torchrun
    args.distill = False  # set by open_clip_train's main
    train._run = train._Run(args=args)
    with caplog.at_level("WARNING"):
        train.create_loss(args)
    assert (
        "2 processes without --gather-with-grad: open_clip's contrastive loss and clip_ext's region loss give "
        "the towers 1/2 of the gradient" in caplog.text
    )
    caplog.clear()
    args.gather_with_grad = True
    train.create_loss(args)
    assert "--gather-with-grad" not in caplog.text
    train._run = train._Run()


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    _worker(Path(os.environ["CLIP_EXT_DIST_OUT"]))
    dist.destroy_process_group()
