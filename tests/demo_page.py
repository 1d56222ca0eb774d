"""Reads the demo's index.html back: its image links and its tables, for the page tests."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path


class PageReader(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.seed_tables: list[list[list[str]]] = []  # <table class="seeds">: committed seed statistics
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table":
            (self.seed_tables if attrs.get("class") == "seeds" else self.tables).append([])
            self._current = (self.seed_tables if attrs.get("class") == "seeds" else self.tables)[-1]
        elif tag == "tr":
            self._current.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._current[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def read_page(path: Path) -> PageReader:
    reader = PageReader()
    reader.feed(Path(path).read_text())
    return reader


def check_page_matches_summary(out: Path, summary: dict) -> int:
    """Every image and link on the page exists under ``out``; every table equals its summary.json table.

    Returns the number of numeric cells compared (so a caller can require that there were some).
    """
    page = read_page(out / "index.html")
    for src in page.images + page.links:
        assert not Path(src).is_absolute() and (out / src).is_file(), (
            f"page links {src}, which is not in {out}"
        )
    expected = [
        table
        for entry in summary["parts"].values()
        for table in (entry.get("result") or {}).get("tables", [])
    ]
    assert len(page.tables) == len(expected)
    compared = 0
    for shown, table in zip(page.tables, expected, strict=True):
        assert shown[0] == [str(c) for c in table["columns"]]
        assert len(shown) - 1 == len(table["rows"])
        for shown_row, row in zip(shown[1:], table["rows"], strict=True):
            for text, value in zip(shown_row, row, strict=True):
                if isinstance(value, float | int) and not isinstance(value, bool):
                    assert float(text) == value, (table["title"], text, value)
                    compared += 1
                else:
                    assert text == ("" if value is None else str(value))
    return compared
