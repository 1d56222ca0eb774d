"""The demo's one page: ``<out>/index.html`` from ``<out>/summary.json``, static, with relative links.

Every number on the page is read from summary.json (each demo returns ``tables``: title, columns, rows;
and ``figures``: files relative to its own folder), so the page cannot disagree with the printed results.
It needs no server: open the file in a browser, or copy the whole folder elsewhere.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

__all__ = ["cell_text", "write_index"]

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


def write_index(out: str | os.PathLike, what: dict[str, str] | None = None) -> Path:
    """Write ``<out>/index.html`` from ``<out>/summary.json`` (atomically) and return its path."""
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
        parts.extend(_figure(package, figure) for figure in result.get("figures", []))
    parts.append("</body></html>")
    path = out / "index.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path
