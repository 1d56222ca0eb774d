"""A ring buffer of past normalized embeddings used as extra contrastive negatives (MoCo / XBM style).

Why a module with buffers: open_clip_train checkpoints hold ``model.state_dict()`` and nothing of the loss,
so a bank kept on the loss (as FG-CLIP's video-anomaly fork does) is lost on ``--resume``. Here queue,
write pointer, fill count, optimizer step and the enabled flag are buffers of a submodule of the model:
saved and restored with it, and moved with ``.to()``.

Rules the training notes got wrong and this class enforces:
- logits use the bank as it was *before* this step; the batch is enqueued after the optimizer step
  (MoCo), once per optimizer step even when ``--accum-freq k`` calls the loss k times;
- the warmup counts optimizer steps (a saved buffer), not forward calls;
- writes wrap around with no divisibility requirement, only filled slots are read, nothing is allocated
  per step (in-place copies into preallocated buffers);
- under DDP every rank enqueues the same global batch, and DDP must not broadcast these buffers from
  rank 0 on every forward (see :func:`ddp_ignore_names`);
- the training loop reads nothing from the device: pointer, fill counts, step and the enabled flag are
  mirrored in Python ints next to their buffers (every rank writes the same values), refreshed from the
  buffers only when a state dict is loaded. Reading the buffers with ``int()`` cost a host sync each, 8 per
  step on a GPU (issue 29, finding 5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["MemoryBank", "BankStateError"]

FEATURE_CHOICES = ("both", "image", "text")


class BankStateError(ValueError):
    """A checkpoint's bank does not fit the bank configured by the flags."""


class MemoryBank(nn.Module):
    """Last ``size`` image and text embeddings (and optional sample ids) in a ring buffer.

    Args:
        size: slots K (``--memory-bank-size``); must be at least the global batch.
        dim: embedding dimension D.
        warmup_steps: optimizer steps before bank negatives are used (``--memory-bank-warmup-steps``).
            The bank fills during warmup so that it is full when it switches on.
        features: which negatives to add: ``both`` (image->text gets text negatives and text->image
            image negatives), ``image`` or ``text`` (``--memory-bank-features``).
        track_ids: keep a sample-id queue so that entries of the same sample are masked (ALBEF).
        region_text: also keep the last ``size`` region-caption embeddings (with their caption ids) as
            extra negatives of the region loss (``--region-data`` with ``--memory-bank-size``).

    Example:
        >>> import torch
        >>> from clip_ext import MemoryBank
        >>> bank = MemoryBank(size=4, dim=2)
        >>> bank.enqueue(torch.ones(3, 2), torch.zeros(3, 2))
        >>> bank.optimizer_step()
        >>> int(bank.filled), bank.active
        (3, True)
    """

    def __init__(
        self,
        size: int,
        dim: int,
        warmup_steps: int = 0,
        features: str = "both",
        track_ids: bool = False,
        region_text: bool = False,
    ):
        super().__init__()
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"--memory-bank-size must be a positive integer, got {size!r}")
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"memory bank feature dim must be a positive integer, got {dim!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"--memory-bank-warmup-steps must be an integer >= 0, got {warmup_steps!r}")
        if features not in FEATURE_CHOICES:
            raise ValueError(f"--memory-bank-features must be one of {FEATURE_CHOICES}, got {features!r}")
        self.size, self.dim, self.warmup_steps, self.features = size, dim, warmup_steps, features
        self.track_ids = track_ids
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("id_queue", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))
        self.region_text = region_text
        if region_text:
            self.register_buffer("region_text_queue", torch.zeros(size, dim))
            self.register_buffer("region_id_queue", torch.full((size,), -1, dtype=torch.long))
            self.register_buffer("region_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("region_filled", torch.zeros((), dtype=torch.long))
        self._host = dict.fromkeys(self._mirrored(), 0)  # the buffers' values, on the host

    def _mirrored(self) -> tuple[str, ...]:
        names = ("ptr", "filled", "step", "enabled")
        return names + (("region_ptr", "region_filled") if self.region_text else ())

    def _set(self, name: str, value: int) -> None:
        """Write a counter buffer and its host mirror (fill_ from a Python number: no host read)."""
        getattr(self, name).fill_(value)
        self._host[name] = int(value)

    def refresh_host_state(self) -> None:
        """Re-read the counters from the buffers (one host read each), after they were written directly."""
        self._host = {name: int(getattr(self, name)) for name in self._mirrored()}

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, warmup_steps={self.warmup_steps}, features={self.features}"

    @property
    def active(self) -> bool:
        """Whether the loss should add bank negatives now (warmup passed and something stored)."""
        return bool(self._host["enabled"]) and self._host["filled"] > 0

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, texts, ids) of the filled slots, as views: no copy."""
        n = self._host["filled"]
        return self.image_queue[:n], self.text_queue[:n], self.id_queue[:n]

    def check_batch(self, global_batch: int) -> None:
        if global_batch > self.size:
            raise ValueError(
                f"--memory-bank-size {self.size} is smaller than the global batch {global_batch} "
                f"(batch size x accum-freq x world size); use a bank of at least {global_batch} slots"
            )

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write a batch at the pointer, wrapping around; in place, no per-step allocation."""
        for name, x in (("image", image), ("text", text)):
            if x.ndim != 2 or x.shape[1] != self.dim:
                raise ValueError(
                    f"memory bank holds {self.dim}-d features; got {name} features of shape {tuple(x.shape)}"
                )
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image and text batches differ: {image.shape[0]} vs {text.shape[0]}")
        n = image.shape[0]
        self.check_batch(n)
        start = self._host["ptr"]
        first = min(n, self.size - start)
        self.image_queue[start : start + first].copy_(image[:first])
        self.text_queue[start : start + first].copy_(text[:first])
        if n > first:
            self.image_queue[: n - first].copy_(image[first:])
            self.text_queue[: n - first].copy_(text[first:])
        if self.track_ids:
            if ids is None:
                raise ValueError("this bank tracks sample ids (duplicate masking); pass ids to enqueue")
            self.id_queue[start : start + first].copy_(ids[:first])
            if n > first:
                self.id_queue[: n - first].copy_(ids[first:])
        self._set("ptr", (start + n) % self.size)
        self._set("filled", min(self._host["filled"] + n, self.size))

    @torch.no_grad()
    def gather_and_enqueue(
        self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor | None = None
    ) -> None:
        """Under torch.distributed, gather the global batch (no gradient) so every rank holds the same bank."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            parts = [[torch.empty_like(t) for _ in range(world)] for t in (image, text)]
            dist.all_gather(parts[0], image.contiguous())
            dist.all_gather(parts[1], text.contiguous())
            image, text = torch.cat(parts[0]), torch.cat(parts[1])
            if ids is not None:
                id_parts = [torch.empty_like(ids) for _ in range(world)]
                dist.all_gather(id_parts, ids.contiguous())
                ids = torch.cat(id_parts)
        self.enqueue(image, text, ids)

    def region_negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(region caption embeddings, caption ids) of the filled region slots, as views."""
        if not self.region_text:
            raise ValueError("this memory bank keeps no region texts (built without region_text=True)")
        n = self._host["region_filled"]
        return self.region_text_queue[:n], self.region_id_queue[:n]

    @torch.no_grad()
    def enqueue_regions(self, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Write region-caption embeddings (any count per step) at the region pointer, wrapping around.

        A step with more valid regions than slots keeps the last ``size`` of them, as a ring buffer does.
        """
        if text.ndim != 2 or text.shape[1] != self.dim or ids.shape != text.shape[:1]:
            raise ValueError(f"memory bank holds {self.dim}-d region texts with one id each; got "
                             f"{tuple(text.shape)} and ids {tuple(ids.shape)}")  # fmt: skip
        text, ids = text[-self.size :], ids[-self.size :]
        n, start = text.shape[0], self._host["region_ptr"]
        first = min(n, self.size - start)
        self.region_text_queue[start : start + first].copy_(text[:first])
        self.region_id_queue[start : start + first].copy_(ids[:first])
        if n > first:
            self.region_text_queue[: n - first].copy_(text[first:])
            self.region_id_queue[: n - first].copy_(ids[first:])
        self._set("region_ptr", (start + n) % self.size)
        self._set("region_filled", min(self._host["region_filled"] + n, self.size))

    @torch.no_grad()
    def gather_and_enqueue_regions(self, text: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor) -> None:
        """Gather the padded (N, D) region texts of all ranks (equal N: padded to the same R), keep the valid
        rows and enqueue them, so every rank holds the same region queue."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            gathered = []
            for t in (text, valid.to(torch.uint8), ids):  # as uint8: not every backend gathers bool
                parts = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(parts, t.contiguous())
                gathered.append(torch.cat(parts))
            text, valid, ids = gathered[0], gathered[1].bool(), gathered[2]
        index = valid.nonzero().squeeze(1)  # the one host read of a step with regions: how many are valid
        self.enqueue_regions(text.index_select(0, index), ids.index_select(0, index))

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """Count one optimizer step and switch the bank on once the warmup has passed."""
        self._set("step", self._host["step"] + 1)
        self._set("enabled", int(self._host["step"] >= self.warmup_steps))

    def duplicate_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        """(B, n_filled) True where a bank entry is the same sample as a batch row (not a negative)."""
        if not self.track_ids or ids is None:
            return None
        return ids[:, None] == self.id_queue[: self._host["filled"]][None, :]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "image_queue"
        if key in state_dict and tuple(state_dict[key].shape) != (self.size, self.dim):
            k, d = state_dict[key].shape
            raise BankStateError(
                f"the checkpoint's memory bank has {k} slots of dim {d}, but --memory-bank-size is {self.size} "
                f"(dim {self.dim}); resume with --memory-bank-size {k}, or start the bank empty by loading "
                "the weights with --pretrained instead of --resume"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self.refresh_host_state()

    def buffer_names(self, prefix: str = "") -> list[str]:
        return [prefix + name for name, _ in self.named_buffers()]
