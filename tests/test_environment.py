"""The locked environment stays as it is: `uv run --frozen` / `uv sync --frozen` install nothing twice.

decord 0.6.0 (which LAVIS imports at import time) is published as `py3-none-manylinux2010_x86_64` but its
`.dist-info/WHEEL` file says `cp36-cp36m`. uv checks an installed distribution against the interpreter by
the tags in that file, so it judged the installed copy incompatible and reinstalled it on every `uv run`;
runs started together then deleted each other's files. pyproject.toml now takes `decord2` (same `decord`
module, consistent tags) and overrides LAVIS's `decord` requirement away. These tests keep the cause from
coming back with any package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.tags import parse_tag, sys_tags

REPO = Path(__file__).resolve().parents[1]


def _wheel_tags(dist: metadata.Distribution) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def test_every_installed_wheel_declares_tags_this_interpreter_accepts():
    """A WHEEL file whose tags the interpreter rejects is what made uv reinstall decord on every call."""
    supported = set(sys_tags())
    checked, bad = 0, []
    for dist in metadata.distributions():
        tags = _wheel_tags(dist)
        if not tags:  # editable installs and non-wheel installs carry no tags
            continue
        checked += 1
        if not any(t in supported for tag in tags for t in parse_tag(tag)):
            bad.append(f"{dist.metadata['Name']}=={dist.version}: WHEEL says {', '.join(tags)}")
    assert checked > 50, f"only {checked} wheels found: not the project environment?"
    assert not bad, (
        "installed wheels whose WHEEL tags this interpreter rejects (uv reinstalls them on every run):\n"
        + "\n".join(bad)
    )


def test_lavis_still_finds_the_decord_module_it_imports():
    """LAVIS's `lavis.datasets.data_utils` imports decord at import time; decord2 provides that module."""
    import decord

    assert int(metadata.version("decord2").split(".")[0]) >= 3
    assert hasattr(decord, "VideoReader") and hasattr(decord.bridge, "set_bridge")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("decord")  # the old wheel must not be installed over the same folder


def _uv() -> str | None:
    return shutil.which("uv") or next((str(p) for p in [REPO / ".tools/bin/uv"] if p.exists()), None)


@pytest.mark.skipif(_uv() is None, reason="uv is not installed (make sync bootstraps it into .tools/)")
@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO / ".venv").resolve(), reason="not running in the project's .venv"
)
def test_uv_sync_frozen_would_change_nothing_in_the_synced_environment():
    """`uv sync --frozen --dry-run` is what `uv run --frozen` does first; on a synced .venv it must be a no-op.

    `--inexact` so that a package a developer added by hand is not reported; any reinstall is.
    """
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    out = subprocess.run(
        [_uv(), "sync", "--frozen", "--inexact", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Would make no changes" in text, text
