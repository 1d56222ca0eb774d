"""The demo's page and the demo figures in the docs, both generated from a demo ``summary.json``.

``write_index(out)`` writes ``<out>/index.html`` from ``<out>/summary.json``, static, with relative links.
Every number on the page is read from summary.json (each demo returns ``tables``: title, columns, rows;
and ``figures``: files relative to its own folder), so the page cannot disagree with the printed results.
It needs no server: open the file in a browser, or copy the whole folder elsewhere.

The figures quoted in README.md and docs/*.md come from committed results in ``docs/results/``: the
``summary.json`` of a full ``make demo`` run (``demo_summary.json``) and ``python -m vlext.seeds`` outputs
(``seeds_<part>.json``). Each quoted table sits between markers naming what it shows::

    <!-- vlext.report demo lavis_ext -->
    ... generated, do not edit ...
    <!-- /vlext.report -->

``python -m vlext.report update README.md docs/*.md`` regenerates every such block from docs/results/;
``python -m vlext.report check ...`` exits 1 naming each block that differs (tests/test_readme.py runs it);
``python -m vlext.report tables demo_out/summary.json`` prints a run's tables as Markdown;
``python -m vlext.report page demo_out`` rewrites a run's index.html. Blocks: ``demo <part>`` (the part's
tables), ``demo-details diffusers_ext`` (the adapter's training curve end points), ``demo-run`` (mode,
threads, numerics and seconds of the run), ``seeds <part>`` (mean and range over seeds) and
``seeds-headline <part> <column>`` (one sentence: the comparison in that column over the seeds). A marker
counts where it starts a line; ``update`` refuses a file whose markers do not pair up, naming the line.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
from pathlib import Path

from vlext.atomic_files import atomic_write_text

__all__ = ["cell_text", "render_block", "seeds_markdown", "update_text", "without_timings", "write_index"]

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
BLOCK = re.compile(
    r"(?P<open><!-- vlext\.report (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /vlext\.report -->)",
    re.S,
)
OPENER = "<!-- vlext.report "
CLOSER = "<!-- /vlext.report -->"
# a marker counts where it starts a line; one quoted in prose (`<!-- /vlext.report -->`) is text
_MARKER = re.compile(r"^[ \t]*<!-- (?P<close>/)?vlext\.report(?P<rest>[^>]*?)-->", re.M)

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { text-align: left; font-weight: bold; padding-bottom: 4px; }
figure { margin: 0.5em 0 1.5em; }
figure img { max-width: 100%; border: 1px solid #eee; }
.status-failed { color: #b00; } .status-missing { color: #a60; }
"""


def cell_text(value) -> str:
    """How a table value is printed on the page (``repr``-exact for floats so a reader can compare)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return format(value, "g") if isinstance(value, float) else str(value)


def without_timings(obj):
    """``obj`` without its timings (keys ``seconds`` or ``*_seconds``): what two runs must agree on."""
    if isinstance(obj, dict):
        return {
            k: without_timings(v) for k, v in obj.items() if not (k == "seconds" or k.endswith("_seconds"))
        }
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def _table(table: dict) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table["columns"])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell_text(v))}</td>" for v in row) + "</tr>"
        for row in table["rows"]
    )
    return (
        f"<table><caption>{html.escape(table['title'])}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _figure(part: str, figure: dict) -> str:
    src = html.escape(f"{part}/{figure['file']}", quote=True)
    caption = html.escape(figure.get("caption", ""))
    return f'<figure><img src="{src}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def _seeds_html(data: dict, part: str) -> str:
    header, rows = seeds_table(data)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    caption = (
        f"The same comparison over seeds {', '.join(map(str, data['seeds']))}, from the committed "
        f"docs/results/seeds_{part}.json ({'quick sizes, ' if data.get('quick') else ''}"
        f"{_numerics_words(data)}); the table above is this run's one seed"
    )
    return (
        f"<table class='seeds'><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def write_index(
    out: str | os.PathLike, what: dict[str, str] | None = None, results: Path | None = RESULTS
) -> Path:
    """Write ``<out>/index.html`` from ``<out>/summary.json`` (atomically) and return its path.

    Beside each part's tables, the committed seed statistics of that part (``results/seeds_<part>.json``,
    when there is one; ``results=None`` leaves them out): a run is one seed, the lead it shows may not hold.
    """
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    if what is None:
        from vlext.manifest import load_demos

        what = {demo.package: demo.what for demo in load_demos()}
    mode = "quick (--quick: smaller numbers, a test of the command)" if summary.get("quick") else "full"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>vl-extensions demo</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>vl-extensions demo</h1>",
        f"<p>Run: {html.escape(mode)}, {summary.get('total_seconds', '?')} s in all. Every number below is "
        "read from <a href='summary.json'>summary.json</a>; each part's own files are in its folder.</p>",
    ]
    for package, entry in summary["parts"].items():
        status = entry["status"]
        seconds = f", {entry['seconds']} s in the demo" if "seconds" in entry else ""
        seconds += f", {entry['wall_seconds']} s with start-up" if "wall_seconds" in entry else ""
        parts.append(f"<h2 id='{html.escape(package)}'>{html.escape(package)}</h2>")
        parts.append(
            f"<p>{html.escape(what.get(package, ''))} "
            f"(<span class='status-{html.escape(status)}'>{html.escape(status)}</span>{seconds})</p>"
        )
        result = entry.get("result") or {}
        parts.extend(_table(table) for table in result.get("tables", []))
        if results is not None and _seeds_file(results, package).is_file():
            parts.append(_seeds_html(_read_seeds(results, package), package))
        parts.extend(_figure(package, figure) for figure in result.get("figures", []))
    parts.append("</body></html>")
    return atomic_write_text(out / "index.html", "\n".join(parts))


def _md_cell(value) -> str:
    return cell_text(value).replace("|", "\\|")


def markdown_table(table: dict) -> list[str]:
    """One demo table (``title``, ``columns``, ``rows``) as Markdown lines: its title, then the table."""
    lines = [f"*{table['title']}*", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in table["columns"]) + " |")
    lines.append("|---" * len(table["columns"]) + "|")
    lines.extend("| " + " | ".join(_md_cell(v) for v in row) + " |" for row in table["rows"])
    return lines


def _part(summary: dict, part: str) -> dict:
    entry = summary["parts"].get(part)
    if entry is None or entry.get("status") != "ok":
        raise ValueError(
            f"the demo summary has no finished part {part!r} (parts: {sorted(summary['parts'])})"
        )
    return entry


def _details(result: dict) -> list[str]:
    """The diffusers demo's training-curve end points, as the part returned them."""
    rows = [
        ("output-layer norm (zero-init): init, first log, last step", "output_layer_norm", "init"),
        ("mean gate tanh(alpha): first log, last step", "gate_mean", None),
        ("adapter-phase loss: first 25, last 25 steps (means)", "adapter_loss", None),
    ]
    lines = ["| adapter training | values |", "|---|---|"]
    for label, key, first in rows:
        values = ([result[f"{key}_{first}"]] if first else []) + [
            result[f"{key}_start"],
            result[f"{key}_end"],
        ]
        lines.append(f"| {label} | " + " -> ".join(format(float(v), ".4g") for v in values) + " |")
    return lines


def _decimals(values) -> int:
    """How many decimals the demo printed (at most 3), so the statistics are shown as precisely."""
    most = 0
    for v in values:
        text = repr(float(v))
        if "e" not in text and "." in text:
            most = max(most, len(text.split(".")[1].rstrip("0")))
    return min(most, 3) or 1


def seeds_table(data: dict) -> tuple[list[str], list[list[str]]]:
    """A ``vlext.seeds`` result as header and rows of text: ``mean (min .. max)`` per cell, then the
    comparison's difference and in how many seeds the treatment came out higher."""
    columns, stats, n = data["columns"], data["stats"], len(data["seeds"])
    numeric = [c for c in columns[1:] if any(c in cells for cells in stats.values())]
    places = {
        c: _decimals(
            row[j] for rows in data["per_seed"].values() for row in rows.values() if row[j] is not None
        )
        for j, c in enumerate(columns[1:])
        if c in numeric
    }

    def cell(s: dict | None, c: str, sign: bool = False) -> str:
        if s is None:
            return ""
        f = f"{{:{'+' if sign else ''}.{places[c]}f}}"
        return f"{f.format(s['mean'])} ({f.format(s['min'])} .. {f.format(s['max'])})"

    header = [f"{columns[0]}, mean (min .. max) over {n} seeds", *numeric]
    rows = [[label, *(cell(cells.get(c), c) for c in numeric)] for label, cells in stats.items()]
    comparison = data.get("comparison")
    if comparison:
        t, c0 = comparison["treatment"], comparison["control"]
        diff, ahead = comparison["difference"], comparison["ahead"]
        rows.append([f"{t} minus {c0}", *(cell(diff.get(c), c, True) for c in numeric)])
        rows.append(
            [f"seeds where {t} is higher", *(f"{ahead[c]} of {n}" if c in ahead else "" for c in numeric)]
        )
    return header, rows


def seeds_markdown(data: dict) -> list[str]:
    """:func:`seeds_table` as Markdown lines."""
    header, rows = seeds_table(data)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _seeds_file(results: Path, part: str) -> Path:
    return results / f"seeds_{part}.json"


def _read_seeds(results: Path, part: str) -> dict:
    path = _seeds_file(results, part)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no seed results; run python -m vlext.seeds --part {part} --seeds 3 and copy its "
            "seeds.json there"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _numerics_words(data: dict) -> str:
    numerics = data.get("numerics")
    if numerics is None:
        return "CPU kernels not pinned, written before vlext.numerics"
    return "CPU kernels pinned to AVX2" if numerics.get("pinned") else "this machine's own CPU kernels"


def seeds_headline(data: dict, column: str) -> str:
    """One sentence: the comparison in ``column`` as mean and range over the seeds, and how often it holds."""
    comparison = data.get("comparison")
    if not comparison or column not in comparison["difference"]:
        raise ValueError(f"seeds_{data['part']}.json has no comparison in column {column!r}")
    d, n = comparison["difference"][column], len(data["seeds"])
    j = data["columns"].index(column) - 1
    places = _decimals(
        row[j] for rows in data["per_seed"].values() for row in rows.values() if row[j] is not None
    )
    f = f"{{:+.{places}f}}"
    return (
        f"{comparison['treatment']} minus {comparison['control']}, {column}: {f.format(d['mean'])} on average "
        f"over seeds {', '.join(map(str, data['seeds']))} (from {f.format(d['min'])} to {f.format(d['max'])}); "
        f"{comparison['treatment']} is higher in {comparison['ahead'][column]} of {n} seeds "
        f"({'quick sizes, ' if data.get('quick') else ''}{_numerics_words(data)})."
    )


def render_block(spec: str, results: Path = RESULTS) -> list[str]:
    """The Markdown lines of one generated block (``demo <part>``, ``demo-details <part>``, ``demo-run``,
    ``seeds <part>``) from the committed results in ``results``."""
    kind, *args = spec.split()
    if kind in ("demo", "demo-details", "demo-run"):
        path = results / "demo_summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no demo results; copy a make demo run's summary.json there")
        summary = json.loads(path.read_text())
        if kind == "demo-run":
            mode = (
                "`make demo` with `--quick` (small numbers)" if summary.get("quick") else "a full `make demo`"
            )
            seconds = ", ".join(
                f"{part} {entry.get('wall_seconds', '?')} s" for part, entry in summary["parts"].items()
            )
            return [
                f"Run: {mode}, {summary.get('threads', '?')} thread(s) per part, {_numerics_words(summary)}, "
                f"{summary.get('total_seconds', '?')} s in all ({seconds}, each with its start-up)."
            ]
        (part,) = args
        result = _part(summary, part)["result"]
        if kind == "demo-details":
            return _details(result)
        lines = []
        for table in result.get("tables", []):
            lines += ([""] if lines else []) + markdown_table(table)
        return lines
    if kind == "seeds":
        (part,) = args
        data = _read_seeds(results, part)
        mode = " (quick sizes)" if data.get("quick") else ""
        return [
            f"*{data['title']}{mode}; `{data['command']}`, seeds {', '.join(map(str, data['seeds']))}, "
            f"{data.get('threads', '?')} thread(s) each*",
            "",
            *seeds_markdown(data),
        ]
    if kind == "seeds-headline":
        part, *column = args
        return [seeds_headline(_read_seeds(results, part), " ".join(column))]
    raise ValueError(
        f"unknown block {spec!r}: expected demo <part>, demo-details <part>, demo-run, seeds <part>, "
        "seeds-headline <part> <column>"
    )


class MarkerError(ValueError):
    """A generated block's markers do not pair up: regenerating would replace prose between two blocks."""


def marker_problems(text: str) -> list[str]:
    """Every unpaired marker of ``text``, as ``line N: ...``; empty when each opener has its own closer.

    The block pattern pairs an opener with the next closer; with one closer missing, that is the closer of
    the following block, and ``update`` replaced the prose between the two and the second opener (issue 27:
    16 lines lost, exit status 0). So the markers are paired line by line first, and any fault is named.
    """
    problems, open_line, open_spec = [], None, ""
    for match in _MARKER.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match["close"]:
            if open_line is None:
                problems.append(f"line {line}: {CLOSER} closes no block (no {OPENER}...--> above it)")
            open_line = None
        else:
            spec = match["rest"].strip()
            if open_line is not None:
                problems.append(
                    f"line {open_line}: block '{open_spec}' has no {CLOSER} before the next block opens "
                    f"at line {line}"
                )
            if not text.startswith("\n", match.end()):
                problems.append(f"line {line}: the opener of block '{spec}' must end its line")
            open_line, open_spec = line, spec
    if open_line is not None:
        problems.append(f"line {open_line}: block '{open_spec}' has no {CLOSER} (the file ends first)")
    return problems


def update_text(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """``text`` with every generated block regenerated; also the specs of the blocks that changed.

    Raises:
        MarkerError: the markers do not pair up (:func:`marker_problems`); nothing is regenerated.
    """
    problems = marker_problems(text)
    if problems:
        raise MarkerError("; ".join(problems))
    changed = []

    def replace(match: re.Match) -> str:
        body = "\n".join(render_block(match["spec"], results)) + "\n"
        if body != match["body"]:
            changed.append(match["spec"])
        return match["open"] + body + match["close"]

    return BLOCK.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("update", "regenerate the marked blocks of these Markdown files from --results"),
        ("check", "exit 1 naming each marked block that differs from --results"),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("files", nargs="+", type=Path)
        command.add_argument("--results", type=Path, default=RESULTS, help="default: %(default)s")
    tables = sub.add_parser("tables", help="print a demo summary's tables as Markdown")
    tables.add_argument("summary", type=Path, nargs="?", default=RESULTS / "demo_summary.json")
    page = sub.add_parser("page", help="rewrite <out>/index.html from <out>/summary.json")
    page.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "tables":
        summary = _read_summary(parser, args.summary)
        for entry in summary["parts"].values():
            for table in (entry.get("result") or {}).get("tables", []):
                print("\n".join(markdown_table(table)) + "\n")
        return 0
    if args.command == "page":
        if not args.out.is_dir():
            parser.error(f"{args.out}: not a folder; page takes a demo's --out folder (with summary.json)")
        _read_summary(parser, args.out / "summary.json")
        print(write_index(args.out))
        return 0
    if not args.results.is_dir():
        parser.error(f"--results {args.results}: not a folder (expected one like {RESULTS})")
    # every file is read, its markers paired and its blocks rendered before any file is written
    new_texts, stale = {}, []
    for path in args.files:
        text = _read_markdown(parser, path)
        try:
            new, changed = update_text(text, args.results)
        except (ValueError, OSError) as error:  # MarkerError, unknown block, missing results
            parser.error(f"{path}: {error}")
        new_texts[path] = new
        stale += [f"{path}: {spec}" for spec in changed]
        if not changed:
            del new_texts[path]
    if args.command == "update":
        for path, new in new_texts.items():
            atomic_write_text(path, new)
    for line in stale:
        print(("updated " if args.command == "update" else "differs from the results: ") + line)
    return 1 if stale and args.command == "check" else 0


def _read_markdown(parser: argparse.ArgumentParser, path: Path) -> str:
    if not path.is_file():
        parser.error(f"{path}: no such file; update and check take Markdown files (README.md docs/*.md)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        parser.error(f"{path}: not a UTF-8 text file; update and check take Markdown files")


def _read_summary(parser: argparse.ArgumentParser, path: Path) -> dict:
    """A demo summary.json, or a usage error naming the file and what is wrong with it."""
    if not path.is_file():
        parser.error(f"{path}: no such file; expected a demo's summary.json (python -m vlext.demo --out DIR)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"{path}: not a JSON file ({error}); expected a demo's summary.json")
    if not isinstance(summary, dict) or not isinstance(summary.get("parts"), dict):
        parser.error(f"{path}: no 'parts' object; expected a demo's summary.json")
    return summary


if __name__ == "__main__":
    sys.exit(main())
