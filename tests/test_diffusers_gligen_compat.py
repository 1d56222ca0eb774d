"""GLIGEN weights in processor form reproduce diffusers' native gated UNet, and convert back losslessly."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_ext.gligen_conversion import (
    adapter_from_gated_unet,
    adapter_from_gligen_checkpoint,
    adapter_to_gated_state_dict,
    adapter_to_gligen_checkpoint,
    diffusers_to_ldm_block_name,
)
from diffusers_ext.testing.tiny_unet import TINY_UNET_CONFIG

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    gated = UNet2DConditionModel(**TINY_UNET_CONFIG, attention_type="gated").eval()
    with torch.no_grad():  # open the gates and move the null features so the fusers matter
        for name, p in gated.named_parameters():
            if "alpha_" in name:
                p.uniform_(0.3, 1.0)
            if "null_" in name:
                p.normal_()
    plain = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    missing, _ = plain.load_state_dict(gated.state_dict(), strict=False)
    assert not missing
    return gated, plain


def _inputs():
    """Two layouts in GLIGEN's 30 slots (the adapter pads to max_objs = 30 itself; diffusers' gated UNet takes
    whatever it is given, and its GLIGEN pipeline gives 30)."""
    g = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    boxes = torch.zeros(2, 30, 4)
    boxes[:, :2] = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.4, 0.2, 0.9, 0.8]])
    masks = torch.zeros(2, 30)
    masks[0, :2] = 1
    masks[1, :1] = 1
    return x, torch.tensor([10, 500]), ehs, boxes, torch.randn(2, 30, 32, generator=g), masks


def test_converted_processor_unet_matches_native_gated_unet_to_1e5(unets):
    gated, plain = unets
    x, t, ehs, boxes, phrases, masks = _inputs()
    gligen = {"boxes": boxes, "positive_embeddings": phrases, "masks": masks}
    adapter = adapter_from_gated_unet(gated)
    adapter.install(plain)
    try:
        with torch.no_grad():
            native = gated(x, t, ehs, cross_attention_kwargs={"gligen": gligen}).sample
            ours = plain(
                x, t, ehs, cross_attention_kwargs=adapter.cross_attention_kwargs(boxes, phrases, masks)
            ).sample
            without = plain(x, t, ehs).sample
    finally:
        adapter.remove()
    assert (native - without).abs().max() > 1e-2  # the fusers change the output, so agreement means something
    assert (ours - native).abs().max() < 1e-5


def test_adapter_converts_back_to_gated_unet_keys_exactly(unets):
    gated, _ = unets
    back = adapter_to_gated_state_dict(adapter_from_gated_unet(gated))
    native = {k: v for k, v in gated.state_dict().items() if ".fuser." in k or k.startswith("position_net.")}
    assert set(back) == set(native)
    assert all(torch.equal(back[k], native[k]) for k in native)


def test_official_checkpoint_round_trip_with_ldm_prefix(unets):
    gated, plain = unets
    adapter = adapter_from_gated_unet(gated)
    official = adapter_to_gligen_checkpoint(adapter, plain)
    assert "input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight" in official
    assert "middle_block.1.transformer_blocks.0.fuser.ff.net.0.proj.weight" in official
    ckpt = {"model": {f"model.diffusion_model.{k}": v for k, v in official.items()}}
    again = adapter_from_gligen_checkpoint(ckpt, plain)
    a, b = adapter.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ldm_block_names_follow_sd15_numbering():
    assert diffusers_to_ldm_block_name("down_blocks.0.attentions.1.transformer_blocks.0", 2) == (
        "input_blocks.2.1.transformer_blocks.0"
    )
    assert diffusers_to_ldm_block_name("down_blocks.1.attentions.0.transformer_blocks.0", 2).startswith(
        "input_blocks.4."
    )
    assert diffusers_to_ldm_block_name("up_blocks.1.attentions.0.transformer_blocks.0", 2).startswith(
        "output_blocks.3."
    )
    assert diffusers_to_ldm_block_name("up_blocks.3.attentions.2.transformer_blocks.0", 2).startswith(
        "output_blocks.11."
    )


def test_plain_unet_and_text_image_checkpoints_are_refused(unets):
    _, plain = unets
    with pytest.raises(ValueError, match="attention_type='gated'"):
        adapter_from_gated_unet(plain)
    with pytest.raises(KeyError, match="not a GLIGEN checkpoint"):
        adapter_from_gligen_checkpoint({"input_blocks.1.1.norm.weight": torch.zeros(1)}, plain)
