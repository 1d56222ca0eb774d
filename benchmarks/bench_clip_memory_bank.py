"""Memory bank cost against open_clip's own ``ClipLoss``, measured in one run; prints ratios.

Three figures the issue asks for: bank memory (K x D x bytes per queue), loss time with an active bank of
K = 65536, D = 512 against plain ``ClipLoss`` on the same batch, and a training-step time (forward,
backward, optimizer step, enqueue) of a small open_clip model with the bank against without (goal <= 1.05).

Usage: ``python benchmarks/bench_clip_memory_bank.py [--bank-size 65536] [--batch 32] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # started by path: fairscale's `benchmarks` package must not shadow ours
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_medians  # noqa: E402

# torch and the libraries under test load in the functions that use them: `--help` answers at once.
if TYPE_CHECKING:
    from clip_ext.memory_bank import MemoryBank


def _full_bank(size: int, dim: int) -> MemoryBank:
    import torch
    import torch.nn.functional as F

    from clip_ext.memory_bank import MemoryBank

    bank = MemoryBank(size, dim)
    bank.enqueue(F.normalize(torch.randn(size, dim), dim=-1), F.normalize(torch.randn(size, dim), dim=-1))
    bank.optimizer_step()
    return bank


def bench_loss(size: int, dim: int, batch: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from clip_ext.loss import MemoryBankClipLoss

    image = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(100.0)
    plain, banked = ClipLoss(), MemoryBankClipLoss(_full_bank(size, dim))

    def step(loss):
        return lambda: loss(image, text, scale).backward()

    medians = interleaved_medians({"plain": step(plain), "bank": step(banked)}, repeats)
    t_plain, t_bank = medians["plain"], medians["bank"]
    print(f"loss fwd+bwd, batch {batch}, K={size}, D={dim}: ClipLoss {1e3 * t_plain:.2f} ms, "
          f"MemoryBankClipLoss {1e3 * t_bank:.2f} ms, ratio {t_bank / t_plain:.2f}")  # fmt: skip


def bench_step(model_name: str, size: int, batch: int, repeats: int) -> None:
    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    import clip_ext  # noqa: F401  (registers clip-ext-tiny)
    from clip_ext.loss import MemoryBankClipLoss

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True)
    dim = model.visual.output_dim
    tokenizer = open_clip.get_tokenizer(model_name)
    images = torch.randn(batch, 3, model.visual.image_size[0], model.visual.image_size[1])
    texts = tokenizer([f"a photo number {i}" for i in range(batch)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plain, banked = ClipLoss(), MemoryBankClipLoss(_full_bank(size, dim))

    def step(loss):
        def run():
            optimizer.zero_grad()
            out = model(images, texts)
            loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
            optimizer.step()
            if isinstance(loss, MemoryBankClipLoss):
                loss.commit()

        return run

    medians = interleaved_medians({"plain": step(plain), "bank": step(banked)}, repeats)
    t_plain, t_bank = medians["plain"], medians["bank"]
    print(f"train step of {model_name}, batch {batch}, K={size}, D={dim}: without bank {1e3 * t_plain:.1f} ms, "
          f"with bank {1e3 * t_bank:.1f} ms, ratio {t_bank / t_plain:.3f} (goal <= 1.05)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--bank-size", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model for the step benchmark")
    args = parser.parse_args()
    import torch

    from clip_ext.memory_bank import MemoryBank

    torch.set_grad_enabled(True)
    bank = MemoryBank(args.bank_size, args.dim)
    bytes_per_queue = bank.image_queue.numel() * bank.image_queue.element_size()
    total = sum(b.numel() * b.element_size() for b in bank.buffers())
    print(f"bank memory K={args.bank_size} x D={args.dim} x 4 bytes = {bytes_per_queue / 2**20:.1f} MiB per "
          f"queue; {total / 2**20:.1f} MiB in all (image + text queues, id queue, counters)")  # fmt: skip
    bench_loss(args.bank_size, args.dim, args.batch, args.repeats)
    bench_step(args.model, args.bank_size, args.batch, args.repeats)


if __name__ == "__main__":
    main()
