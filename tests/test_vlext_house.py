"""One house (issue 27): one atomic writer for every file the project writes, and no import circle in vlext."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlext", "lavis_ext", "diffusers_ext", "clip_ext", "benchmarks")
WRITER = REPO / "vlext" / "atomic_files.py"


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


def _renames(path: Path, text: str | None = None) -> list[str]:
    """``os.replace`` / ``os.rename`` calls and ``<path>.replace(<one arg>)`` / ``.rename(...)`` calls."""
    found = []
    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        if isinstance(owner, ast.Name) and owner.id == "os" and name in ("replace", "rename"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: os.{name}")
        elif name == "rename" or (name == "replace" and len(node.args) == 1 and not node.keywords):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{name}()")
    return found


def test_the_rename_finder_finds_what_the_old_code_wrote():
    old = "import os\nos.replace(tmp, path)\ntmp.replace(path)\ntext.replace('a', 'b')\nstaging.rename(folder)\n"
    assert _renames(WRITER, old) == [
        "vlext/atomic_files.py:2: os.replace",
        "vlext/atomic_files.py:3: .replace()",
        "vlext/atomic_files.py:5: .rename()",
    ]


def test_vlext_renames_files_only_in_atomic_files():
    found = [line for p in _sources("vlext") if p != WRITER for line in _renames(p)]
    assert found == [], "write through vlext.atomic_files instead: " + "; ".join(found)


def test_no_extension_renames_a_file_itself():
    """Every package writes through vlext.atomic_files."""
    found = [line for p in _sources(*PACKAGES[1:]) for line in _renames(p)]
    assert found == [], "write through vlext.atomic_files instead: " + "; ".join(found)


# files written in place on purpose, with the reason: each writes into a folder that is published whole
# (vlext.atomic_files.publish_folder) or generates data a run regenerates from its seed
IN_PLACE = {
    "lavis_ext/visualize.py": "writes into a staging folder published with publish_folder",
    "lavis_ext/tiny.py": "writes into a staging folder published with publish_folder_once",
    "vlext/toyworld": "toy dataset writers: every demo and test regenerates its data from the seed",
    "benchmarks/bench_diffusers_input_pipeline.py": "a temporary rows file inside the benchmark's tempdir",
    "benchmarks/bench_lavis_ranking.py": "writes to /proc/self/clear_refs (resets the RSS high-water mark)",
}


def _direct_writes(path: Path, text: str | None = None) -> list[str]:
    """Results written in place: ``.write_text`` / ``.write_bytes``, ``.savefig(<not a file object>)``,
    ``<image>.save(<path>)`` with one positional argument, ``open(..., "w"/"wb")``."""
    found = []
    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("write_text", "write_bytes"):
            found.append(f"{where}: .{func.attr}()")
        elif isinstance(func, ast.Attribute) and func.attr in ("savefig", "save") and node.args:
            target = node.args[0]
            to_file_object = isinstance(target, ast.Name) and target.id in ("f", "buf", "buffer", "handle")
            if func.attr == "savefig" and not to_file_object:
                found.append(f"{where}: .savefig()")
            elif func.attr == "save" and not to_file_object and len(node.args) == 1 and not node.keywords:
                found.append(f"{where}: .save()")
        elif isinstance(func, ast.Name) and func.id == "open" and len(node.args) >= 2:
            mode = node.args[1]
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "w" in mode.value:
                found.append(f"{where}: open(..., {mode.value!r})")
    return found


def test_the_direct_write_finder_finds_what_the_demos_wrote():
    old = (
        "path.write_text(json.dumps(x))\nfig.savefig(path, dpi=100)\ncanvas.save(path)\n"
        "fig.savefig(f, format='png')\ncanvas.save(buf, format='PNG')\nopen(p, 'w')\nopen(p)\n"
    )
    assert _direct_writes(WRITER, old) == [
        "vlext/atomic_files.py:1: .write_text()",
        "vlext/atomic_files.py:2: .savefig()",
        "vlext/atomic_files.py:3: .save()",
        "vlext/atomic_files.py:6: open(..., 'w')",
    ]


def test_every_result_file_is_written_through_vlext_atomic_files():
    """A demo's JSON or figure written in place is half a file after a crash, and the page reads it."""
    found = [
        line
        for p in _sources(*PACKAGES)
        if p != WRITER and not any(str(p.relative_to(REPO)).startswith(prefix) for prefix in IN_PLACE)
        for line in _direct_writes(p)
    ]
    assert found == [], (
        "write through vlext.atomic_files (atomic_write_json, atomic_save_figure, ...): " + "; ".join(found)
    )


def _vlext_imports(path: Path) -> set[str]:
    """The vlext modules ``path`` imports anywhere (module level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("vlext.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlext"):
            if node.module == "vlext":
                names |= {f"vlext.{a.name}" for a in node.names}
            else:
                names.add(node.module)
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_vlext_has_no_import_circle():
    graph = {_module(p): _vlext_imports(p) for p in _sources("vlext")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module) :], module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])
    assert graph["vlext.seeds"] >= {"vlext.parts", "vlext.report"}
    assert "vlext.seeds" not in graph["vlext.report"] and "vlext.demo" not in graph["vlext.seeds"]


@pytest.mark.parametrize("module", ["vlext.demo", "vlext.report", "vlext.seeds", "vlext.parts"])
def test_each_results_module_imports_alone_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
