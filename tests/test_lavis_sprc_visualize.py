"""``lavis_ext.visualize`` on toy CIRR with the tiny model: a PNG per query, the true target framed
exactly where it is in the top-k, and the fusion gate map when gated fusion is on."""

import json

import pytest
from lavis_helpers import ROOT
from lavis_inprocess import run_main

TINY = ROOT / "lavis_ext" / "projects" / "cirr_tiny.yaml"


def test_help_lists_the_options_and_bad_counts_are_refused(capsys):
    from lavis_ext.visualize import parse_args

    with pytest.raises(SystemExit) as ok:
        parse_args(["--help"])
    assert ok.value.code == 0 and "--topk" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        parse_args(["--cfg-path", "x.yaml", "--out", "o", "--topk", "0"])
    assert bad.value.code == 2 and "--topk must be a positive integer, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_cirr(tmp_path_factory):
    from vlext.toyworld import write_cirr

    return write_cirr(tmp_path_factory.mktemp("viz") / "cirr_dataset", 8, 12, 2, seed=0, image_size=32)


def visualize(toy_cirr, out, *options, n=4, topk=5):
    """``python -m lavis_ext.visualize`` with these arguments, called in this process (the README runs the
    command itself); returns the rankings.json it wrote."""
    from lavis_ext.visualize import main

    argv = ["--cfg-path", TINY, "--out", out, "--n", n, "--topk", topk, "--random-weights", "--options"]
    run_main(main, [*argv, f"datasets.cirr.build_info.root={toy_cirr}", *options])
    return json.loads((out / "rankings.json").read_text())


@pytest.mark.slow
def test_pngs_written_and_target_framed_where_it_ranks(toy_cirr, tmp_path):
    from PIL import Image

    records = visualize(
        toy_cirr, tmp_path / "viz", topk=35
    )  # 36 images in the val gallery, reference excluded
    assert len(records) == 4
    for record in records:
        with Image.open(tmp_path / "viz" / record["png"]) as png:
            assert png.width > png.height > 100
        assert len(record["topk"]) == 35 and record["reference"] not in record["topk"]
        assert record["scores"] == sorted(record["scores"], reverse=True)
        assert (
            record["topk"][record["target_rank"] - 1] == record["target"]
        )  # all 35 shown: target among them
        assert "gate_grid" not in record


@pytest.mark.slow
def test_frame_marks_exactly_the_target(tmp_path):
    import matplotlib.colors as mcolors
    from PIL import Image

    from lavis_ext.visualize import TARGET_FRAME, render_query

    paths = {}
    for i, colour in enumerate(["red", "blue", "green", "gray"]):
        paths[f"img{i}"] = tmp_path / f"img{i}.png"
        Image.new("RGB", (32, 32), colour).save(paths[f"img{i}"])
    record = {
        "reference": "img0",
        "caption": "x",
        "target": "img2",
        "target_rank": 2,
        "topk": ["img1", "img2", "img3"],
        "scores": [0.9, 0.8, 0.7],
    }
    fig = render_query(record, paths, tmp_path / "q.png")
    frame = mcolors.to_rgba(TARGET_FRAME)
    framed = [i for i, ax in enumerate(fig.axes) if ax.spines["top"].get_edgecolor() == frame]
    assert framed == [2]  # axes 0 is the reference, axes 2 the second-ranked image, the target


@pytest.mark.slow
def test_gate_map_is_drawn_with_gated_fusion_on(toy_cirr, tmp_path):
    records = visualize(toy_cirr, tmp_path / "viz", "model.use_gated_fusion=True", n=2, topk=3)
    for record in records:
        grid = record["gate_grid"]
        assert len(grid) == len(grid[0]) == 4  # 32 px images, 8 px patches
        assert all(0.0 < g < 1.0 for row in grid for g in row)  # a sigmoid gate
