"""vlext's results commands (demo, seeds, report) on bad input: a clear usage error before any work, and
nothing an earlier run wrote is replaced or deleted (issue 27)."""

import json

import pytest

from vlext import demo, report, seeds

REPO_README_BLOCKS = """# notes

<!-- vlext.report demo-run -->
old run line
<!-- /vlext.report -->

Prose a user wrote between two blocks.
More prose.

<!-- vlext.report demo lavis_ext -->
old table
"""


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(("main", "argv"), [(demo.main, []), (seeds.main, ["--part", "clip_ext"])])
def test_a_used_out_folder_is_refused_naming_what_is_there_unless_overwrite(main, argv, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "seeds.json").write_text('{"seeds": [0, 1, 2]}')
    (out / "summary.json").write_text("{}")
    err = _usage_error(main, [*argv, "--out", str(out)], capsys)
    assert f"--out {out} already holds results (seeds.json, summary.json)" in err
    assert "pass --overwrite" in err
    assert (out / "seeds.json").read_text() == '{"seeds": [0, 1, 2]}'  # untouched


@pytest.mark.parametrize(("main", "argv"), [(demo.main, []), (seeds.main, ["--part", "clip_ext"])])
def test_an_out_that_is_a_file_or_lies_under_one_is_refused(main, argv, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    err = _usage_error(main, [*argv, "--out", str(a_file)], capsys)
    assert f"--out {a_file} is a file; --out takes a folder" in err
    err = _usage_error(main, [*argv, "--out", str(a_file / "sub")], capsys)
    assert f"lies under {a_file}, which is a file" in err
    assert a_file.read_text() == "keep"


def test_a_negative_first_seed_is_refused_saying_what_is_accepted(capsys):
    err = _usage_error(seeds.main, ["--part", "clip_ext", "--first-seed", "-5"], capsys)
    assert "--first-seed must be >= 0" in err and "got -5" in err


def test_update_on_a_file_missing_a_close_marker_refuses_naming_the_block_and_line_and_keeps_the_prose(
    tmp_path, capsys
):
    page = tmp_path / "notes.md"
    text = REPO_README_BLOCKS.replace("old run line\n<!-- /vlext.report -->\n", "old run line\n", 1)
    text += "<!-- /vlext.report -->\n"
    page.write_text(text)
    err = _usage_error(report.main, ["update", str(page)], capsys)
    assert (
        "line 3: block 'demo-run' has no <!-- /vlext.report --> before the next block opens at line 9" in err
    )
    assert page.read_text() == text  # the prose between the blocks is still there


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (REPO_README_BLOCKS, "line 10: block 'demo lavis_ext' has no <!-- /vlext.report --> (the file ends"),
        ("prose\n<!-- /vlext.report -->\n", "line 2: <!-- /vlext.report --> closes no block"),
        ("<!-- vlext.report demo-run --> text\n<!-- /vlext.report -->\n", "line 1: the opener of block"),
    ],
)
def test_every_unpaired_marker_is_named_with_its_line(text, problem):
    assert any(problem in p for p in report.marker_problems(text)), report.marker_problems(text)
    with pytest.raises(report.MarkerError, match="line"):
        report.update_text(text)


def test_well_paired_blocks_are_updated_and_prose_kept(tmp_path, capsys):
    page = tmp_path / "notes.md"
    text = REPO_README_BLOCKS + "<!-- /vlext.report -->\n\nA block ends with `<!-- /vlext.report -->`.\n"
    page.write_text(text)
    assert report.main(["update", str(page)]) == 0
    new = page.read_text()
    assert "Prose a user wrote between two blocks.\nMore prose.\n" in new
    assert "old table" not in new and "| sprc+gated_fusion |" in new


@pytest.mark.parametrize("command", ["update", "check"])
def test_report_on_a_missing_file_or_a_png_is_a_usage_error(command, tmp_path, capsys):
    err = _usage_error(report.main, [command, str(tmp_path / "missing.md")], capsys)
    assert "missing.md: no such file" in err
    png = tmp_path / "figure.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    err = _usage_error(report.main, [command, str(png)], capsys)
    assert "figure.png: not a UTF-8 text file" in err


def test_report_tables_and_page_on_a_missing_or_wrong_summary_are_usage_errors(tmp_path, capsys):
    err = _usage_error(report.main, ["tables", str(tmp_path / "summary.json")], capsys)
    assert "summary.json: no such file; expected a demo's summary.json" in err
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert "plot.png: not a JSON file" in _usage_error(report.main, ["tables", str(png)], capsys)
    (tmp_path / "other.json").write_text(json.dumps({"seeds": [1]}))
    err = _usage_error(report.main, ["tables", str(tmp_path / "other.json")], capsys)
    assert "other.json: no 'parts' object" in err
    assert "not a folder" in _usage_error(report.main, ["page", str(png)], capsys)
    err = _usage_error(report.main, ["page", str(tmp_path)], capsys)
    assert "summary.json: no such file" in err


def test_report_with_a_missing_results_folder_is_a_usage_error(tmp_path, capsys):
    page = tmp_path / "notes.md"
    page.write_text("no blocks\n")
    err = _usage_error(report.main, ["check", str(page), "--results", str(tmp_path / "nope")], capsys)
    assert "--results" in err and "not a folder" in err
