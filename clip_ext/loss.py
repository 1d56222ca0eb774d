"""open_clip's ``ClipLoss`` with memory-bank negatives appended to both directions.

With the bank off, empty or still warming up, :class:`MemoryBankClipLoss` *is* ``ClipLoss`` (it calls the
parent's code path, so results are bit-identical). Once active, image->text logits gain one column per
stored text and text->image logits one per stored image; labels stay the in-batch diagonal, so the bank
only adds negatives. ``local_loss`` and ``gather_with_grad`` keep their open_clip meaning.

Sample ids (``--memory-bank-dedup``) arrive as the ``sample_ids`` entry of the model's output; under a
global DDP loss (no ``local_loss``) the rows are the global batch, so the ids are gathered over ranks too.

With a :class:`~clip_ext.region.RegionHead` and ``region_weight`` > 0, the model's output also carries
padded region features (see :func:`clip_ext.region.region_forward`) and the loss adds
``region_weight x`` the FG-CLIP region InfoNCE as its own entry ``region_loss`` (open_clip's trainer sums
every entry and logs each). Under DDP the region loss gathers the regions, captions, validity and caption
ids of every rank (all regions of the global batch are negatives) with ``ClipLoss``'s ``gather_with_grad``
and ``local_loss`` meaning, plus the bank's region captions when the bank keeps them and is active; the
hard-negative loss divides by the regions with negatives of all ranks. With ``gather_with_grad`` every term's
gradient after DDP's average is the one-process gradient (tests/test_clip_ddp_gradient_scale.py). With ``hard_negative_weight`` > 0 and the model's
``hard_negative_text_features``, FG-CLIP's hard-negative region loss is added as ``hard_negative_loss``.

For ``--diag`` the loss keeps the last unweighted region and hard-negative losses (0-d device tensors) and,
while ``keep_logits`` is True, the last call's detached logits, from which :attr:`last_bank_mass` computes
the share of softmax mass that falls on bank columns (``bank_mass_*``): the number that says whether the
bank is doing anything. ``clip_ext.train`` sets ``keep_logits`` only for the steps the master logs, so other
steps neither keep both directions' logits through backward nor compute or read anything for the log.
``calls`` counts forward calls (``--accum-freq k`` calls it k times per step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss, gather_features

from clip_ext.memory_bank import MemoryBank
from clip_ext.region import RegionHead, hard_negative_loss, region_contrastive_loss

__all__ = ["MemoryBankClipLoss"]


class MemoryBankClipLoss(ClipLoss):
    """open_clip's ``ClipLoss`` plus memory-bank negatives and FG-CLIP's region and hard-negative losses.

    A drop-in for ``ClipLoss`` in open_clip's trainer (``clip_ext.train`` builds it from the flags); with
    no bank, an empty or warming-up bank and zero region weights it returns ``ClipLoss``'s numbers bit for
    bit. Call :meth:`commit` after the optimizer step: the batch's embeddings then enter the bank.

    Args:
        bank: the :class:`~clip_ext.MemoryBank` whose entries are appended as negatives (None: plain CLIP).
        region_head: the :class:`~clip_ext.region.RegionHead` scoring region features (``--region-data``).
        region_weight: weight of the region InfoNCE (``--region-loss-weight``).
        hard_negative_weight: weight of the hard-negative region loss (``--hard-negative-weight``).
        diag: ``--diag``: keep the unweighted region losses for the log.
        keep_logits: keep the last call's detached logits (``last_logits``, ``last_bank_mass``); default
            ``diag``. The trainer switches it on only for the steps it logs.
        **clip_loss_kwargs: ``ClipLoss``'s own arguments (``local_loss``, ``gather_with_grad``, ``rank``,
            ``world_size``, ...).

    Returns (of a call):
        Like ``ClipLoss``: the contrastive loss, or with ``output_dict=True`` a dict of named losses
        (``contrastive_loss``, plus ``region_loss`` / ``hard_negative_loss`` when enabled).

    Example:
        >>> import torch
        >>> from clip_ext import MemoryBank, MemoryBankClipLoss
        >>> loss = MemoryBankClipLoss(bank=MemoryBank(size=8, dim=4))
        >>> image, text = torch.nn.functional.normalize(torch.randn(2, 2, 4), dim=-1)
        >>> value = loss(image, text, logit_scale=torch.tensor(10.0))
        >>> loss.commit()  # the batch is now in the bank
        >>> int(loss.bank.filled)
        2
    """

    def __init__(
        self,
        bank: MemoryBank | None = None,
        region_head: RegionHead | None = None,
        region_weight: float = 0.0,
        hard_negative_weight: float = 0.0,
        diag: bool = False,
        keep_logits: bool | None = None,
        **clip_loss_kwargs,
    ):
        super().__init__(**clip_loss_kwargs)
        if region_weight < 0:
            raise ValueError(f"--region-loss-weight must be >= 0, got {region_weight}")
        if hard_negative_weight < 0:
            raise ValueError(f"--hard-negative-weight must be >= 0, got {hard_negative_weight}")
        self.bank = bank
        self.region_head = region_head
        self.region_weight = region_weight
        self.hard_negative_weight = hard_negative_weight
        self.diag = diag
        self.calls = 0
        self.last_region_loss: torch.Tensor | None = None
        self.last_hard_negative_loss: torch.Tensor | None = None
        self.keep_logits = diag if keep_logits is None else keep_logits
        self._mass_columns: tuple[int | None, int | None] = (None, None)  # batch columns of last_logits
        self.pending_regions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.pending_ids: torch.Tensor | None = None
        self.sample_ids: torch.Tensor | None = None  # set by the caller per batch when the bank tracks ids
        self.last_logits: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # for --diag after commit()

    def _bank_columns(self, rows: torch.Tensor, queue: torch.Tensor, logit_scale, ids) -> torch.Tensor:
        logits = logit_scale * rows @ queue.to(rows.dtype).T
        mask = self.bank.duplicate_mask(ids) if ids is not None else None
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        return logits

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        if self.bank is None or not self.bank.active:
            logits = super().get_logits(image_features, text_features, logit_scale, logit_bias)
            self._keep(logits, (None, None))
            return logits
        bank_images, bank_texts, _ = self.bank.negatives()
        if bank_images.shape[1] != image_features.shape[1]:
            raise ValueError(
                f"memory bank holds {bank_images.shape[1]}-d features but the model produces "
                f"{image_features.shape[1]}-d embeddings; the bank dim must equal the model's embed_dim"
            )
        if self.world_size > 1:
            all_images, all_texts = gather_features(
                image_features, text_features, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size,
                use_horovod=self.use_horovod,
            )  # fmt: skip
            image_rows, text_rows = (
                (image_features, text_features) if self.local_loss else (all_images, all_texts)
            )
        else:
            all_images, all_texts = image_features, text_features
            image_rows, text_rows = image_features, text_features
        ids = self.sample_ids
        if ids is not None and self.world_size > 1 and not self.local_loss:
            ids = self._gather_ids(ids)  # rows are the global batch
        use_text = self.bank.features in ("both", "text")
        use_image = self.bank.features in ("both", "image")
        per_image = logit_scale * image_rows @ all_texts.T
        per_text = logit_scale * text_rows @ all_images.T
        if use_text:
            per_image = torch.cat(
                [per_image, self._bank_columns(image_rows, bank_texts, logit_scale, ids)], 1
            )
        if use_image:
            per_text = torch.cat([per_text, self._bank_columns(text_rows, bank_images, logit_scale, ids)], 1)
        if logit_bias is not None:
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        self._keep((per_image, per_text), (all_texts.shape[0] if use_text else None,
                                           all_images.shape[0] if use_image else None))  # fmt: skip
        return per_image, per_text

    def _keep(self, logits, bank_from: tuple[int | None, int | None]) -> None:
        """Keep this call's detached logits for ``--diag`` only when asked: otherwise they would live on
        through backward (about 0.55 GB per rank at a 2048 global batch with K = 65,536 in fp16)."""
        self.last_logits = tuple(x.detach() for x in logits) if self.keep_logits else None
        self._mass_columns = bank_from

    @property
    def last_bank_mass(self) -> tuple[float, float] | None:
        """(image->text, text->image) mean softmax probability on bank columns of the last kept logits;
        computed (and read to the host) only when asked, i.e. when ``--diag`` logs."""
        if self.last_logits is None:
            return None
        return tuple(_bank_mass(logits, first) if first is not None else 0.0
                     for logits, first in zip(self.last_logits, self._mass_columns))  # fmt: skip

    def _gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.use_horovod:
            import horovod.torch as hvd

            return hvd.allgather(ids)
        parts = [torch.empty_like(ids) for _ in range(self.world_size)]
        dist.all_gather(parts, ids.contiguous())
        return torch.cat(parts)

    def forward(
        self,
        image_features,
        text_features,
        logit_scale,
        logit_bias=None,
        output_dict=False,
        sample_ids=None,
        region_features=None,
        region_text_features=None,
        region_valid=None,
        region_caption_ids=None,
        hard_negative_text_features=None,
        hard_negative_valid=None,
    ):
        self.calls += 1
        if sample_ids is not None:
            self.sample_ids = sample_ids
        # Remember this call's (local, detached) batch; the trainer enqueues it after the optimizer step,
        # so with --accum-freq k only the last of the k calls (the whole accumulated batch) is stored.
        self.pending = (image_features.detach(), text_features.detach())
        self.pending_ids = self.sample_ids
        losses = super().forward(image_features, text_features, logit_scale, logit_bias, output_dict=True)
        if region_features is not None and self.region_head is not None and self.region_weight > 0:
            region = self.region_loss(region_features, region_text_features, region_valid, region_caption_ids)
            self.last_region_loss = region.detach()
            losses["region_loss"] = self.region_weight * region
        if (
            hard_negative_text_features is not None
            and self.region_head is not None
            and self.hard_negative_weight > 0
        ):
            m = hard_negative_valid.shape[0] // region_valid.shape[0]
            negatives_valid = hard_negative_valid.reshape(-1, m) & region_valid[:, None]
            hard = hard_negative_loss(
                region_features, region_text_features, hard_negative_text_features.reshape(-1, m, region_features.shape[1]),
                negatives_valid, self.region_head.hard_negative_logit_scale,
                anchor_count=self._hard_negative_anchor_count(negatives_valid.any(dim=1)),
            )  # fmt: skip
            self.last_hard_negative_loss = hard.detach()
            losses["hard_negative_loss"] = self.hard_negative_weight * hard
        if output_dict:
            return losses
        return sum(losses.values())

    def region_loss(self, region, caption, valid, caption_ids=None) -> torch.Tensor:
        """Unweighted region InfoNCE with the head's temperature and, when active, the bank's region texts.

        Under DDP the regions, captions, validity and caption ids of every rank are gathered (all regions of
        the global batch are negatives) the way ``ClipLoss`` gathers the batch: ``gather_with_grad`` through
        ``torch.distributed.nn.all_gather`` (each rank's backward then carries every rank's share of the
        gradient of its rows, so DDP's average equals the one-process gradient), otherwise only the local
        rows keep their gradient (open_clip's own scale for that flag, as for the contrastive term), and
        ``local_loss`` makes this rank's rows the only anchors. The gradient used to be 1 / world size of the
        one-process gradient even with ``--gather-with-grad`` (issue 29, finding 2).
        """
        bank_captions = bank_ids = None
        if self.bank is not None and self.bank.region_text and self.bank.active:
            bank_captions, bank_ids = self.bank.region_negatives()
        ids_or_none = caption_ids if caption_ids is not None else torch.full_like(valid, -1, dtype=torch.long)
        self.pending_regions = (caption.detach(), valid, ids_or_none)
        rows, world = None, 1
        if self.world_size > 1:
            n = region.shape[0]
            region, caption = gather_features(
                region, caption, local_loss=False, gather_with_grad=self.gather_with_grad, rank=self.rank,
                world_size=self.world_size, use_horovod=self.use_horovod,
            )  # fmt: skip
            valid = self._gather_constant(valid.to(torch.uint8)).bool()  # not every backend gathers bool
            caption_ids = self._gather_constant(caption_ids) if caption_ids is not None else None
            if self.local_loss:
                rows, world = slice(self.rank * n, (self.rank + 1) * n), self.world_size
        return region_contrastive_loss(region, caption, valid, self.region_head.logit_scale, caption_ids,
                                       bank_captions, bank_ids, rows=rows, world_size=world)  # fmt: skip

    def _hard_negative_anchor_count(self, anchors: torch.Tensor) -> torch.Tensor | None:
        """The regions with negatives over all ranks / world size (a device tensor: no host sync), or None
        on one process. Each rank's loss then is its sum over this share, and DDP's average of the ranks'
        gradients equals the one-process gradient even when the ranks hold different counts."""
        if self.world_size == 1:
            return None
        count = anchors.sum().to(torch.float32)
        if self.use_horovod:
            import horovod.torch as hvd

            count = hvd.allreduce(count, op=hvd.Sum)
        else:
            count = count.clone()
            dist.all_reduce(count)
        return count / self.world_size

    def _gather_constant(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, ...) of every rank concatenated in rank order, without gradient (masks and ids)."""
        if self.use_horovod:
            import horovod.torch as hvd

            return hvd.allgather(rows.detach())
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(parts, rows.detach().contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def commit(self) -> None:
        """After an optimizer step: enqueue the pending batch (gathered over ranks) and count the step."""
        if self.bank is None:
            return
        if self.pending is not None:
            image, text = self.pending
            self.bank.gather_and_enqueue(image.float(), text.float(), self.pending_ids)
        if self.pending_regions is not None and self.bank.region_text:
            text, valid, ids = self.pending_regions
            self.bank.gather_and_enqueue_regions(text.float(), valid, ids)
        self.last_batch = self.pending
        self.pending = None
        self.pending_ids = None
        self.pending_regions = None
        self.bank.optimizer_step()


@torch.no_grad()
def _bank_mass(logits: torch.Tensor, batch_columns: int) -> float:
    """Mean over rows of the softmax probability on the bank's columns (those after the batch's)."""
    return logits.float().softmax(dim=1)[:, batch_columns:].sum(dim=1).mean().item()
