"""clip_ext.memory_bank and clip_ext.loss: a MoCo-style bank on top of open_clip's ClipLoss."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clip_ext.loss import MemoryBankClipLoss
from clip_ext.memory_bank import BankStateError, MemoryBank


def features(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=g), dim=-1),
        F.normalize(torch.randn(n, d, generator=g), dim=-1),
    )


def test_enqueue_wraps_around_without_divisibility():
    bank = MemoryBank(size=5, dim=8)
    a, b = features(3, seed=1)
    bank.enqueue(a, b)
    c, d = features(3, seed=2)
    bank.enqueue(c, d)
    assert int(bank.ptr) == 1 and int(bank.filled) == 5
    assert torch.equal(bank.image_queue[3:5], c[:2]) and torch.equal(bank.image_queue[0], c[2])
    assert torch.equal(bank.text_queue[:3][1:], torch.cat([b[1:2], b[2:3]]))


def test_only_filled_slots_are_used():
    bank = MemoryBank(size=10, dim=8)
    bank.enqueue(*features(3))
    images, texts, _ = bank.negatives()
    assert images.shape == (3, 8) and texts.shape == (3, 8)


def test_enqueue_allocates_nothing_new():
    bank = MemoryBank(size=6, dim=8)
    pointers = (bank.image_queue.data_ptr(), bank.text_queue.data_ptr())
    for seed in range(5):
        bank.enqueue(*features(4, seed=seed))
    assert (bank.image_queue.data_ptr(), bank.text_queue.data_ptr()) == pointers


def test_warmup_counts_optimizer_steps():
    bank = MemoryBank(size=8, dim=8, warmup_steps=2)
    bank.enqueue(*features(2))
    assert not bank.active
    bank.optimizer_step()
    assert not bank.active
    bank.optimizer_step()
    assert bank.active and int(bank.step) == 2


@pytest.mark.parametrize("local_loss", [False, True])
def test_loss_equals_clip_loss_bit_exactly_when_bank_off_empty_or_warming(local_loss):
    image, text = features(6, seed=3)
    scale = torch.tensor(1 / 0.07)
    reference = ClipLoss(local_loss=local_loss)(image, text, scale)
    assert torch.equal(MemoryBankClipLoss(None, local_loss=local_loss)(image, text, scale), reference)
    empty = MemoryBank(size=16, dim=8)
    empty.enabled.fill_(True)
    assert torch.equal(MemoryBankClipLoss(empty, local_loss=local_loss)(image, text, scale), reference)
    warming = MemoryBank(size=16, dim=8, warmup_steps=10)
    warming.enqueue(*features(4, seed=9))
    warming.optimizer_step()
    assert torch.equal(MemoryBankClipLoss(warming, local_loss=local_loss)(image, text, scale), reference)


def test_active_bank_appends_negatives_to_both_directions():
    image, text = features(4, seed=3)
    bank_image, bank_text = features(5, seed=4)
    bank = MemoryBank(size=8, dim=8)
    bank.enqueue(bank_image, bank_text)
    bank.optimizer_step()
    scale = torch.tensor(10.0)
    loss = MemoryBankClipLoss(bank)(image, text, scale)
    per_image = scale * torch.cat([image @ text.T, image @ bank_text.T], 1)
    per_text = scale * torch.cat([text @ image.T, text @ bank_image.T], 1)
    labels = torch.arange(4)
    expected = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    torch.testing.assert_close(loss, expected)
    assert loss > ClipLoss()(image, text, scale)  # extra negatives can only raise the loss


def test_features_flag_selects_the_direction():
    image, text = features(4, seed=3)
    bank = MemoryBank(size=8, dim=8, features="text")
    bank.enqueue(*features(5, seed=4))
    bank.optimizer_step()
    loss = MemoryBankClipLoss(bank, keep_logits=True)
    loss(image, text, torch.tensor(10.0))
    per_image, per_text = loss.last_logits
    assert per_image.shape == (4, 9) and per_text.shape == (4, 4)


def test_logits_use_the_bank_before_this_step_and_enqueue_once_per_step():
    bank = MemoryBank(size=32, dim=8)
    loss = MemoryBankClipLoss(bank, keep_logits=True)
    scale = torch.tensor(10.0)
    for step in range(3):
        image, text = features(4, seed=step)
        for _ in range(2):  # --accum-freq 2: the loss is called twice per optimizer step
            loss(image, text, scale)
            assert loss.last_logits[0].shape[1] == 4 + 4 * step  # bank size as it was before this step
        loss.commit()
    assert int(bank.filled) == 12 and int(bank.step) == 3
    assert torch.equal(bank.image_queue[8:12], features(4, seed=2)[0])


def test_gradient_flows_only_to_the_batch():
    image, text = features(4, seed=3)
    image.requires_grad_(True)
    bank = MemoryBank(size=8, dim=8)
    bank.enqueue(*features(5, seed=4))
    bank.optimizer_step()
    MemoryBankClipLoss(bank)(image, text, torch.tensor(10.0)).backward()
    assert image.grad.abs().sum() > 0
    assert not bank.image_queue.requires_grad


def test_duplicate_ids_are_not_negatives():
    image, text = features(2, seed=3)
    bank = MemoryBank(size=8, dim=8, track_ids=True)
    bank.enqueue(image.clone(), text.clone(), ids=torch.tensor([7, 8]))
    bank.optimizer_step()
    loss = MemoryBankClipLoss(bank, keep_logits=True)
    loss.sample_ids = torch.tensor([7, 9])
    loss(image, text, torch.tensor(10.0))
    per_image = loss.last_logits[0]
    assert per_image[0, 2] == float("-inf") and math.isfinite(per_image[0, 3])
    assert torch.isfinite(per_image[1]).all()


def test_state_round_trips_through_state_dict():
    bank = MemoryBank(size=6, dim=8, warmup_steps=1)
    bank.enqueue(*features(4))
    bank.optimizer_step()
    restored = MemoryBank(size=6, dim=8, warmup_steps=1)
    restored.load_state_dict(bank.state_dict())
    for name, value in bank.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert restored.active


def test_resuming_with_a_different_size_names_the_flag():
    bank = MemoryBank(size=6, dim=8)
    with pytest.raises(BankStateError, match="--memory-bank-size is 10"):
        MemoryBank(size=10, dim=8).load_state_dict(bank.state_dict())


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="--memory-bank-size must be a positive integer"):
        MemoryBank(size=0, dim=8)
    with pytest.raises(ValueError, match="--memory-bank-features must be one of"):
        MemoryBank(size=4, dim=8, features="audio")
    bank = MemoryBank(size=4, dim=8)
    with pytest.raises(ValueError, match="smaller than the global batch 5"):
        bank.enqueue(*features(5))
    with pytest.raises(ValueError, match="holds 8-d features; got image features of shape \\(2, 4\\)"):
        bank.enqueue(torch.zeros(2, 4), torch.zeros(2, 4))
    bank.enqueue(*features(2))
    bank.optimizer_step()
    with pytest.raises(ValueError, match="bank dim must equal the model's embed_dim"):
        MemoryBankClipLoss(bank)(*features(2, d=16), torch.tensor(1.0))


def test_sample_ids_from_the_model_output_mask_duplicates():
    image, text = features(2, seed=3)
    bank = MemoryBank(size=8, dim=8, track_ids=True)
    bank.enqueue(image.clone(), text.clone(), ids=torch.tensor([7, 8]))
    bank.optimizer_step()
    loss = MemoryBankClipLoss(bank, keep_logits=True)
    loss(image, text, torch.tensor(10.0), sample_ids=torch.tensor([8, 9]))  # as the trainer passes them
    assert loss.last_logits[0][0, 3] == float("-inf") and torch.isfinite(loss.last_logits[0][1]).all()
    assert torch.equal(loss.pending_ids, torch.tensor([8, 9]))  # enqueued with the batch after the step


def test_region_text_queue_wraps_and_keeps_the_last_slots_of_a_large_step():
    bank = MemoryBank(size=4, dim=8, region_text=True)
    a, _ = features(3, seed=1)
    bank.enqueue_regions(a, torch.tensor([0, 1, 2]))
    b, _ = features(6, seed=2)  # more valid regions in one step than slots: the last 4 win
    bank.enqueue_regions(b, torch.arange(10, 16))
    texts, ids = bank.region_negatives()
    assert int(bank.region_filled) == 4 and int(bank.region_ptr) == (3 + 4) % 4
    assert sorted(ids.tolist()) == [12, 13, 14, 15]
    assert torch.equal(texts[ids.argsort()], b[2:])
    with pytest.raises(ValueError, match="keeps no region texts"):
        MemoryBank(size=4, dim=8).region_negatives()


def test_diag_bank_mass_is_the_softmax_probability_on_bank_columns():
    bank = MemoryBank(size=2, dim=2, features="text")
    loss = MemoryBankClipLoss(bank, diag=True)
    image = text = torch.eye(2)
    loss(image, text, torch.tensor(1.0))
    assert loss.last_bank_mass == (0.0, 0.0)  # empty bank: nothing on bank columns
    loss.commit()  # bank texts now [1, 0], [0, 1]; warmup 0, so it is on
    bank.text_queue[1] = torch.tensor([1.0, 0.0])  # two stored texts, both [1, 0]
    loss(image, text, torch.tensor(1.0))
    # image [1, 0]: logits [1, 0 | 1, 1] -> 2e / (3e + 1); image [0, 1]: [0, 1 | 0, 0] -> 2 / (e + 3)
    e = math.e
    assert loss.last_bank_mass[0] == pytest.approx((2 * e / (3 * e + 1) + 2 / (e + 3)) / 2, rel=1e-6)
    assert loss.last_bank_mass[1] == 0.0  # --memory-bank-features text: text->image has no bank columns
