"""Spatial-adapter UNet forward against diffusers' native GLIGEN (``attention_type="gated"``) UNet; prints ratios.

All three UNets share identical weights: the native gated UNet, the plain UNet with the same base weights
and our processor adapter converted from the gated UNet's fusers (``adapter_from_gated_unet``), and the
plain UNet alone (the adapter's overhead). ``--unet sd15-2level`` (default): SD1.5 widths (320/640
channels, 768-d cross-attention, 8 heads) with two levels at a small latent; ``--unet sd15``: the whole
SD1.5 UNet (published config, 859.5M parameters, random weights; the plain UNets share the gated UNet's
tensors, so the base weights are in memory once, built on ``--device``). 30 grounding objects. Goal: processor / native <= 1.0.
Forward memory: the rise of memory in use at the peak of one forward (``benchmarks/peak_memory.py``: CUDA
peak allocated, or on CPU the C heap in use sampled after every aten op).

Usage: ``python -m benchmarks.bench_diffusers_spatial_adapter [--unet sd15-2level|sd15] [--latent 16]
[--batch 2] [--repeats 5] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:  # run by path: the repository before fairscale's top-level `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_ext.testing.published_unets import SD15  # noqa: E402  (a dict: no torch)

# torch and the libraries under test load in the functions that use them: `--help` answers at once.
if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

VARIANTS = ("native_gated", "processor", "plain")


UNETS = {
    "sd15-2level": {
        "block_out_channels": (320, 640),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    # runwayml/stable-diffusion-v1-5 unet/config.json (the sample size is the benchmark's --latent)
    "sd15": {k: v for k, v in SD15.items() if k != "sample_size"},
    # the same code path in seconds (a check that the script runs, not a measurement)
    "tiny": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
}


def _config(args) -> dict:
    return {"sample_size": args.latent, **UNETS[args.unet]}


def _sharing(gated, config: dict) -> UNet2DConditionModel:
    """A plain UNet whose base weights are the gated UNet's own tensors (built on meta, then assigned)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    base = {
        k: v
        for k, v in gated.state_dict().items()
        if ".fuser." not in k and not k.startswith("position_net.")
    }
    unet.load_state_dict(base, strict=True, assign=True)
    return unet.eval()


def _build(args):
    """Forward closures of the three variants; the processor and plain UNets copy the gated UNet's weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_ext.gligen_conversion import adapter_from_gated_unet

    torch.manual_seed(0)
    config = _config(args)
    dev = torch.device(args.device)
    with dev:  # built where it runs; the other two UNets share its tensors there: one copy of the weights
        gated = UNet2DConditionModel(**config, attention_type="gated").eval()
    with torch.no_grad():
        for name, p in gated.named_parameters():
            if "alpha_" in name:
                p.fill_(0.5)
    plain, with_adapter = _sharing(gated, config), _sharing(gated, config)
    adapter = adapter_from_gated_unet(gated)
    adapter.install(with_adapter)
    g = torch.Generator().manual_seed(1)
    b, n = args.batch, 30
    x = torch.randn(b, 4, args.latent, args.latent, generator=g)
    t = torch.full((b,), 500)
    ehs = torch.randn(b, 77, 768, generator=g)
    lo = torch.rand(b, n, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.4], dim=-1)
    phrases = torch.randn(b, n, 768, generator=g)
    masks = torch.ones(b, n)
    x, t, ehs, boxes, phrases, masks = (v.to(dev) for v in (x, t, ehs, boxes, phrases, masks))
    gligen = {"boxes": boxes, "positive_embeddings": phrases, "masks": masks}
    fns = {}
    fns["native_gated"] = lambda: gated(x, t, ehs, cross_attention_kwargs={"gligen": gligen}).sample
    adapter.to(dev)
    kwargs = adapter.cross_attention_kwargs
    fns["processor"] = lambda: (
        with_adapter(x, t, ehs, cross_attention_kwargs=kwargs(boxes, phrases, masks)).sample
    )
    fns["plain"] = lambda: plain(x, t, ehs).sample
    return fns


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _median_seconds(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median wall time per variant, the variants interleaved round by round so that a change in machine
    load (a shared CPU) hits all of them alike instead of whichever ran during it."""
    for fn in fns.values():
        fn()
    times = {v: [] for v in fns}
    for _ in range(repeats):
        for v, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=sorted(UNETS), default="sd15-2level")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from benchmarks.peak_memory import peak_bytes

    fns = _build(args)
    with torch.no_grad():
        diff = (fns["processor"]() - fns["native_gated"]()).abs().max().item()
        secs = _median_seconds({v: fns[v] for v in VARIANTS}, args.repeats, args.device)
        peaks = {v: peak_bytes(fns[v], args.device) / 2**20 for v in VARIANTS}
    widths = "/".join(map(str, UNETS[args.unet]["block_out_channels"]))
    print(
        f"unet {args.unet} (widths {widths}), latent {args.latent}x{args.latent}, batch {args.batch}, "
        f"30 objects, device {args.device}, {torch.get_num_threads()} threads"
    )
    print(f"max |processor - native| = {diff:.2e}")
    for v in VARIANTS:
        print(f"{v:>13}: {secs[v] * 1e3:8.1f} ms")
    print(f"processor / native gated = {secs['processor'] / secs['native_gated']:.3f}  (goal <= 1.0)")
    print(f"processor / plain UNet   = {secs['processor'] / secs['plain']:.3f}  (adapter overhead)")
    what = (
        "CUDA peak allocated"
        if args.device.startswith("cuda")
        else "peak heap in use, benchmarks/peak_memory.py"
    )
    print(f"forward memory ({what}), MB: " + ", ".join(f"{v} {peaks[v]:.1f}" for v in VARIANTS))
    print(
        f"forward memory processor / native gated = {peaks['processor'] / max(peaks['native_gated'], 1e-9):.3f}"
    )


if __name__ == "__main__":
    main()
