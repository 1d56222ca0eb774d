"""Every fenced ```bash / ```sh / ```python block of README.md and docs/*.md runs as written, and every demo
figure they quote equals the committed results.

A reader copies these blocks; a block that fails is a broken promise. Each block is one test, named by its
file and the line of its opening fence. A block directly preceded by ``<!-- skip-test: <reason> -->`` (real weights, real
data, GPUs, or `make demo`/`make test`, which run this suite themselves) is skipped with that reason.

How a block runs, as close to a user as a test can get without copying the repository:
- from a scratch working directory in which every top-level entry of the repository is a symlink, so the
  README's relative paths (``lavis_ext/projects/...``) resolve while everything a block writes there
  (``data/``, ``output/``, ``demo_out/``) lands in the scratch directory, never in the checkout;
- ``/tmp/`` in a block is redirected into that scratch directory, so parallel workers never share files;
- bash blocks under ``bash -euo pipefail`` with the project's ``.venv/bin`` first on PATH (so ``python`` is
  the project's) and ``uv run`` pointed at this project (``UV_PROJECT``); python blocks with the
  project's interpreter (``python -c``, so the working directory is on ``sys.path`` as for a pasted block);
- offline (``HF_HUB_OFFLINE=1`` and friends): README promises that nothing needs the network.
Blocks that train or benchmark are marked slow. A slow command appears in one block only (the others link
to it), so the suite runs each training once.

Demo figures are quoted only inside ``<!-- vlext.report ... -->`` blocks, which ``python -m vlext.report
update`` generates from docs/results/ (the summary.json of a real ``make demo`` and the ``vlext.seeds``
outputs); a test regenerates every such block and requires it to equal what the file says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
SKIP = re.compile(r"^<!--\s*skip-test:\s*(?P<reason>.+?)\s*-->$")
# Folders a block may write into: they are not linked, so writes land in the scratch directory.
OUTPUTS = {"data", "output", "demo_out", "runs", "logs"}
SLOW = ("lavis_ext.train", "clip_ext.train", "train_spatial_adapter", ".demo", "benchmarks", "torchrun")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str  # "bash" or "python"
    code: str
    skip_reason: str | None


def readme_blocks(text: str, name: str = "README.md") -> list[Block]:
    """The runnable fenced blocks of a Markdown text; other fences (```text, ```yaml, ```) are not code to run."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(?P<indent>\s*)(?P<ticks>`{3,})\s*(?P<info>[\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        start, ticks = i, fence["ticks"]
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{name}:{start + 1}: fence {ticks}{fence['info']} is never closed")
        i += 1
        language = LANGUAGES.get(fence["info"].lower())
        if language is None:
            continue
        previous = lines[start - 1].strip() if start > 0 else ""
        skip = SKIP.match(previous)
        blocks.append(Block(start + 1, language, "\n".join(body) + "\n", skip["reason"] if skip else None))
    return blocks


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _all_blocks() -> list[tuple[str, Block]]:
    return [
        (_name(path), block) for path in DOCS for block in readme_blocks(path.read_text("utf-8"), _name(path))
    ]


def _params():
    params = []
    for name, block in _all_blocks():
        marks = [pytest.mark.slow] if any(word in block.code for word in SLOW) else []
        params.append(pytest.param(name, block, id=f"{name}:line{block.line}-{block.language}", marks=marks))
    return params


def _uv() -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    local = REPO / ".tools" / "bin" / "uv"
    return str(local) if local.exists() else None


def _scratch(tmp_path: Path) -> Path:
    """A working directory that looks like the repository root to a block but keeps its writes."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name in OUTPUTS or entry.name in {".git", ".pytest_cache", ".ruff_cache"}:
            continue
        (work / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return work


def _environment(tmp_path: Path) -> dict[str, str]:
    tools = tmp_path / "bin"
    tools.mkdir()
    uv = _uv()
    if uv is not None:
        (tools / "uv").symlink_to(uv)
    venv_bin = REPO / ".venv" / "bin"
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(venv_bin), str(tools), env.get("PATH", "")]),
        VIRTUAL_ENV=str(REPO / ".venv"),
        UV_PROJECT=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        TMPDIR=str(tmp_path),
        MPLBACKEND="Agg",
    )
    env.pop("PYTHONPATH", None)
    return env


def _python() -> str:
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def test_readme_blocks_are_found_and_skips_name_a_reason():
    """The extractor sees README's blocks (a parser that finds none would make every other test vacuous)."""
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len([b for b in blocks if b.language == "bash"]) >= 3
    assert len([b for b in blocks if b.language == "python"]) >= 1
    assert all(b.skip_reason for b in blocks if "make demo" in b.code or "make test" in b.code), (
        "a block calling make demo / make test must be marked <!-- skip-test: ... -->"
    )


def test_extractor_reads_skip_markers_fences_and_line_numbers():
    text = (
        "# t\n"
        "```bash\necho one\n```\n"
        "<!-- skip-test: needs GPUs -->\n"
        "```python\nprint(2)\n```\n"
        "```yaml\na: 1\n```\n"
        "```sh\necho three\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.line, b.language, b.skip_reason) for b in blocks] == [
        (2, "bash", None),
        (6, "python", "needs GPUs"),
        (12, "bash", None),
    ]
    assert blocks[1].code == "print(2)\n"
    with pytest.raises(ValueError, match="README.md:1: fence"):
        readme_blocks("```bash\necho never closed\n")


def test_blocks_in_docs_are_found_and_make_targets_are_skipped():
    blocks = _all_blocks()
    assert {name for name, _ in blocks} >= {
        "README.md",
        "docs/lavis_ext.md",
        "docs/diffusers_ext.md",
        "docs/clip_ext.md",
    }
    assert all(b.skip_reason for _, b in blocks if re.search(r"\bmake (demo|test)\b", b.code))


def test_a_slow_command_runs_in_one_block_only():
    """Blocks that repeat a training belong in one place; the others link to it (the suite stays short)."""
    seen: dict[str, str] = {}
    for name, block in _all_blocks():
        if block.skip_reason:
            continue
        for line in block.code.splitlines():
            command = line.strip().rstrip("\\").strip()
            if any(word in command for word in SLOW) and not command.startswith("#"):
                where = f"{name}:{block.line}"
                assert command not in seen, f"{where} repeats the slow command of {seen[command]}: {command}"
                seen[command] = where
    assert seen  # the check saw the slow blocks


def test_quoted_demo_figures_equal_the_committed_results():
    """Every generated block (demo tables, demo run, seed statistics) equals what vlext.report renders."""
    from vlext.report import BLOCK, update_text

    specs = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        _, changed = update_text(text)
        assert not changed, (
            f"{_name(path)}: blocks {changed} differ from docs/results/; run python -m vlext.report update {_name(path)}"
        )
        specs += [m["spec"] for m in BLOCK.finditer(text)]
    for spec in (
        "demo lavis_ext",
        "demo diffusers_ext",
        "demo clip_ext",
        "seeds lavis_ext",
        "seeds clip_ext",
    ):
        assert spec in specs, f"no document quotes {spec}"
    readme = [m["spec"] for m in BLOCK.finditer(README.read_text(encoding="utf-8"))]
    for spec in ("demo-run", "seeds-headline lavis_ext Avg", "seeds-headline clip_ext i2t R@5"):
        assert spec in readme, f"README.md does not quote {spec}: each comparison is stated over seeds"


def test_the_committed_demo_figures_are_a_full_pinned_run():
    """README's figures are what any x86-64 machine with AVX2 prints: a full make demo, pinned numerics."""
    import json

    from vlext.numerics import PINNED

    summary = json.loads((REPO / "docs" / "results" / "demo_summary.json").read_text(encoding="utf-8"))
    assert summary["quick"] is False and summary["threads"] == 1
    assert summary["numerics"]["pinned"] is True
    assert {k: summary["numerics"]["environment"][k] for k in PINNED} == PINNED
    assert {entry["status"] for entry in summary["parts"].values()} == {"ok"}


def test_the_figure_check_notices_an_edited_number():
    from vlext.report import update_text

    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- vlext.report demo lavis_ext -->")
    row = text.index("| sprc |", start)
    cell = text.index("|", row + len("| sprc |")) - 1  # last character of R@1
    edited = text[:cell] + ("7" if text[cell] != "7" else "8") + text[cell + 1 :]
    assert update_text(text)[1] == [] and update_text(edited)[1] == ["demo lavis_ext"]
    assert update_text(edited)[0] == text  # regenerating restores the committed figure


@pytest.mark.parametrize(("name", "block"), _params())
def test_readme_block_runs(name: str, block: Block, tmp_path: Path):
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    work = _scratch(tmp_path)
    env = _environment(tmp_path)
    if block.language == "bash" and re.search(r"(^|[\s;&|(])uv\s", block.code) and _uv() is None:
        pytest.skip("uv is not installed (make sync bootstraps it into .tools/)")
    code = block.code.replace("/tmp/", f"{tmp_path}/")
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [_python(), "-c", code]
    try:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name}:{block.line}: the {block.language} block ran past {TIMEOUT_S} s\n{error}")
    if result.returncode != 0:
        tail = (result.stdout[-3000:] + "\n" + result.stderr[-6000:]).strip()
        pytest.fail(
            f"{name}:{block.line}: the {block.language} block exited {result.returncode}\n"
            f"--- block ---\n{block.code}--- output (tail) ---\n{tail}",
            pytrace=False,
        )
