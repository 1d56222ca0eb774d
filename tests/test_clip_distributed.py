"""clip_ext under torch.distributed: 2 CPU processes (gloo) started by torchrun.

The test runs this file under ``torchrun --nproc_per_node 2``; each rank trains leaf features on its slice
of a global batch, and rank 0 also computes the single-process loss on the whole global batch with its own
bank. The ranks write what they saw to JSON, and the tests compare numbers. A second pair of losses tracks
sample ids (``--memory-bank-dedup``): ids recur across steps, so bank entries of the same sample are masked,
and under the global loss every rank needs the ids of the whole global batch.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from ranks import torchrun_test_file

STEPS, LOCAL_BATCH, DIM, BANK = 4, 3, 8, 10  # 6 per global step: the bank wraps with no divisibility


def _global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    image = torch.nn.functional.normalize(torch.randn(2 * LOCAL_BATCH, DIM, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2 * LOCAL_BATCH, DIM, generator=g), dim=-1)
    return image, text


def _worker(out_dir: Path, local_loss: bool) -> None:
    import torch.distributed as dist

    from clip_ext.loss import MemoryBankClipLoss
    from clip_ext.memory_bank import MemoryBank

    rank, world = dist.get_rank(), dist.get_world_size()
    loss = MemoryBankClipLoss(MemoryBank(BANK, DIM, warmup_steps=1), local_loss=local_loss,
                              gather_with_grad=True, rank=rank, world_size=world)  # fmt: skip
    reference = MemoryBankClipLoss(MemoryBank(BANK, DIM, warmup_steps=1))
    dedup = MemoryBankClipLoss(MemoryBank(BANK, DIM, warmup_steps=1, track_ids=True), local_loss=local_loss,
                               gather_with_grad=True, rank=rank, world_size=world)  # fmt: skip
    dedup_reference = MemoryBankClipLoss(MemoryBank(BANK, DIM, warmup_steps=1, track_ids=True))
    scale = torch.tensor(10.0)
    record = {"loss": [], "reference": [], "grad_close": [], "dedup": [], "dedup_reference": []}
    for step in range(STEPS):
        image, text = _global_batch(step)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local_image = image[rows].clone().requires_grad_()
        value = loss(local_image, text[rows], scale)
        value.backward()
        # open_clip's DDP loss is the per-rank loss; with local_loss it is a mean over local rows only
        averaged = value.detach().clone()
        dist.all_reduce(averaged)
        record["loss"].append((averaged / world).item())
        full_image = image.clone().requires_grad_()
        ref_value = reference(full_image, text, scale)
        ref_value.backward()
        record["reference"].append(ref_value.item())
        if local_loss:
            # the sum of local gradients equals the gradient of the global mean for each row it owns
            record["grad_close"].append(
                torch.allclose(local_image.grad / world, full_image.grad[rows], atol=1e-6)
            )
        loss.commit()
        # the reference is a single process: enqueue its global batch without any gather
        reference.bank.enqueue(*reference.pending)
        reference.bank.optimizer_step()

        ids = torch.arange(2 * LOCAL_BATCH) % 4  # the same 4 samples come back every step
        value = dedup(image[rows], text[rows], scale, sample_ids=ids[rows])
        averaged = value.detach().clone()
        dist.all_reduce(averaged)
        record["dedup"].append((averaged / world).item())
        record["dedup_reference"].append(dedup_reference(image, text, scale, sample_ids=ids).item())
        dedup.commit()
        dedup_reference.bank.enqueue(*dedup_reference.pending, ids=ids)
        dedup_reference.bank.optimizer_step()
    record.update(_region_records(rank, world))
    bank = loss.bank
    record.update(
        image_queue=bank.image_queue.tolist(),
        text_queue=bank.text_queue.tolist(),
        reference_queue=reference.bank.image_queue.tolist(),
        ptr=int(bank.ptr),
        filled=int(bank.filled),
        step=int(bank.step),
        id_queue=dedup.bank.id_queue.tolist(),
        reference_id_queue=dedup_reference.bank.id_queue.tolist(),
    )
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


def _region_records(rank: int, world: int) -> dict:
    """Region loss on 2 ranks vs one process on the global region batch (4 padded rows per rank, one padding
    row each, caption 3 on both ranks: the same caption is not a negative across ranks either)."""
    import math

    from clip_ext.loss import MemoryBankClipLoss
    from clip_ext.region import RegionHead, region_contrastive_loss

    g = torch.Generator().manual_seed(7)
    region = torch.nn.functional.normalize(torch.randn(2 * 4, DIM, generator=g), dim=-1)
    caption = torch.nn.functional.normalize(torch.randn(2 * 4, DIM, generator=g), dim=-1)
    valid = torch.tensor([True, True, True, False, True, False, True, True])
    ids = torch.tensor([0, 1, 3, -1, 3, -1, 4, 5])
    rows = slice(rank * 4, (rank + 1) * 4)
    head = RegionHead(math.log(10.0))
    loss = MemoryBankClipLoss(None, region_head=head, region_weight=1.0, rank=rank, world_size=world)
    local_region = region[rows].clone().requires_grad_()
    value = loss.region_loss(local_region, caption[rows], valid[rows], ids[rows])
    value.backward()
    averaged = value.detach().clone()
    torch.distributed.all_reduce(averaged)
    full = region.clone().requires_grad_()
    reference = region_contrastive_loss(full, caption, valid, head.logit_scale.detach(), ids)
    reference.backward()
    per_rank = region_contrastive_loss(
        region[rows], caption[rows], valid[rows], head.logit_scale.detach(), ids[rows]
    )
    return {
        "region_loss": (averaged / world).item(),
        "region_reference": reference.item(),
        "region_per_rank_only": per_rank.item(),
        # each rank's gradient on its own rows is that of the global loss (DDP then averages over ranks)
        "region_grad_close": torch.allclose(local_region.grad, full.grad[rows], atol=1e-6),
    }


MODES = {"global_loss": False, "local_loss": True}


def _torchrun(out_dir):
    """One torchrun for both loss modes: each rank runs the global-loss and then the local-loss case."""
    torchrun_test_file(__file__, out_dir)
    return {
        mode: [json.loads((out_dir / mode / f"rank{r}.json").read_text()) for r in range(2)] for mode in MODES
    }


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The records of both loss modes from a single torchrun launch, shared by the tests of this file."""
    return _torchrun(tmp_path_factory.mktemp("dist"))


@pytest.fixture(params=list(MODES))
def ranks(request, launched):
    return MODES[request.param], launched[request.param]


def test_two_ranks_hold_identical_banks_and_match_single_process(ranks):
    local_loss, ranks = ranks
    r0, r1 = ranks
    # identical banks on both ranks, equal to the bank a single process fills with the global batches
    assert r0["image_queue"] == r1["image_queue"] and r0["text_queue"] == r1["text_queue"]
    assert torch.allclose(torch.tensor(r0["image_queue"]), torch.tensor(r0["reference_queue"]))
    assert r0["filled"] == BANK and r0["ptr"] == STEPS * 2 * LOCAL_BATCH % BANK and r0["step"] == STEPS
    # the loss (averaged over ranks) equals the single-process loss on the same global batch and bank,
    # including the steps where the bank is active (from step 1 on)
    for rank in ranks:
        assert rank["loss"] == pytest.approx(rank["reference"], rel=1e-5, abs=1e-6)
    assert r0["reference"][1] != pytest.approx(r0["reference"][0])  # the bank did change something
    if local_loss:
        assert all(r0["grad_close"]) and all(r1["grad_close"])


def test_duplicate_masking_works_under_ddp(ranks):
    _, ranks = ranks
    for rank in ranks:
        # the ids of the whole global batch reach every rank: the masked loss equals the single process's
        assert rank["dedup"] == pytest.approx(rank["dedup_reference"], rel=1e-5, abs=1e-6)
        assert rank["id_queue"] == rank["reference_id_queue"]
    # the masking did something once the bank was active (from step 1 on), and nothing before
    r0 = ranks[0]
    assert r0["dedup"][0] == pytest.approx(r0["loss"][0], rel=1e-6)
    assert all(d < plain - 1e-3 for d, plain in zip(r0["dedup"][1:], r0["loss"][1:]))


def test_region_negatives_are_gathered_over_ranks(ranks):
    _, ranks = ranks
    for rank in ranks:
        assert rank["region_loss"] == pytest.approx(rank["region_reference"], rel=1e-5, abs=1e-6)
        assert rank["region_grad_close"]
    # gathering changed the loss: it is not the loss over the local regions alone
    assert ranks[0]["region_per_rank_only"] != pytest.approx(ranks[0]["region_reference"], rel=1e-3)


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for mode, local in MODES.items():  # fresh losses and banks per mode, in one process group
        out = Path(os.environ["CLIP_EXT_DIST_OUT"]) / mode
        out.mkdir(exist_ok=True)
        _worker(out, local)
    dist.destroy_process_group()
