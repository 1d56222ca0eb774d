"""Toy CIRR: composed image retrieval triplets in the official CIRR on-disk layout.

The layout is the one CIRR releases (Liu et al., ICCV 2021, github Cuberick-Orion/CIRR) and SPRC's
``CIRRDataset`` reads, with ``root`` playing the part of SPRC's ``base_path / "cirr_dataset"``::

    root/cirr/captions/cap.rc2.{train,val,test1}.json
    root/cirr/image_splits/split.rc2.{train,val,test1}.json   # {image name: "./train/<k>/<name>.png"}
    root/train/<k>/<name>.png, root/dev/<name>.png, root/test1/<name>.png

Each image set is a family of six scenes: a base scene and five different edits of it. A triplet is
(base, one edit, that edit's instruction), and the other four edits are the near variants that make
CIRR's subset recall (R_s@K within ``img_set.members``) a test of reading the instruction rather than
of recognising the scene. Within a family no two members are equal and no two instructions coincide,
so each triplet has exactly one correct target among the members.
"""

from __future__ import annotations

from pathlib import Path

from vlext.toyworld._output import check_root, save_png, write_json
from vlext.toyworld._validation import check_count, check_image_size, check_seed
from vlext.toyworld.scene import Scene
from vlext.toyworld.world import Edit, ToyWorld

__all__ = ["write_cirr"]

SET_SIZE = 6
# CIRR's split names and the image directories of its release ("val" images live in "dev").
_SPLITS = {"train": "train", "val": "dev", "test1": "test1"}
# Scene indices of different splits never meet: split k uses indices k * _SPLIT_STRIDE + family.
_SPLIT_STRIDE = 10**7
_MAX_TRIES = 40


def _family(world: ToyWorld, index: int) -> tuple[Scene, list[Edit]] | None:
    """Scene ``index`` and five edits of it with distinct targets and instructions, or None."""
    base = world.scene(index)
    rng = world.rng(index, 1)
    edits: list[Edit] = []
    seen_objects = [base.objects]
    seen_captions: set[str] = set()
    for _ in range(_MAX_TRIES):
        edit = world.edit(base, rng)
        if edit.caption_en in seen_captions or edit.target.objects in seen_objects:
            continue
        edits.append(edit)
        seen_objects.append(edit.target.objects)
        seen_captions.add(edit.caption_en)
        if len(edits) == SET_SIZE - 1:
            return base, edits
    return None


def _write_split(root: Path, world: ToyWorld, split: str, n_pairs: int, pairs_per_set: int) -> None:
    image_dir = _SPLITS[split]
    split_code = list(_SPLITS).index(split)
    triplets: list[dict] = []
    name_to_relpath: dict[str, str] = {}
    family = 0
    index = split_code * _SPLIT_STRIDE
    while len(triplets) < n_pairs:
        found = _family(world, index)
        rng = world.rng(index, 2)
        index += 1
        if found is None:
            continue
        base, edits = found
        scenes = [base] + [e.target for e in edits]
        # Shuffle member slots so the reference is not always the first member.
        slots = [int(k) for k in rng.permutation(SET_SIZE)]
        names = [f"{image_dir}-{family}-{slot // 2}-img{slot % 2}" for slot in slots]
        members = [names[slots.index(slot)] for slot in range(SET_SIZE)]
        for scene, name in zip(scenes, names):
            relpath = (
                f"./{image_dir}/{family // 100}/{name}.png"
                if split == "train"
                else f"./{image_dir}/{name}.png"
            )
            name_to_relpath[name] = relpath
            save_png(scene.render(), root / relpath)
        for k in range(min(pairs_per_set, n_pairs - len(triplets))):
            row = {"pairid": len(triplets), "reference": names[0]}
            if split != "test1":
                row["target_hard"] = names[k + 1]
                row["target_soft"] = {names[k + 1]: 1.0}
            row["caption"] = edits[k].caption_en
            row["img_set"] = {"id": family, "members": members, "reference_rank": members.index(names[0])}
            if split != "test1":
                row["img_set"]["target_rank"] = members.index(names[k + 1])
            triplets.append(row)
        family += 1
    write_json(triplets, root / "cirr" / "captions" / f"cap.rc2.{split}.json")
    write_json(name_to_relpath, root / "cirr" / "image_splits" / f"split.rc2.{split}.json")


def write_cirr(
    root,
    n_train: int = 100,
    n_val: int = 30,
    n_test: int = 30,
    seed: int = 0,
    image_size: int = 64,
    pairs_per_set: int = 2,
    max_objects: int = 3,
) -> Path:
    """Write a toy CIRR dataset under ``root`` and return ``root``.

    ``n_train``, ``n_val``, ``n_test`` count triplets (``test1`` rows carry no target, as released);
    each image set of six images yields ``pairs_per_set`` triplets (1 to 5).
    """
    root = check_root(root)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_count(name, value)
        if value >= _SPLIT_STRIDE:
            raise ValueError(f"{name} must be below {_SPLIT_STRIDE}, got {value}")
    check_count("pairs_per_set", pairs_per_set, minimum=1)
    if pairs_per_set > SET_SIZE - 1:
        raise ValueError(f"pairs_per_set must be in [1, {SET_SIZE - 1}], got {pairs_per_set}")
    world = ToyWorld(check_seed(seed), check_image_size(image_size), max_objects=max_objects)
    for split, n in (("train", n_train), ("val", n_val), ("test1", n_test)):
        _write_split(root, world, split, n, pairs_per_set)
    return root
