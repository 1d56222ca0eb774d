"""Training-step time with the memory bank and with ``--diag`` against without, and host reads per step.

A step as ``clip_ext.train`` runs it (model forward, loss, backward, AdamW, bank enqueue) for four variants,
interleaved in one run: open_clip's ``ClipLoss``; an active bank; an active bank with ``--diag`` on a step
the master logs (logits kept, bank mass, logit range and bank state read to the host); and an active bank
with ``--diag`` on a step it does not log (what every other step costs: nothing kept, nothing read). Each
variant's host reads per step (``.item()``/``int()``/``bool()`` of a device value, data-dependent
selections: each a synchronisation on a GPU) in the loss, the bank and the log are counted with a
dispatch mode (the model and optimizer are open_clip's and torch's and count alike in every variant). Issue 29,
finding 5.

Usage: ``python benchmarks/bench_clip_step_diag.py [--model clip-ext-tiny] [--bank-size 4096] [--batch 32]
[--repeats 7]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # started by path: fairscale's `benchmarks` package must not shadow ours
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_medians  # noqa: E402


def _host_reads(fn) -> int:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            indices = args[1] if name.startswith("aten.index.Tensor") and len(args) > 1 else []
            if name in ("aten._local_scalar_dense.default", "aten.nonzero.default") or any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
            ):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="clip-ext-tiny", help="open_clip model config")
    parser.add_argument("--bank-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import open_clip
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    import clip_ext  # noqa: F401  (registers clip-ext-tiny)
    from clip_ext import diagnostics
    from clip_ext.loss import MemoryBankClipLoss
    from clip_ext.memory_bank import MemoryBank

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, output_dict=True)
    dim = model.visual.output_dim
    images = torch.randn(args.batch, 3, *model.visual.image_size)
    texts = open_clip.get_tokenizer(args.model)([f"a photo number {i}" for i in range(args.batch)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def full_bank():
        bank = MemoryBank(args.bank_size, dim)
        bank.enqueue(F.normalize(torch.randn(args.bank_size, dim), dim=-1),
                     F.normalize(torch.randn(args.bank_size, dim), dim=-1))  # fmt: skip
        bank.optimizer_step()
        return bank

    def loss_part(loss, logged, out):
        """What clip_ext adds to a step: the loss and its backward, the enqueue, the --diag log."""
        if logged is not None:
            loss.keep_logits = logged
        loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        if isinstance(loss, MemoryBankClipLoss):
            loss.commit()
            if logged:
                diagnostics.collect(model, loss, loss.bank)

    def step(loss, logged: bool | None):
        def run():
            optimizer.zero_grad()
            loss_part(loss, logged, model(images, texts))
            optimizer.step()

        return run

    def loss_reads(loss, logged):
        def run():
            with torch.no_grad():
                out = {k: v.detach() for k, v in model(images, texts).items()}
            out = {k: v.requires_grad_() for k, v in out.items()}
            loss_part(loss, logged, out)

        return run

    losses = {
        "without bank (ClipLoss)": (ClipLoss(), None),
        "bank": (MemoryBankClipLoss(full_bank()), None),
        "bank + --diag, a logged step": (MemoryBankClipLoss(full_bank(), diag=True), True),
        "bank + --diag, a step not logged": (MemoryBankClipLoss(full_bank(), diag=True), False),
    }
    variants = {name: step(*loss) for name, loss in losses.items()}
    reads = {name: _host_reads(loss_reads(*loss)) for name, loss in losses.items()}
    medians = interleaved_medians(variants, args.repeats)
    base = medians["without bank (ClipLoss)"]
    print(f"train step of {args.model}, batch {args.batch}, K={args.bank_size}, D={dim}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}:")  # fmt: skip
    for name, seconds in medians.items():
        print(
            f"  {name}: {1e3 * seconds:.1f} ms, ratio {seconds / base:.3f}, host reads in loss, bank and log {reads[name]}"
        )


if __name__ == "__main__":
    main()
