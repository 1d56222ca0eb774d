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
