"""Named fuser placements: which transformer blocks of a UNet carry a gated fuser.

GLIGEN (Li et al., CVPR 2023) puts a fuser in every transformer block: 16 on SD1.5, 70 on SDXL/Kolors,
where ten-deep stacks at width 1280 make all 70 fusers 1.81 B parameters. The field's lighter placements:

- MIGC (Zhou et al., CVPR 2024) places its modules only in the mid block and the deepest up blocks, 4 of
  SD1.4's 16 (``mid_block`` + the three attention modules of ``up_blocks.1``). On SDXL/Kolors the same stages
  are ``mid_block`` + ``up_blocks.0``: the 1280-wide, lowest-resolution part of the UNet where layout is
  decided, but ten blocks deep each, so ``migc`` is 40 of 70 blocks there and ``migc-one-per-stack`` (the
  first block of each of those 4 stacks) is MIGC's own count of 4.
- ``one-per-stack``: the first block of every spatial transformer. On SD1.5 every spatial transformer holds
  one block, so this is GLIGEN's placement; on SDXL/Kolors it keeps one fuser per attention module at every
  resolution (11 of 70) instead of one per stacked block.

A preset resolves to explicit block names before the adapter is built; the adapter's config stores those
names, so a saved adapter loads without knowing any preset. :data:`PRESETS_HELP` is the text for a
``--layers`` help, with each preset's parameter count at published size (checked against
:func:`preset_parameter_counts` by tests/test_diffusers_presets.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FUSER_PRESETS", "PRESETS_HELP", "layers_for_config", "preset_parameter_counts", "resolve_layers"]

_BLOCK = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)$"
)


def _parts(name: str) -> tuple[str, int, int] | None:
    m = _BLOCK.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def _deepest_up_stage(names: list[str]) -> str | None:
    """The lowest-resolution up stage with cross-attention (UNet up blocks run from deep to shallow)."""
    ups = sorted({p[0] for p in map(_parts, names) if p and p[0].startswith("up_blocks.")}, key=_stage_index)
    return ups[0] if ups else None


def _stage_index(stage: str) -> int:
    return int(stage.rsplit(".", 1)[1])


def _all(names):
    return list(names)


def _mid(names):
    return [n for n in names if (p := _parts(n)) and p[0] == "mid_block"]


def _migc(names):
    stages = {"mid_block", _deepest_up_stage(names)}
    return [n for n in names if (p := _parts(n)) and p[0] in stages]


def _one_per_stack(names):
    return [n for n in names if (p := _parts(n)) and p[2] == 0]


def _migc_one_per_stack(names):
    return [n for n in _migc(names) if _parts(n)[2] == 0]


@dataclass(frozen=True)
class FuserPreset:
    description: str
    resolve: Callable[[list[str]], list[str]]


FUSER_PRESETS: dict[str, FuserPreset] = {
    "all": FuserPreset("every transformer block (GLIGEN; IGLIGEN-XL on SDXL)", _all),
    "one-per-stack": FuserPreset(
        "the first block of every spatial transformer (GLIGEN's placement on SD1.5; 11 of SDXL's 70)",
        _one_per_stack,
    ),
    "migc": FuserPreset(
        "the mid block and the deepest cross-attention up stage, every block of their stacks (MIGC)", _migc
    ),
    "migc-one-per-stack": FuserPreset(
        "migc with only the first block of each stack (MIGC's 4 placements on SDXL/Kolors too)",
        _migc_one_per_stack,
    ),
    "mid": FuserPreset("the mid block only", _mid),
}


def _valid_prefixes(names: list[str]) -> list[str]:
    """The stage and attention-module prefixes of ``names`` (a readable list; every full name also works)."""
    out = []
    for n in names:
        p = _parts(n)
        if p is None:
            continue
        for prefix in (p[0], f"{p[0]}.attentions.{p[1]}"):
            if prefix not in out:
                out.append(prefix)
    return out


def _matches(name: str, prefix: str) -> bool:
    # on dot boundaries: "up_blocks.1" must not take "up_blocks.10..."
    return name == prefix or name.startswith(prefix + ".")


def resolve_layers(block_names: list[str], layers: str | list[str] | None) -> list[str]:
    """The block names (in UNet order) chosen by ``layers``: None (all), a preset name, or a list whose
    entries are preset names or block-name prefixes (``"mid_block"``, ``"up_blocks.0.attentions.1"``, a
    full block name); the union of all entries.

    Raises:
        ValueError: an entry that is neither a preset nor a prefix of any block, or a preset that selects
            nothing in this UNet, naming the entry, the presets and this UNet's valid prefixes.

    Example:
        >>> names = [f"mid_block.attentions.0.transformer_blocks.{i}" for i in range(2)]
        >>> resolve_layers(names, "migc-one-per-stack")
        ['mid_block.attentions.0.transformer_blocks.0']
    """
    if layers is None:
        return list(block_names)
    if isinstance(layers, str):
        layers = [layers]
    chosen: set[str] = set()
    unknown, empty = [], []
    for entry in layers:
        if entry in FUSER_PRESETS:
            picked = FUSER_PRESETS[entry].resolve(block_names)
            if not picked:
                empty.append(entry)
            chosen.update(picked)
            continue
        picked = [n for n in block_names if _matches(n, entry)]
        if not picked:
            unknown.append(entry)
        chosen.update(picked)
    if unknown or empty:
        what = []
        if unknown:
            what.append(f"{unknown} are neither a fuser preset nor a block-name prefix of this UNet")
        if empty:
            what.append(f"presets {empty} select no transformer block of this UNet")
        raise ValueError(
            f"--layers: {'; '.join(what)}. Presets: {', '.join(FUSER_PRESETS)}. "
            f"Prefixes of this UNet: {', '.join(_valid_prefixes(block_names))} (or a full block name)"
        )
    return [n for n in block_names if n in chosen]


def layers_for_config(unet_config: dict, layers: str | list[str] | None) -> list[str]:
    """:func:`resolve_layers` for the UNet a ``config.json`` describes, built on the meta device (no weights,
    no memory, a second or less): a trainer checks ``--layers`` with it before loading any weights.

    Example:
        >>> from diffusers_ext.testing.tiny_unet import TINY_UNET_CONFIG
        >>> layers_for_config(TINY_UNET_CONFIG, "mid")
        ['mid_block.attentions.0.transformer_blocks.0']
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    names = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    return resolve_layers(names, layers)


# phrase-feature widths at published size: CLIP-L pooled (SD1.5), CLIP-L pooled + bigG projected (SDXL),
# ChatGLM3 hidden (Kolors)
PUBLISHED_PHRASE_DIMS = {"sd15": 768, "sdxl": 2048, "kolors": 4096}


def preset_parameter_counts(presets: list[str] | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """{model: {preset: (fuser blocks, adapter parameters)}} for SD1.5, SDXL and Kolors at published size.

    The UNets are built from their published configs on the meta device (no weights, no memory) and the
    adapter with its defaults (GLIGEN's: hidden 512, 30 objects), the grounding tokenizer included.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_ext.spatial_adapter import SpatialAdapter
    from diffusers_ext.testing.published_unets import KOLORS, SD15, SDXL

    presets = list(FUSER_PRESETS) if presets is None else presets
    counts = {}
    for model, config in (("sd15", SD15), ("sdxl", SDXL), ("kolors", KOLORS)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
            counts[model] = {}
            for preset in presets:
                adapter = SpatialAdapter.for_unet(unet, PUBLISHED_PHRASE_DIMS[model], layers=preset)
                n = sum(p.numel() for p in adapter.parameters())
                counts[model][preset] = (len(adapter.layer_names), n)
    return counts


def _help(counts: dict) -> str:
    def size(n: int) -> str:
        return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"

    lines = []
    for preset, spec in FUSER_PRESETS.items():
        per = ", ".join(
            f"{label} {counts[m][preset][0]} block{'s' * (counts[m][preset][0] != 1)} {size(counts[m][preset][1])}"
            for m, label in (("sd15", "SD1.5"), ("sdxl", "SDXL"), ("kolors", "Kolors"))
        )
        lines.append(f"{preset}: {spec.description} [{per}]")
    return "; ".join(lines)


# preset_parameter_counts() at the time of writing; the test recomputes it and compares the text
_COUNTS = {
    "sd15": {
        "all": (16, 209103776),
        "one-per-stack": (16, 209103776),
        "migc": (4, 109952072),
        "migc-one-per-stack": (4, 109952072),
        "mid": (1, 28302146),
    },
    "sdxl": {
        "all": (70, 1812443084),
        "one-per-stack": (11, 214901206),
        "migc": (40, 1156603024),
        "migc-one-per-stack": (4, 117821512),
        "mid": (10, 290951764),
    },
    "kolors": {
        "all": (70, 1813497804),
        "one-per-stack": (11, 215955926),
        "migc": (40, 1157657744),
        "migc-one-per-stack": (4, 118876232),
        "mid": (10, 292006484),
    },
}
PRESETS_HELP = (
    "Fuser placement: preset names or transformer-block name prefixes (default: all). Presets, with their "
    "adapter size at published width: " + _help(_COUNTS)
)
