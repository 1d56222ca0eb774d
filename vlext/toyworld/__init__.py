"""The toy world: the project's embedded, deterministic data.

Real RGB images of coloured shapes (circle, square, triangle, star, diamond, cross) in seven
saturated, hue-separated colours and three sizes, at known boxes, on plain or lightly textured grey
backgrounds, each with an English and a Chinese caption and per-object phrases ("a large red circle" /
"一个大的红色圆形"). Nothing is downloaded: tests and demos of every extension package generate what they
need in seconds, and this package imports only numpy, PIL and the standard library so each of them
can use it.

Scenes::

    world = ToyWorld(seed=0, image_size=64, max_objects=3)
    scene = world.scene(7)            # depends only on (seed, 7)
    image = scene.render()            # PIL RGB image, identical on every call and machine
    scene.caption_en, scene.caption_zh, scene.boxes, scene.phrases("zh")
    target, caption_en, caption_zh = world.edit(scene, numpy.random.default_rng(0))
    box = locate(generated_image, "red")   # colour segmentation; compare with box_iou

Datasets in each host's native layout, read by its own loaders unchanged (each writer returns a path
and writes identical bytes for the same arguments)::

    write_cirr(root)                # CIRR: cirr/captions, cirr/image_splits, train/dev/test1 images
    write_fashioniq(root)           # FashionIQ: captions, image_splits, images
    write_grounding_jsonl(root, n)  # GLIGEN-style rows: image, caption, boxes, phrases (en or zh)
    write_clip_csv(root, n)         # open_clip_train CSV (tab, filepath/title) + region JSONL

or from the shell: ``python -m vlext.toyworld {cirr,fashioniq,grounding,clip} --out DIR [--n N]
[--seed S] [--image-size N] [--lang en|zh]``.

Guarantees the tests check: objects in a scene never overlap and never share a colour (so "the red
circle" is unambiguous and ``locate`` recovers every box exactly); an edit's instruction describes the
change actually made; a CIRR image set holds the reference, the target and four near variants of the
same scene with distinct instructions.
"""

from vlext.toyworld.cirr import write_cirr
from vlext.toyworld.clip_csv import write_clip_csv
from vlext.toyworld.fashioniq import write_fashioniq
from vlext.toyworld.grounding import write_grounding_jsonl
from vlext.toyworld.locate import box_iou, locate
from vlext.toyworld.palette import COLORS, SHAPES, SIZES
from vlext.toyworld.scene import Scene, ToyObject
from vlext.toyworld.world import EDIT_KINDS, Edit, ToyWorld

__all__ = [
    "COLORS",
    "EDIT_KINDS",
    "SHAPES",
    "SIZES",
    "Edit",
    "Scene",
    "ToyObject",
    "ToyWorld",
    "box_iou",
    "locate",
    "write_cirr",
    "write_clip_csv",
    "write_fashioniq",
    "write_grounding_jsonl",
]
