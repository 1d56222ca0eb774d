"""``python -m clip_ext.export CKPT OUT``: a clip_ext.train checkpoint as a plain open_clip state dict.

Checkpoints that ``clip_ext.train`` writes already load in open_clip (the bank lives under a key open_clip
ignores, see :mod:`clip_ext.checkpoint`); this writes only the weights, without optimizer, bank or DDP
prefix, which is what a released model file holds. It also converts checkpoints of older clip_ext versions
that kept the bank inside ``state_dict`` (open_clip refuses those with "Unexpected key(s)").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clip_ext.export",
        description="Write the open_clip weights of a clip_ext.train checkpoint as a plain state dict "
        "(loadable with open_clip.create_model(name, pretrained=OUT) and --pretrained OUT).",
    )
    parser.add_argument("checkpoint", help="epoch_N.pt written by clip_ext.train (or open_clip_train)")
    parser.add_argument("out", help="file to write (a torch state dict); an existing file needs --overwrite")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (never CHECKPOINT)"
    )
    args = parser.parse_args(argv)
    source, out = Path(args.checkpoint), Path(args.out)
    if source.is_dir():
        parser.error(f"CHECKPOINT {source} is a folder; give a checkpoint file (e.g. {source}/epoch_1.pt)")
    if not source.is_file():
        parser.error(f"{source}: no such file")
    # Exporting onto the input replaced the resumable checkpoint (optimizer, bank) with bare weights.
    if out.exists() and out.resolve() == source.resolve():
        parser.error(f"OUT {out} is CHECKPOINT itself; write the plain state dict to another file")
    if out.is_dir():
        parser.error(f"OUT {out} is a folder; give a file name (e.g. {out / source.with_suffix('.pt').name})")
    if out.exists() and not args.overwrite:
        parser.error(f"OUT {out} exists; pass --overwrite to replace it, or give another file name")
    from clip_ext.checkpoint import atomic_save, checkpoint_problem, plain_state_dict

    problem = checkpoint_problem(source)
    if problem is not None:
        parser.error(f"{source} is not a complete checkpoint ({problem})")
    import torch

    try:
        state = plain_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    except ValueError as e:
        parser.error(f"{source}: {e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    print(f"wrote {len(state)} open_clip tensors to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
