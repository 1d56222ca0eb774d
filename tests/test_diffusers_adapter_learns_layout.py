"""From its zero-init gate the adapter learns outputs that follow the boxes (not just a box-free average).

A frozen random tiny UNet with two coordinate input channels; fresh noise at the last timestep every step
(so nothing but the box says where the target is); the target is the box's mask. After training only the
adapter, its loss with the right boxes must be well below its loss with the boxes shuffled between samples.
"""

import torch
import torch.nn.functional as F

from diffusers_ext.demo import DEMO_CONFIG, _with_coords
from diffusers_ext.spatial_adapter import SpatialAdapter
from diffusers_ext.testing.tiny_unet import tiny_unet


def test_adapter_learns_box_dependent_output_from_zero_init():
    torch.manual_seed(0)
    cfg = {**DEMO_CONFIG, "coord_channels": True}
    size = 8  # latent side: a box (0.4 wide) still spans about 3 of the 8 cells per side
    unet = tiny_unet(sample_size=size, in_channels=5, out_channels=3, cross_attention_dim=32, **cfg["unet"])
    unet.requires_grad_(False)
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=32, max_objs=1, hidden_dim=64)
    adapter.install(unet)
    g = torch.Generator().manual_seed(1)
    n = 16
    corner = torch.rand(n, 2, generator=g) * 0.6
    boxes = torch.cat([corner, corner + 0.4], dim=-1)[:, None]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    b = boxes[:, 0, :, None, None]
    inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
    target = (inside.float() * 2 - 1)[:, None].expand(n, 3, size, size)
    phrases = torch.randn(1, 1, 32, generator=g).expand(n, 1, 32).contiguous()
    masks = torch.ones(n, 1)
    t = torch.full((n,), 999)

    def loss_with(box, noise):
        kwargs = adapter.cross_attention_kwargs(box, phrases, masks)
        return F.mse_loss(
            unet(_with_coords(noise, cfg), t, phrases, cross_attention_kwargs=kwargs).sample, target
        )

    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    assert adapter.gate_stats()["abs_mean"] == 0.0  # starts as the identity
    # 8x8 steps cost half of 16x16 ones; 200 of them leave right/shuffled at 0.46/0.54/0.68/0.67 for seeds
    # 0-3 (16x16, 120 steps: 0.71/0.79/0.80/0.79)
    for _ in range(200):
        loss = loss_with(boxes, torch.randn(n, 3, size, size, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        noise = torch.randn(n, 3, size, size, generator=g)
        right = loss_with(boxes, noise).item()
        shuffled = loss_with(boxes[torch.roll(torch.arange(n), 1)], noise).item()
    assert adapter.gate_stats()["abs_mean"] > 0.01
    assert right < 0.8 * shuffled, (right, shuffled)
