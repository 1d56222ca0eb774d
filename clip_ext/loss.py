"""open_clip's ``ClipLoss`` with memory-bank negatives appended to both directions.

With the bank off, empty or still warming up, :class:`MemoryBankClipLoss` *is* ``ClipLoss`` (it calls the
parent's code path, so results are bit-identical). Once active, image->text logits gain one column per
stored text and text->image logits one per stored image; labels stay the in-batch diagonal, so the bank
only adds negatives. ``local_loss`` and ``gather_with_grad`` keep their open_clip meaning.
"""

from __future__ import annotations

import torch
from open_clip.loss import ClipLoss, gather_features

from clip_ext.memory_bank import MemoryBank

__all__ = ["MemoryBankClipLoss"]


class MemoryBankClipLoss(ClipLoss):
    def __init__(self, bank: MemoryBank | None = None, **clip_loss_kwargs):
        super().__init__(**clip_loss_kwargs)
        self.bank = bank
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
            self.last_logits = tuple(x.detach() for x in logits)
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
            ids = None  # rows are the global batch; ids are local
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
        self.last_logits = (per_image.detach(), per_text.detach())
        return per_image, per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        # Remember this call's (local, detached) batch; the trainer enqueues it after the optimizer step,
        # so with --accum-freq k only the last of the k calls (the whole accumulated batch) is stored.
        self.pending = (image_features.detach(), text_features.detach())
        self.pending_ids = self.sample_ids
        return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)

    @torch.no_grad()
    def commit(self) -> None:
        """After an optimizer step: enqueue the pending batch (gathered over ranks) and count the step."""
        if self.bank is None:
            return
        if self.pending is not None:
            image, text = self.pending
            self.bank.gather_and_enqueue(image.float(), text.float(), self.pending_ids)
        self.last_batch = self.pending
        self.pending = None
        self.pending_ids = None
        self.bank.optimizer_step()
