"""Reader for ``registry.yaml``, the one manifest of every extension and how it loads.

Code and tests read this file instead of repeating the list of extensions. Entries are validated on
load, so a typo in the manifest is reported with the entry and field at fault rather than surfacing
as an ``AttributeError`` far away.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = {
    "lavis_model": "a model class in LAVIS's registry (registry.get_model_class)",
    "lavis_builder": "a dataset builder in LAVIS's registry (registry.get_builder_class)",
    "lavis_task": "a task in LAVIS's registry (registry.get_task_class)",
    "lavis_runner": "a runner in LAVIS's registry (registry.get_runner_class), chosen by run.runner",
    "lavis_lr_scheduler": "an lr schedule in LAVIS's registry (registry.get_lr_scheduler_class), run.lr_sched",
    "diffusers_processor": "an attention processor installed with set_attn_processor",
    "diffusers_model": "a diffusers ModelMixin/ConfigMixin class",
    "diffusers_loader": "load_x(pipe, path_or_dict) / set_x_scale / unload_x on a pipeline, as load_ip_adapter",
    "open_clip_model_config": "model configs registered with open_clip.add_model_config",
    "open_clip_train_flags": "extra flags of a wrapped open_clip_train entry point",
}
HOSTS = {"lavis", "diffusers", "open_clip"}
_REQUIRED = ("name", "host", "kind", "package", "import")
_OPTIONAL = ("registers", "install", "default_config", "entry", "description")


class ManifestError(ValueError):
    """registry.yaml is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class Extension:
    """One entry of registry.yaml (``import`` is stored as ``import_path``)."""

    name: str
    host: str
    kind: str
    package: str
    import_path: str
    registers: Any = None
    install: str | None = None
    default_config: str | None = None
    entry: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)

    def load(self) -> Any:
        """Import ``package`` (which performs the host registration) and return the ``import`` object."""
        importlib.import_module(self.package)
        return import_object(self.import_path)

    def load_install(self):
        if self.install is None:
            raise ManifestError(f"extension {self.name!r} has no 'install' callable")
        return import_object(self.install)

    def default_config_path(self, root: Path | None = None) -> Path | None:
        if self.default_config is None:
            return None
        return (root or repo_root()) / self.default_config


def import_object(path: str) -> Any:
    """Import ``"pkg.module:attr.sub"`` (or ``"pkg.module"``) and return the object."""
    module_name, _, attr = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def registry_path() -> Path:
    """registry.yaml at the repository root, or the copy packed into the wheel."""
    candidates = [repo_root() / "registry.yaml", Path(__file__).resolve().parent / "registry.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("registry.yaml not found; looked at " + ", ".join(map(str, candidates)))


def _parse_entry(index: int, raw: Any, source: Path) -> Extension:
    where = f"{source}: extensions[{index}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} must be a mapping, got {type(raw).__name__}")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise ManifestError(f"{where} ({raw.get('name', '?')}) lacks required field(s) {missing}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ManifestError(
            f"{where} ({raw['name']}) has unknown field(s) {unknown}; accepted: {list(_REQUIRED + _OPTIONAL)}"
        )
    if raw["host"] not in HOSTS:
        raise ManifestError(f"{where} ({raw['name']}): host {raw['host']!r} is not one of {sorted(HOSTS)}")
    if raw["kind"] not in KINDS:
        raise ManifestError(f"{where} ({raw['name']}): kind {raw['kind']!r} is not one of {sorted(KINDS)}")
    for key in ("name", "package", "import"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ManifestError(f"{where}: field {key!r} must be a non-empty string")
    return Extension(
        name=raw["name"],
        host=raw["host"],
        kind=raw["kind"],
        package=raw["package"],
        import_path=raw["import"],
        registers=raw.get("registers"),
        install=raw.get("install"),
        default_config=raw.get("default_config"),
        entry=raw.get("entry"),
        description=raw.get("description", ""),
    )


@dataclass(frozen=True)
class Demo:
    """One step of ``make demo``: ``run`` is ``"module:function"`` taking the output folder."""

    package: str
    run: str
    what: str = ""


def _read(path: str | Path | None) -> tuple[Path, dict]:
    source = Path(path) if path is not None else registry_path()
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "extensions" not in data:
        raise ManifestError(f"{source}: expected a mapping with an 'extensions' list")
    if data.get("version") != 1:
        raise ManifestError(f"{source}: unsupported version {data.get('version')!r}; accepted: 1")
    return source, data


def load_demos(path: str | Path | None = None) -> list[Demo]:
    """The ``demos`` section: what ``make demo`` runs, in order."""
    source, data = _read(path)
    demos = []
    for i, raw in enumerate(data.get("demos") or []):
        if not isinstance(raw, dict) or not {"package", "run"} <= set(raw):
            raise ManifestError(
                f"{source}: demos[{i}] must be a mapping with 'package' and 'run' (got {raw!r})"
            )
        if ":" not in raw["run"]:
            raise ManifestError(
                f"{source}: demos[{i}].run must look like 'module:function', got {raw['run']!r}"
            )
        demos.append(Demo(package=raw["package"], run=raw["run"], what=raw.get("what", "")))
    return demos


def load_registry(path: str | Path | None = None) -> list[Extension]:
    """Read and validate registry.yaml; returns its entries in file order."""
    source, data = _read(path)
    entries = data["extensions"] or []
    if not isinstance(entries, list):
        raise ManifestError(f"{source}: 'extensions' must be a list")
    parsed = [_parse_entry(i, raw, source) for i, raw in enumerate(entries)]
    names = [e.name for e in parsed]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"{source}: duplicate extension name(s) {dupes}")
    return parsed


def extensions_for(package: str, path: str | Path | None = None) -> list[Extension]:
    return [e for e in load_registry(path) if e.package == package]
