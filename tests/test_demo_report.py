"""The demo page shows exactly summary.json's tables and links only files that exist, relatively."""

import json

import pytest
from demo_page import check_page_matches_summary, read_page
from PIL import Image

from vlext.report import write_index

SUMMARY = {
    "quick": True,
    "total_seconds": 12.5,
    "parts": {
        "alpha": {
            "status": "ok",
            "seconds": 3.2,
            "result": {
                "tables": [
                    {
                        "title": "recall <%> & more",
                        "columns": ["run", "R@1", "loss"],
                        "rows": [["with bank", 12.5, 0.855], ["random", 1.6, None]],
                    }
                ],
                "figures": [{"file": "curves.png", "caption": "loss"}],
            },
        },
        "beta": {"status": "failed", "seconds": 1.0},
    },
}


@pytest.fixture
def out(tmp_path):
    (tmp_path / "alpha").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "alpha" / "curves.png")
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    return tmp_path


SEEDS = {
    "part": "alpha",
    "seeds": [0, 1, 2],
    "columns": ["run", "R@1", "loss"],
    "per_seed": {
        str(s): {"with bank": [10.0 + 5 * s, 0.5], "no bank": [15.0, 0.25 * (s + 1)]} for s in range(3)
    },
    "stats": {
        "with bank": {
            "R@1": {"mean": 15.0, "min": 10.0, "max": 20.0},
            "loss": {"mean": 0.5, "min": 0.5, "max": 0.5},
        },
        "no bank": {
            "R@1": {"mean": 15.0, "min": 15.0, "max": 15.0},
            "loss": {"mean": 0.5, "min": 0.25, "max": 0.75},
        },
    },
    "comparison": {
        "treatment": "with bank",
        "control": "no bank",
        "difference": {
            "R@1": {"mean": 0.0, "min": -5.0, "max": 5.0},
            "loss": {"mean": 0.0, "min": -0.25, "max": 0.25},
        },
        "ahead": {"R@1": 1, "loss": 1},
    },
    "quick": False,
    "numerics": {"pinned": True, "environment": {}},
}


def test_the_page_shows_the_committed_seed_range_beside_the_runs_own_table(out, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    (results / "seeds_alpha.json").write_text(json.dumps(SEEDS))
    page = read_page(write_index(out, what={}, results=results))
    assert check_page_matches_summary(out, SUMMARY) == 3  # the run's own tables are unchanged
    (seeds,) = page.seed_tables
    assert seeds[0] == ["run, mean (min .. max) over 3 seeds", "R@1", "loss"]
    assert seeds[1] == ["with bank", "15.0 (10.0 .. 20.0)", "0.50 (0.50 .. 0.50)"]
    assert seeds[3] == ["with bank minus no bank", "+0.0 (-5.0 .. +5.0)", "+0.00 (-0.25 .. +0.25)"]
    assert seeds[4] == ["seeds where with bank is higher", "1 of 3", "1 of 3"]
    text = (out / "index.html").read_text()
    assert (
        "over seeds 0, 1, 2, from the committed docs/results/seeds_alpha.json (CPU kernels pinned to AVX2)"
        in text
    )


def test_seeds_headline_states_the_comparison_as_mean_range_and_count():
    from vlext.report import seeds_headline

    assert seeds_headline(SEEDS, "R@1") == (
        "with bank minus no bank, R@1: +0.0 on average over seeds 0, 1, 2 (from -5.0 to +5.0); "
        "with bank is higher in 1 of 3 seeds (CPU kernels pinned to AVX2)."
    )
    with pytest.raises(ValueError, match="no comparison in column 'R@5'"):
        seeds_headline(SEEDS, "R@5")


def test_page_tables_equal_the_summary_and_images_resolve_relative_to_the_page(out):
    page = write_index(out, what={"alpha": "first demo", "beta": "second demo"})
    assert page == out / "index.html"
    assert check_page_matches_summary(out, SUMMARY) == 3  # 12.5, 0.855, 1.6
    reader = read_page(page)
    assert reader.images == ["alpha/curves.png"]
    assert reader.tables[0][1] == ["with bank", "12.5", "0.855"]
    assert "recall &lt;%&gt; &amp; more" in page.read_text()  # titles are escaped, not interpreted
    assert "failed" in page.read_text()


def test_page_check_notices_a_number_that_differs_from_the_summary(out):
    write_index(out, what={})
    changed = json.loads(json.dumps(SUMMARY))
    changed["parts"]["alpha"]["result"]["tables"][0]["rows"][0][1] = 13.0
    with pytest.raises(AssertionError):
        check_page_matches_summary(out, changed)


def test_page_check_notices_a_missing_image(out):
    write_index(out, what={})
    (out / "alpha" / "curves.png").unlink()
    with pytest.raises(AssertionError, match="curves.png"):
        check_page_matches_summary(out, SUMMARY)


def test_without_timings_drops_every_seconds_key_and_nothing_else():
    from vlext.report import without_timings

    summary = {
        "total_seconds": 9.0,
        "parts": {"a": {"seconds": 1, "wall_seconds": 2, "result": {"x": [1.5]}}},
    }
    assert without_timings(summary) == {"parts": {"a": {"result": {"x": [1.5]}}}}


def test_markdown_table_prints_the_summary_cells_as_the_page_does():
    from vlext.report import markdown_table

    table = SUMMARY["parts"]["alpha"]["result"]["tables"][0]
    assert markdown_table(table) == [
        "*recall <%> & more*",
        "",
        "| run | R@1 | loss |",
        "|---|---|---|",
        "| with bank | 12.5 | 0.855 |",
        "| random | 1.6 |  |",
    ]
