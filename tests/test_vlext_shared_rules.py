"""The shared rules of vlext, each implemented once: atomic files, the box rule, strict image reading, the
test-hook mechanism and the lazy exports of the three packages."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlext import atomic_files, test_hooks
from vlext.atomic_files import (
    MARKER,
    atomic_write,
    atomic_write_json,
    folder_problem,
    newest_complete,
    publish_folder,
    staging_folder,
    temp_name,
)
from vlext.boxes import BOX_RULE, check_box, satisfies_box_rule
from vlext.images import BadImageError, load_image
from vlext.lazy_exports import lazy_exports

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ atomic files


def test_a_write_that_fails_half_way_leaves_the_old_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})

    def crash(f):
        f.write(b'{"step": 2, "half')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_temporary_name_is_hidden_beside_the_file_and_carries_the_pid(tmp_path):
    assert temp_name(tmp_path / "epoch_3.pt") == tmp_path / f".epoch_3.pt.{os.getpid()}.tmp"


def test_a_published_folder_lists_its_files_and_sizes_and_damage_is_named(tmp_path):
    final = tmp_path / "checkpoint-2"
    staging = staging_folder(final)
    (staging / "weights.bin").write_bytes(b"x" * 10)
    publish_folder(staging, final, marker={"global_step": 2})
    marker = json.loads((final / MARKER).read_text())
    assert marker == {"global_step": 2, "files": {"weights.bin": 10}}
    assert not staging.exists() and folder_problem(final) is None
    (final / "weights.bin").write_bytes(b"x" * 4)
    assert folder_problem(final) == "weights.bin has 4 bytes, 10 were written (truncated or changed)"


def test_newest_complete_skips_an_incomplete_newer_folder_naming_why(tmp_path):
    for step in (1, 2, 3):
        staging = staging_folder(tmp_path / f"checkpoint-{step}")
        (staging / "weights.bin").write_bytes(b"w" * step)
        publish_folder(staging, tmp_path / f"checkpoint-{step}", marker={"global_step": step})
    (tmp_path / "checkpoint-3" / MARKER).unlink()  # a save that never finished
    found, skipped = newest_complete(
        [p for p in tmp_path.iterdir()], folder_problem, key=lambda p: int(p.name.split("-")[1])
    )
    assert found == tmp_path / "checkpoint-2"
    assert skipped == [(tmp_path / "checkpoint-3", f"no {MARKER} (the save did not finish)")]


def test_atomic_files_imports_no_torch():
    code = "import sys, vlext.atomic_files, vlext.test_hooks, vlext.boxes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ boxes


@pytest.mark.parametrize("box", [[0.0, 0.0, 1.0, 1.0], (0.1, 0.2, 0.3, 0.4), [0, 0, 1, 1]])
def test_boxes_inside_the_unit_square_in_xyxy_order_are_accepted(box):
    assert check_box(box, "rows.jsonl:1") == [float(v) for v in box]


@pytest.mark.parametrize(
    "box, problem",
    [
        ([10, 10, 50, 60], r"lies outside \[0, 1\]"),
        ([-0.01, 0.1, 0.5, 0.5], r"lies outside \[0, 1\]"),
        (
            [0.5, 0.1, 0.2, 0.4],
            "has x1 <= x0 or y1 <= y0 \\(empty or flipped; it needs x0 < x1 and y0 < y1\\)",
        ),
        ([0.2, 0.4, 0.3, 0.4], r"has x1 <= x0 or y1 <= y0 \(empty or flipped; .*\)"),
        ([0.1, float("nan"), 0.2, 0.3], r"must be 4 finite numbers x0, y0, x1, y1 \(NaN or inf given\)"),
        ([0.1, 0.2, 0.3], "must be 4 finite numbers x0, y0, x1, y1"),
    ],
)
def test_a_box_breaking_the_rule_is_refused_naming_where_what_and_the_rule(box, problem):
    with pytest.raises(ValueError, match=rf"^rows.jsonl:7: box 2 = .* {problem}; ") as error:
        check_box(box, "rows.jsonl:7", 2)
    assert str(error.value).endswith(BOX_RULE) and "never clamped" in BOX_RULE


def test_the_rule_is_elementwise_on_arrays_and_refuses_nan():
    import numpy as np

    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.5, 0.1, 0.2, 0.4], [np.nan, 0, 1, 1], [0, 0, 1, 1.5]])
    assert satisfies_box_rule(*boxes.T).tolist() == [True, False, False, False]


# ------------------------------------------------------------------------------------------ images


def test_a_truncated_jpeg_raises_the_one_bad_image_error_naming_the_file(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        BadImageError, match=rf"^{path}: not a readable image \(OSError: Truncated File Read\)$"
    ) as error:
        load_image(path)
    assert isinstance(error.value, OSError) and isinstance(error.value, ValueError)


def test_a_whole_image_loads_as_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 6), 100).save(path)
    image = load_image(path)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (8, 6), (100, 100, 100))


# ------------------------------------------------------------------------------------------ test hooks


def test_an_unset_hook_does_nothing_and_an_armed_sleep_runs_for_its_subject_only(monkeypatch):
    monkeypatch.delenv(test_hooks.ENV, raising=False)
    assert not test_hooks.armed("atomic-write:before-rename", "epoch_2.pt")
    slept = []
    monkeypatch.setattr(test_hooks.time, "sleep", slept.append)
    monkeypatch.setenv(test_hooks.ENV, test_hooks.arm("p", "sleep:2.5", "a")[test_hooks.ENV])
    test_hooks.hook("p", "b")
    test_hooks.hook("other", "a")
    test_hooks.hook("p", "a")
    assert slept == [2.5]


def test_a_kill_hook_sigkills_the_process_at_its_point():
    code = "from vlext.test_hooks import hook; hook('here'); print('survived')"
    env = {**os.environ, **test_hooks.arm("here", "kill")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == -9 and out.stdout == ""


def test_a_half_written_hook_stalls_with_half_the_bytes_on_disk(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        test_hooks.time, "sleep", lambda s: seen.append(temp_name(tmp_path / "f.bin").stat().st_size)
    )
    monkeypatch.setenv(test_hooks.ENV, "atomic-write:half-written@f.bin=sleep:1")
    atomic_files.atomic_write_bytes(tmp_path / "f.bin", b"0123456789")
    assert seen == [5] and (tmp_path / "f.bin").read_bytes() == b"0123456789"


def test_a_malformed_hook_entry_is_an_error_saying_what_is_accepted(monkeypatch):
    monkeypatch.setenv(test_hooks.ENV, "p=explode")
    with pytest.raises(ValueError, match=r"expected point\[@subject\]=kill or point\[@subject\]=sleep"):
        test_hooks.hook("p")


# ------------------------------------------------------------------------------------------ lazy exports


def test_lazy_exports_resolve_list_and_refuse_unknown_names():
    getattr_, dir_, all_ = lazy_exports("json", {"JSONDecoder": "json.decoder", "decoder": "json.decoder"})
    import json as module
    import json.decoder

    assert getattr_("JSONDecoder") is json.decoder.JSONDecoder
    assert getattr_("decoder") is json.decoder  # a name equal to its module's last part is the module
    assert all_ == ["JSONDecoder", "decoder"] and {"JSONDecoder", "dumps"} <= set(dir_())
    assert module.JSONDecoder is json.decoder.JSONDecoder
    with pytest.raises(AttributeError, match="module 'json' has no attribute 'nope'"):
        getattr_("nope")


def _type_checking_names(package: str) -> set[str]:
    tree = ast.parse((ROOT / package / "__init__.py").read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
    )
    return {alias.asname or alias.name for node in block.body for alias in node.names}


@pytest.mark.parametrize(
    "package, names",
    [
        (
            "diffusers_ext",
            {"SpatialAdapter", "load_spatial_adapter", "set_spatial_adapter_scale", "unload_spatial_adapter",
             "generate", "encode_phrases", "phrase_dim", "save_gligen_checkpoint", "GatedSelfAttnProcessor"},
        ),
        ("clip_ext", {"MemoryBank", "MemoryBankClipLoss"}),
    ],
)  # fmt: skip
def test_importing_a_package_imports_no_torch_and_every_export_resolves(package, names):
    code = f"import sys, {package} as p; print('torch' in sys.modules, set(dir(p)) >= set(p._EXPORTS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False True"
    module = importlib.import_module(package)
    assert set(module.__all__) >= names and set(module._EXPORTS) == names
    assert all(getattr(module, name).__name__ == name for name in names)
    assert _type_checking_names(package) == names


def test_lavis_ext_declares_every_export_for_editors():
    tree = ast.parse((ROOT / "lavis_ext/__init__.py").read_text())
    exports = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "_EXPORTS")
    assert _type_checking_names("lavis_ext") == {k.value for k in exports.value.keys}
