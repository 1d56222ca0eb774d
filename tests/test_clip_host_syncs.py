"""The training loop reads nothing to the host that only logging needs (issue 29, finding 5).

On a GPU each read of a device value (``int(t)``, ``bool(t)``, ``.item()``, a boolean-mask selection whose
size depends on the data) stops the CPU until the GPU catches up. Counted here on CPU with a dispatch mode
that sees every such operator: the memory bank's counters live in host mirrors, the region losses mask
instead of selecting, and ``--diag``'s logits and bank mass are kept and computed only for the steps the
master logs."""

import math
import re

import pytest
import torch
from test_clip_open_clip_compat import run_ours, tiny_argv
from torch.utils._python_dispatch import TorchDispatchMode

from clip_ext.loss import MemoryBankClipLoss
from clip_ext.memory_bank import MemoryBank
from clip_ext.region import RegionHead
from vlext.toyworld import write_clip_csv

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}


class HostReads(TorchDispatchMode):
    """Counts operators that read a device value to the host (on CUDA: a synchronisation)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        )
        if name in READS or boolean_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _normal(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def _step_inputs(seed):
    b, r, m, d = 4, 3, 2, 8
    valid = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    return dict(
        image_features=_normal(b, d, seed=seed), text_features=_normal(b, d, seed=seed + 1),
        logit_scale=torch.tensor(10.0), output_dict=True, sample_ids=torch.arange(b) % 3,
        region_features=_normal(b * r, d, seed=seed + 2), region_text_features=_normal(b * r, d, seed=seed + 3),
        region_valid=valid, region_caption_ids=torch.arange(b * r) % 5,
        hard_negative_text_features=_normal(b * r * m, d, seed=seed + 4),
        hard_negative_valid=torch.rand(b * r * m, generator=torch.Generator().manual_seed(seed)) > 0.5,
    )  # fmt: skip


def _loss(keep_logits=False):
    bank = MemoryBank(16, 8, track_ids=True, region_text=True)
    return MemoryBankClipLoss(bank, region_head=RegionHead(math.log(10), hard_negatives=True), region_weight=0.1,
                              hard_negative_weight=0.5, diag=True, keep_logits=keep_logits)  # fmt: skip


def test_a_bank_region_and_hard_negative_loss_step_reads_nothing_to_the_host():
    loss = _loss()
    for step in range(3):  # the bank is active from step 1 on, with image, text and region negatives
        with HostReads() as counter:
            losses = loss(**_step_inputs(step))
            sum(losses.values()).backward() if any(v.requires_grad for v in losses.values()) else None
        assert counter.reads == [], f"step {step}"
        assert loss.last_logits is None  # no --diag log at this step: nothing kept through backward
        with HostReads() as counter:
            loss.commit()
        # enqueueing the valid regions needs their count: the one read of the step, none for images and texts
        assert counter.reads == ["aten.nonzero.default"], f"step {step}"
    assert (
        loss.bank.active and int(loss.bank.filled) == 12 and int(loss.bank.region_filled) == 16
    )  # 3 x 6 valid, 16 slots


def test_logits_and_bank_mass_are_kept_and_computed_only_when_asked():
    loss = _loss(keep_logits=True)
    loss(**_step_inputs(0))
    loss.commit()
    with HostReads() as counter:
        loss(**_step_inputs(1))
    assert counter.reads == []  # kept, but the bank mass is not computed until the log reads it
    per_image, per_text = loss.last_logits
    assert per_image.shape == (4, 4 + 4) and not per_image.requires_grad
    mass = loss.last_bank_mass
    expected = per_image.softmax(1)[:, 4:].sum(1).mean().item()
    assert mass[0] == pytest.approx(expected, rel=1e-6) and 0 < mass[1] < 1


def test_bank_counters_are_mirrored_and_reloaded_from_a_state_dict():
    bank = MemoryBank(6, 8, warmup_steps=2)
    for step in range(3):
        bank.enqueue(*[_normal(4, 8, seed=step)] * 2)
        bank.optimizer_step()
    assert (int(bank.ptr), int(bank.filled), int(bank.step), bool(bank.enabled)) == (0, 6, 3, True)
    restored = MemoryBank(6, 8, warmup_steps=2)
    restored.load_state_dict(bank.state_dict())
    assert restored.active and restored.negatives()[0].shape == (6, 8)
    restored.enqueue(*[_normal(2, 8, seed=9)] * 2)
    assert int(restored.ptr) == 2 and torch.equal(restored.image_queue[:2], _normal(2, 8, seed=9))


def test_diag_keeps_logits_only_for_the_steps_the_master_logs(tmp_path, monkeypatch):
    world = write_clip_csv(tmp_path / "data", 16, seed=0, image_size=32, split="train").parent
    kept = []
    keep = MemoryBankClipLoss._keep

    def recording(self, logits, columns):
        kept.append(self.keep_logits)
        keep(self, logits, columns)

    monkeypatch.setattr(MemoryBankClipLoss, "_keep", recording)
    run_ours(tiny_argv(world, tmp_path / "logs", "diag", "--memory-bank-size", "16", "--diag",
                       "--log-every-n-steps", "3"))  # fmt: skip
    assert kept == [True, False, False, True]  # 4 steps; the master logs steps 1 and 4
    log = (tmp_path / "logs/diag/out.log").read_text()
    assert re.findall(r"diag step (\d+):", log) == ["1", "4"]
    assert "bank_mass_image_to_text=" in log
