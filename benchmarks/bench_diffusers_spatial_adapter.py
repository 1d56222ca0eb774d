"""Spatial-adapter UNet forward against diffusers' native GLIGEN (``attention_type="gated"``) UNet; prints ratios.

All three UNets share identical weights: the native gated UNet, the plain UNet with the same base weights
and our processor adapter converted from the gated UNet's fusers (``adapter_from_gated_unet``), and the
plain UNet alone (the adapter's overhead). SD1.5-shaped width (320/640 channels, 768-d cross-attention,
8 heads, 30 grounding objects) at a small latent so it runs on CPU. Goal: processor / native <= 1.0.
Forward memory (peak allocated, per variant in a fresh subprocess) is measured on CUDA only.

Usage: ``python benchmarks/bench_diffusers_spatial_adapter.py [--latent 16] [--batch 2] [--repeats 5]
[--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from diffusers_ext.gligen_compat import adapter_from_gated_unet

VARIANTS = ("native_gated", "processor", "plain")


def _config(latent: int) -> dict:
    return {
        "sample_size": latent,
        "block_out_channels": (320, 640),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


def _build(args, variants=VARIANTS):
    """Forward closures for ``variants``; the processor and plain UNets copy the gated UNet's weights."""
    torch.manual_seed(0)
    gated = UNet2DConditionModel(**_config(args.latent), attention_type="gated").eval()
    with torch.no_grad():
        for name, p in gated.named_parameters():
            if "alpha_" in name:
                p.fill_(0.5)
    plain = UNet2DConditionModel(**_config(args.latent)).eval() if "plain" in variants else None
    with_adapter = UNet2DConditionModel(**_config(args.latent)).eval() if "processor" in variants else None
    adapter = adapter_from_gated_unet(gated)
    for unet in (plain, with_adapter):
        if unet is not None:
            unet.load_state_dict(gated.state_dict(), strict=False)
    if with_adapter is not None:
        adapter.install(with_adapter)
    if "native_gated" not in variants:
        del gated
    g = torch.Generator().manual_seed(1)
    b, n = args.batch, 30
    x = torch.randn(b, 4, args.latent, args.latent, generator=g)
    t = torch.full((b,), 500)
    ehs = torch.randn(b, 77, 768, generator=g)
    lo = torch.rand(b, n, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.4], dim=-1)
    phrases = torch.randn(b, n, 768, generator=g)
    masks = torch.ones(b, n)
    dev = torch.device(args.device)
    x, t, ehs, boxes, phrases, masks = (v.to(dev) for v in (x, t, ehs, boxes, phrases, masks))
    gligen = {"boxes": boxes, "positive_embeddings": phrases, "masks": masks}
    fns = {}
    if "native_gated" in variants:
        gated.to(dev)
        fns["native_gated"] = lambda: gated(x, t, ehs, cross_attention_kwargs={"gligen": gligen}).sample
    if "processor" in variants:
        with_adapter.to(dev), adapter.to(dev)
        kwargs = adapter.cross_attention_kwargs
        fns["processor"] = lambda: (
            with_adapter(x, t, ehs, cross_attention_kwargs=kwargs(boxes, phrases, masks)).sample
        )
    if "plain" in variants:
        plain.to(dev)
        fns["plain"] = lambda: plain(x, t, ehs).sample
    return fns


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory_mb(args, variant: str) -> float:
    """Memory one forward of ``variant`` adds at its peak, in a fresh process holding only that model (and the
    gated UNet it was copied from, freed before the forward): CUDA peak allocated, or the max-RSS rise on CPU."""
    cmd = [
        sys.executable,
        __file__,
        "--only",
        variant,
        "--latent",
        str(args.latent),
        "--batch",
        str(args.batch),
    ]
    cmd += ["--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    fns = _build(args, (args.only,) if args.only else VARIANTS)
    with torch.no_grad():
        if args.only:
            cuda = args.device.startswith("cuda")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            fns[args.only]()
            after = (
                torch.cuda.max_memory_allocated()
                if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            print(json.dumps({"peak_mb": (after - before) / 2**20}))
            return
        diff = (fns["processor"]() - fns["native_gated"]()).abs().max().item()
        secs = {v: _median_seconds(fns[v], args.repeats, args.device) for v in VARIANTS}
    print(
        f"latent {args.latent}x{args.latent}, batch {args.batch}, 30 objects, widths 320/640, device {args.device}"
    )
    print(f"max |processor - native| = {diff:.2e}")
    for v in VARIANTS:
        print(f"{v:>13}: {secs[v] * 1e3:8.1f} ms")
    print(f"processor / native gated = {secs['processor'] / secs['native_gated']:.3f}  (goal <= 1.0)")
    print(f"processor / plain UNet   = {secs['processor'] / secs['plain']:.3f}  (adapter overhead)")
    if not args.device.startswith("cuda"):
        # measured: on CPU the max-RSS rise over a forward is 0 MB because building the UNets peaks higher
        print(
            "forward memory: measured with --device cuda only (CPU max RSS is dominated by model construction)"
        )
        return
    peaks = {v: _peak_memory_mb(args, v) for v in VARIANTS}
    print("forward memory (peak allocated, MB): " + ", ".join(f"{v} {peaks[v]:.0f}" for v in VARIANTS))
    print(
        f"forward memory processor / native gated = {peaks['processor'] / max(peaks['native_gated'], 1e-9):.3f}"
    )


if __name__ == "__main__":
    main()
