"""layout_scores on images whose answer is known: rendered scenes, shifted objects, missing objects."""

import numpy as np
import pytest
from PIL import Image

from diffusers_ext.evaluation.layout_scoring import layout_scores
from vlext.toyworld import ToyWorld


@pytest.fixture(scope="module")
def scenes():
    return list(ToyWorld(seed=3, image_size=64, max_objects=1, backgrounds=("plain",)).scenes(12))


def _requests(scenes, shift=0.0):
    return [
        [(o.color, [o.box[0] + shift, o.box[1], o.box[2] + shift, o.box[3]]) for o in s.objects]
        for s in scenes
    ]


def test_rendered_scenes_score_as_placed(scenes):
    scores = layout_scores([s.render() for s in scenes], _requests(scenes))
    assert scores["n_objects"] == 12
    assert scores["mean_iou"] > 0.9 and scores["share_iou_gt_0.5"] == 1.0
    assert scores["share_center_in_box"] == 1.0


def _moved_aside(box):
    """The box moved 1.5 of its widths towards the image's far side: no overlap, centre outside."""
    x0, y0, x1, y1 = box
    d = 1.5 * (x1 - x0) * (1 if x0 < 0.5 else -1)
    return [x0 + d, y0, x1 + d, y1]


def test_objects_far_from_their_boxes_miss_on_every_score(scenes):
    moved = [[(c, _moved_aside(b)) for c, b in objs] for objs in _requests(scenes)]
    scores = layout_scores([s.render() for s in scenes], moved)
    assert scores["mean_iou"] == 0.0 and scores["share_iou_gt_0.5"] == 0.0
    assert scores["share_center_in_box"] == 0.0


def test_a_small_object_centred_in_a_large_box_hits_the_centre_but_not_the_iou():
    image = np.full((32, 32, 3), 128, np.uint8)
    image[14:18, 14:18] = (230, 25, 45)  # red, 4x4 px in the middle
    scores = layout_scores([Image.fromarray(image)], [[("red", [0.1, 0.1, 0.9, 0.9])]])
    assert scores["share_center_in_box"] == 1.0
    assert scores["mean_iou"] < 0.1


def test_a_missing_object_counts_as_a_miss_not_a_skip(scenes):
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    scores = layout_scores([scenes[0].render(), blank], _requests(scenes[:2]))
    assert scores["n_objects"] == 2
    assert scores["ious"][1] == 0.0 and scores["share_center_in_box"] == 0.5


def test_bad_input_is_refused_with_what_was_expected(scenes):
    with pytest.raises(ValueError, match="one list per image"):
        layout_scores([scenes[0].render()], _requests(scenes[:2]))
    with pytest.raises(ValueError, match="nothing to score"):
        layout_scores([scenes[0].render()], [[]])
