"""Every command line of the project answers ``--help`` without importing torch or a host library.

The commands are found, not listed: every git-tracked ``.py`` outside ``tests/`` with an
``if __name__ == "__main__":`` block (run as ``python -m <module> --help``, and the benchmarks also by path,
as README shows them) and every ``[project.scripts]`` entry of pyproject.toml (its module). A command added
later is checked without touching this file.

"Fast" is asserted through what was imported, not through a stopwatch: ``python -X importtime`` writes one
line per module imported (``import time: self | cumulative | name``, nested names indented), and none of
them may belong to torch, diffusers, transformers, open_clip or LAVIS (15-30 s of import on CPU). The one
exception is ``open_clip_train.params``: ``clip_ext.train --help`` prints open_clip_train's own flags, and
that module imports only ``argparse`` and ``ast``; any other open_clip_train module counts as heavy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "open_clip", "lavis", "open_clip_train")
LIGHT_EXCEPTIONS = ("open_clip_train", "open_clip_train.params")  # argparse-only: clip_ext.train's help
MAIN_GUARD = 'if __name__ == "__main__":'


def _tracked_python_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line and not line.startswith("tests/")]


def _module(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__main__":
        parts.pop()
    return ".".join(parts)


def _script_modules() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: console-script name -> module."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the section is plain `name = "module:function"` lines
        section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
        scripts = dict(re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', section, flags=re.M))
    else:
        scripts = tomllib.loads(text)["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def _commands() -> list:
    main_files = [p for p in _tracked_python_files() if MAIN_GUARD in (REPO / p).read_text(encoding="utf-8")]
    modules = {_module(p): f"-m {_module(p)}" for p in main_files}
    for name, module in _script_modules().items():
        modules.setdefault(module, f"-m {module} (console script {name})")
    params = [pytest.param(["-m", module], id=label) for module, label in sorted(modules.items())]
    # README runs the benchmarks by path too; a script started by path has its own folder first on sys.path
    params += [
        pytest.param([str(REPO / p)], id=f"path {p}")
        for p in sorted(main_files)
        if p.startswith("benchmarks/")
    ]
    return params


def _heavy_imports(importtime_stderr: str) -> list[str]:
    names = [
        line.split("|")[2].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    ]
    assert names, "python -X importtime wrote no import lines: the check below would pass on nothing"
    return [n for n in names if n.split(".")[0] in HEAVY and n not in LIGHT_EXCEPTIONS]


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_commands_were_found():
    """The discovery itself: the demos, trainers and benchmarks README names are among the commands."""
    ids = {p.id for p in _commands()}
    for module in ("lavis_ext.train", "lavis_ext.demo", "clip_ext.demo", "diffusers_ext.demo", "vlext.demo"):
        assert any(i.startswith(f"-m {module}") for i in ids), (module, sorted(ids))
    assert "-m vlext.toyworld.cli (console script toyworld)" in ids or "-m vlext.toyworld.cli" in ids
    assert "path benchmarks/bench_lavis_fusion.py" in ids


@pytest.mark.parametrize("command", _commands())
def test_help_prints_usage_without_importing_heavy_stacks(command, tmp_path):
    cwd = REPO if command[0] == "-m" else tmp_path
    result = _python(["-X", "importtime", *command, "--help"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.lstrip().startswith("usage:"), result.stdout[:500]
    heavy = _heavy_imports(result.stderr)
    assert heavy == [], f"--help imported {sorted(set(heavy))[:20]}"


@pytest.mark.parametrize("module", ["lavis_ext.demo", "clip_ext.demo"])
def test_demo_refuses_an_unknown_argument(module, tmp_path):
    """A mistyped flag is an error naming it (exit status 2), not an output folder called ``--outt``."""
    result = _python(["-m", module, "--outt", "x"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "unrecognized arguments: --outt x" in result.stderr
    assert f"usage: python -m {module} [-h] [--out OUT] [--quick]" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", sorted(_script_modules()))
def test_installed_console_script_help_prints_usage_without_importing_heavy_stacks(name, tmp_path):
    """``lavis-ext-train --help`` as installed: its wrapper imports the package with sys.argv[0] = the script."""
    script = Path(sys.executable).parent / name
    if not script.is_file():
        pytest.skip(f"console script {name} is not installed next to {sys.executable} (project not synced)")
    result = _python(["-X", "importtime", str(script), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.lstrip().startswith("usage:"), result.stdout[:500]
    heavy = _heavy_imports(result.stderr)
    assert heavy == [], f"{name} --help imported {sorted(set(heavy))[:20]}"
