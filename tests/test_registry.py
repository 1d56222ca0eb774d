"""registry.yaml: every entry resolves through its host framework's own mechanism."""

import importlib
import shlex
import subprocess
import sys

import pytest

from vlext.manifest import KINDS, ManifestError, load_demos, load_registry, repo_root

EXTENSIONS = load_registry()


def tiny_unet():
    from diffusers_ext.testing.tiny_unet import tiny_unet as build

    return build()


def check_lavis(ext, getter: str):
    importlib.import_module(ext.package)  # as a LAVIS user does: `import lavis_ext` before LAVIS
    from lavis.common.registry import registry

    obj = ext.load()
    assert getattr(registry, getter)(ext.registers) is obj


def check_diffusers_processor(ext):
    cls = ext.load()
    unet = tiny_unet()
    ext.load_install()(unet)
    installed = [p for p in unet.attn_processors.values() if isinstance(p, cls)]
    assert installed, f"{ext.install} installed no {cls.__name__} on a tiny UNet2DConditionModel"


def check_diffusers_model(ext):
    from diffusers import ConfigMixin, ModelMixin

    cls = ext.load()
    assert issubclass(cls, ModelMixin) and issubclass(cls, ConfigMixin)


def check_open_clip_configs(ext):
    import open_clip

    ext.load()
    names = [ext.registers] if isinstance(ext.registers, str) else list(ext.registers)
    missing = sorted(set(names) - set(open_clip.list_models()))
    assert not missing, f"open_clip.list_models() lacks {missing} after import {ext.package}"


def check_diffusers_loader(ext):
    """The loader puts a saved adapter onto a tiny pipeline and the unloader takes it off again."""
    import tempfile

    from diffusers_ext import SpatialAdapter
    from diffusers_ext.spatial_adapter import installed_adapter
    from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline

    load = ext.load()
    module = importlib.import_module(ext.import_path.partition(":")[0])
    names = [ext.registers] if isinstance(ext.registers, str) else list(ext.registers)
    assert names[0] == load.__name__, f"registers should start with {load.__name__}"
    pipe = tiny_sd_pipeline()
    with tempfile.TemporaryDirectory() as folder:
        SpatialAdapter.for_unet(pipe.unet, phrase_dim=32).save_pretrained(folder)
        load(pipe, folder)
    assert installed_adapter(pipe.unet) is not None
    getattr(module, names[1])(pipe, 0.5)
    getattr(module, names[2])(pipe)
    assert installed_adapter(pipe.unet) is None


def check_train_flags(ext):
    argv = shlex.split(ext.entry)
    assert argv[:2] == ["python", "-m"], f"entry must be 'python -m <module> ...', got {ext.entry!r}"
    result = subprocess.run(
        [sys.executable, "-m", argv[2], "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo_root(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    missing = [flag for flag in ext.registers if flag not in result.stdout]
    assert not missing, f"`{ext.entry} --help` does not show {missing}"


CHECKS = {
    "lavis_model": lambda ext: check_lavis(ext, "get_model_class"),
    "lavis_builder": lambda ext: check_lavis(ext, "get_builder_class"),
    "lavis_task": lambda ext: check_lavis(ext, "get_task_class"),
    "lavis_runner": lambda ext: check_lavis(ext, "get_runner_class"),
    "lavis_lr_scheduler": lambda ext: check_lavis(ext, "get_lr_scheduler_class"),
    "diffusers_processor": check_diffusers_processor,
    "diffusers_model": check_diffusers_model,
    "diffusers_loader": check_diffusers_loader,
    "open_clip_model_config": check_open_clip_configs,
    "open_clip_train_flags": check_train_flags,
}


def test_every_kind_has_a_check():
    assert set(CHECKS) == set(KINDS)


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda ext: f"{ext.kind}:{ext.name}")
def test_entry_resolves_through_its_host(ext):
    CHECKS[ext.kind](ext)


@pytest.mark.parametrize("ext", EXTENSIONS, ids=lambda ext: ext.name)
def test_default_config_exists(ext):
    if ext.default_config is not None:
        assert ext.default_config_path().is_file(), ext.default_config


def test_demos_point_at_listed_packages():
    demos = load_demos()
    assert [d.package for d in demos] == ["lavis_ext", "diffusers_ext", "clip_ext"]
    for demo in demos:
        assert demo.run.startswith(demo.package + ".")


@pytest.mark.parametrize("package", ["lavis_ext", "diffusers_ext", "clip_ext"])
def test_each_package_imports_without_the_other_two(package):
    others = {
        "lavis_ext": ["diffusers", "open_clip"],
        "diffusers_ext": ["lavis", "open_clip"],
        "clip_ext": ["lavis", "diffusers"],
    }[package]
    code = (
        f"import sys, {package}; bad = [m for m in {others!r} if m in sys.modules]; "
        "print('LOADED', bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def write(tmp_path, text):
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    return path


def test_manifest_rejects_unknown_kind_naming_the_entry(tmp_path):
    path = write(
        tmp_path, "version: 1\nextensions:\n  - {name: x, host: lavis, kind: plugin, package: p, import: p}\n"
    )
    with pytest.raises(ManifestError, match=r"extensions\[0\] \(x\): kind 'plugin' is not one of"):
        load_registry(path)


def test_manifest_rejects_missing_and_unknown_fields(tmp_path):
    path = write(tmp_path, "version: 1\nextensions:\n  - {name: x, host: lavis, kind: lavis_model}\n")
    with pytest.raises(ManifestError, match=r"lacks required field\(s\) \['package', 'import'\]"):
        load_registry(path)
    path = write(
        tmp_path,
        "version: 1\nextensions:\n  - {name: x, host: lavis, kind: lavis_model, package: p, import: p, colour: red}\n",
    )
    with pytest.raises(ManifestError, match=r"unknown field\(s\) \['colour'\]"):
        load_registry(path)


def test_manifest_rejects_duplicates_and_bad_version(tmp_path):
    entry = "  - {name: x, host: lavis, kind: lavis_model, package: p, import: p}\n"
    with pytest.raises(ManifestError, match=r"duplicate extension name\(s\) \['x'\]"):
        load_registry(write(tmp_path, "version: 1\nextensions:\n" + entry + entry))
    with pytest.raises(ManifestError, match="unsupported version 2"):
        load_registry(write(tmp_path, "version: 2\nextensions: []\n"))


def test_import_object_follows_attributes():
    from vlext.manifest import import_object

    assert (
        import_object("vlext.manifest:Extension.load")
        is importlib.import_module("vlext.manifest").Extension.load
    )
