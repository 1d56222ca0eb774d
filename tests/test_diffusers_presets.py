"""Named fuser placements: what each preset selects, its size at published width, and how a saved adapter
keeps the explicit block names."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_ext.fuser_presets import (
    _COUNTS,
    FUSER_PRESETS,
    PRESETS_HELP,
    _help,
    preset_parameter_counts,
    resolve_layers,
)
from diffusers_ext.spatial_adapter import SpatialAdapter, transformer_blocks
from diffusers_ext.testing.published_unets import SD15, SDXL
from diffusers_ext.testing.tiny_unet import tiny_unet

torch.set_num_threads(1)


def _meta_blocks(config) -> list[str]:
    with torch.device("meta"):
        return list(transformer_blocks(UNet2DConditionModel(**config)))


@pytest.fixture(scope="module")
def sd15_blocks():
    return _meta_blocks(SD15)


@pytest.fixture(scope="module")
def sdxl_blocks():
    return _meta_blocks(SDXL)


def _tb(attention: str, *indices) -> list[str]:
    return [f"{attention}.transformer_blocks.{i}" for i in indices]


def test_migc_on_sd15_is_mid_plus_the_deepest_up_stage_4_of_16(sd15_blocks):
    assert len(sd15_blocks) == 16
    assert resolve_layers(sd15_blocks, "migc") == [
        *_tb("up_blocks.1.attentions.0", 0),
        *_tb("up_blocks.1.attentions.1", 0),
        *_tb("up_blocks.1.attentions.2", 0),
        *_tb("mid_block.attentions.0", 0),
    ]
    assert resolve_layers(sd15_blocks, "one-per-stack") == sd15_blocks  # one block per stack on SD1.5
    assert resolve_layers(sd15_blocks, "mid") == _tb("mid_block.attentions.0", 0)


def test_sdxl_presets_select_the_expected_blocks(sdxl_blocks):
    assert len(sdxl_blocks) == 70
    migc = resolve_layers(sdxl_blocks, "migc")
    assert len(migc) == 40
    assert {n.split(".attentions")[0] for n in migc} == {"mid_block", "up_blocks.0"}
    assert resolve_layers(sdxl_blocks, "migc-one-per-stack") == [
        *_tb("up_blocks.0.attentions.0", 0),
        *_tb("up_blocks.0.attentions.1", 0),
        *_tb("up_blocks.0.attentions.2", 0),
        *_tb("mid_block.attentions.0", 0),
    ]
    one = resolve_layers(sdxl_blocks, "one-per-stack")
    assert len(one) == 11 and all(n.endswith("transformer_blocks.0") for n in one)
    assert resolve_layers(sdxl_blocks, "mid") == _tb("mid_block.attentions.0", *range(10))
    assert resolve_layers(sdxl_blocks, "all") == resolve_layers(sdxl_blocks, None) == sdxl_blocks
    # presets and prefixes combine as a union, in UNet order
    both = resolve_layers(sdxl_blocks, ["mid", "down_blocks.1.attentions.0"])
    assert both == _tb("down_blocks.1.attentions.0", 0, 1) + _tb("mid_block.attentions.0", *range(10))


def test_prefixes_match_on_dot_boundaries():
    names = _tb("up_blocks.0.attentions.0", 0, 1, 10)
    assert resolve_layers(names, ["up_blocks.0.attentions.0.transformer_blocks.1"]) == names[1:2]


def test_an_unknown_name_lists_the_presets_and_this_unets_prefixes(sdxl_blocks):
    with pytest.raises(ValueError) as err:
        resolve_layers(sdxl_blocks, ["bogus", "mid"])
    message = str(err.value)
    assert "--layers: ['bogus'] are neither a fuser preset nor a block-name prefix of this UNet" in message
    assert "Presets: all, one-per-stack, migc, migc-one-per-stack, mid." in message
    assert (
        "Prefixes of this UNet: down_blocks.1, down_blocks.1.attentions.0, down_blocks.1.attentions.1,"
        in message
    )


def test_a_preset_that_selects_nothing_is_refused():
    unet = tiny_unet(mid_block_type=None)
    with pytest.raises(ValueError, match=r"presets \['mid'\] select no transformer block of this UNet"):
        SpatialAdapter.for_unet(unet, phrase_dim=16, layers="mid")


def test_parameter_counts_at_published_size():
    counts = preset_parameter_counts()
    assert counts == _COUNTS
    # GLIGEN's 70 SDXL fusers are the 1.81 B of issue 28; MIGC's 4 SD1.4 placements are about half of all 16
    assert counts["sdxl"]["all"] == (70, 1_812_443_084)
    assert counts["kolors"]["all"] == (70, 1_813_497_804)
    assert counts["sd15"]["all"] == (16, 209_103_776)
    assert counts["sd15"]["migc"] == (4, 109_952_072)
    assert counts["sdxl"]["migc"] == (40, 1_156_603_024)
    assert counts["sdxl"]["migc-one-per-stack"] == (4, 117_821_512)
    assert counts["sdxl"]["one-per-stack"] == (11, 214_901_206)
    assert counts["sdxl"]["mid"] == (10, 290_951_764)
    assert PRESETS_HELP.endswith(_help(counts))
    assert "SDXL 70 blocks 1.81 B" in PRESETS_HELP and "SD1.5 1 block 28 M" in PRESETS_HELP
    assert set(FUSER_PRESETS) == set(counts["sd15"])


def test_a_saved_preset_adapter_stores_block_names_and_loads_without_presets(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    adapter = SpatialAdapter.for_unet(unet, phrase_dim=16, layers="migc", hidden_dim=32)
    expected = [n for n in transformer_blocks(unet) if n.startswith(("mid_block.", "up_blocks.0."))]
    assert adapter.layer_names == expected and len(expected) == 3
    adapter.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert [spec[0] for spec in saved["layers"]] == expected
    assert "migc" not in json.dumps(saved)
    loaded = SpatialAdapter.from_pretrained(tmp_path)
    assert loaded.layer_names == expected
    for (k, a), b in zip(adapter.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    loaded.install(unet)  # fits the UNet it was made for


def test_the_docstring_examples_run():
    import doctest

    import diffusers_ext.fuser_presets as module

    assert doctest.testmod(module).failed == 0


def test_layers_are_checked_from_a_unet_config_before_any_weights(tmp_path):
    from diffusers_ext.fuser_presets import layers_for_config
    from diffusers_ext.testing.tiny_unet import TINY_UNET_CONFIG

    saved = tiny_unet()
    saved.save_config(tmp_path)  # what a pipeline folder's unet/config.json holds
    config = json.loads((tmp_path / "config.json").read_text())
    assert layers_for_config(config, ["migc"]) == [
        n for n in transformer_blocks(saved) if n.startswith(("mid_block.", "up_blocks.0."))
    ]
    assert layers_for_config(SDXL, "migc-one-per-stack")[-1] == "mid_block.attentions.0.transformer_blocks.0"
    with pytest.raises(ValueError, match=r"\['bogus'\] are neither a fuser preset"):
        layers_for_config(TINY_UNET_CONFIG, ["bogus"])
