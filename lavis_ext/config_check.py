"""Check and normalise a LAVIS run config before anything is built.

LAVIS merges a project YAML, the model's and the datasets' default YAMLs and ``--options`` with no
validation: a misspelt key (``use_gated_fusoin: True``, ``run.max_epochs=3``) is carried along and never
read, so the run trains something the user did not ask for without a word. :func:`check_keys` refuses every
key that nothing reads, naming the section and the nearest valid key. The valid keys are derived, not listed
here, so they cannot drift from the code that reads them:

- ``model``: the keys of the model class's default YAMLs (``PRETRAINED_MODEL_CONFIG_DICT``), LAVIS's
  generic model keys, and the class's optional ``EXTRA_CONFIG_KEYS``;
- ``run``: every ``run_cfg.<key>`` / ``run_cfg.get("<key>")`` in the source modules of the runner class,
  the task class and the lr scheduler class (LAVIS's and ours), plus the launch keys of LAVIS's
  ``train.py`` and :data:`RUNNER_KEYS` that our runner reads;
- ``datasets.<name>``: the keys of the builder's default YAML (``build_info`` sub-keys too).

:func:`resolve_paths` makes every relative path the user wrote absolute against the working directory:
LAVIS joins ``run.output_dir`` onto the installed ``lavis`` package folder, which puts checkpoints inside
site-packages where the next ``uv sync`` deletes them.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "RUNNER_KEYS",
    "check_evaluation",
    "check_keys",
    "check_run_values",
    "load_user_config",
    "resolve_paths",
]

# Read by LAVIS's Config/train.py flow or by the distributed launch rather than by a runner or task method.
_LAUNCH_KEYS = {
    "task",
    "runner",
    "job_id",
    "seed",
    "device",
    "world_size",
    "dist_url",
    "distributed",
    "gpu",
    "rank",
}
# Read by lavis_ext.runner.SafeRunner (see its docstring) through a local name, which the source scan misses.
RUNNER_KEYS = {
    "optimizer_betas",
    "optimizer_eps",
    "batch_size_train_global",
}  # the last: lavis_ext.batch_plan
# Keys every LAVIS model config may carry (BaseModel.from_pretrained / load_checkpoint_from_config, Config).
_GENERIC_MODEL_KEYS = {"arch", "model_type", "load_finetuned", "load_pretrained", "finetuned", "pretrained"}
_GENERIC_DATASET_KEYS = {"data_type", "build_info", "vis_processor", "text_processor", "type"}
_SECTIONS = ("model", "datasets", "run", "preprocess")
_PREPROCESS_KEYS = {"vis_processor", "text_processor"}
_RUN_CFG_READ = re.compile(r"run_cfg(?:\.get\(\s*[\"'](\w+)[\"']|\.(\w+))")


class ConfigError(ValueError):
    """A config key or value that would be ignored or misread; raised before anything is built."""


def load_user_config(cfg_path: str | Path, options: list[str] | None) -> DictConfig:
    """What the user wrote: the project YAML with ``--options`` merged on top (no defaults)."""
    from lavis.common.config import Config

    dotlist = Config._convert_to_dot_list(None, list(options or []))
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"--options entry {item!r} is not key=value (e.g. run.max_epoch=2)")
    return OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(dotlist))


def _refuse(key: str, section: str, valid: set[str]) -> None:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(
        f"unknown config key '{key}' in section '{section}': nothing reads it. {hint}"
        f"Valid keys: {', '.join(sorted(valid))}"
    )


def _check_section(values: DictConfig, section: str, valid: set[str]) -> None:
    for key in values:
        if key not in valid:
            _refuse(str(key), section, valid)


def _yaml_section(path: str, *keys: str) -> DictConfig:
    node = OmegaConf.load(path)
    for key in keys:
        node = node.get(key) or OmegaConf.create()
    return node


def model_keys(model_cls) -> set[str]:
    """Keys a model config may hold: its default YAMLs' keys, LAVIS's generic ones, ``EXTRA_CONFIG_KEYS``."""
    keys = set(_GENERIC_MODEL_KEYS) | set(getattr(model_cls, "EXTRA_CONFIG_KEYS", ()))
    for path in getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", {}).values():
        keys |= set(_yaml_section(path, "model"))
    return keys


def _keys_read_in_source(*classes) -> set[str]:
    keys = set()
    for cls in classes:
        for klass in inspect.getmro(cls):
            module = inspect.getmodule(klass)
            if module is None or klass is object:
                continue
            try:
                source = inspect.getsource(module)
            except (OSError, TypeError):
                continue
            for match in _RUN_CFG_READ.finditer(source):
                keys.add(match.group(1) or match.group(2))
    keys.discard("get")
    return keys


def run_keys(run: DictConfig) -> set[str]:
    """Keys the run section may hold for this runner, task and lr scheduler."""
    from lavis.common.registry import registry

    from lavis_ext.runner import SafeRunner

    classes = [SafeRunner]
    runner_cls = registry.get_runner_class(run.get("runner", "runner_base"))
    if runner_cls is not None:
        classes.append(runner_cls)
    for getter, name in (
        (registry.get_task_class, run.get("task")),
        (registry.get_lr_scheduler_class, run.get("lr_sched")),
    ):
        cls = getter(name) if name else None
        if cls is not None:
            classes.append(cls)
    return _keys_read_in_source(*classes) | _LAUNCH_KEYS | RUNNER_KEYS


def check_keys(user_cfg: DictConfig) -> None:
    """Refuse any key of the user's YAML / ``--options`` that no model, dataset, run or task reads."""
    import lavis.common.optims  # noqa: F401  (registers LAVIS's lr schedulers, whose sources are scanned)
    from lavis.common.registry import registry

    import lavis_ext.runner  # noqa: F401  (registers runner_safe)

    _check_section(user_cfg, "top level", set(_SECTIONS))
    for section in ("model", "datasets", "run"):
        if not isinstance(user_cfg.get(section), DictConfig):
            raise ConfigError(f"the config has no '{section}' section (a mapping); sections: {_SECTIONS}")

    model = user_cfg.model
    if "arch" not in model:
        raise ConfigError("model.arch is missing (e.g. arch: blip2_cir_align_prompt)")
    model_cls = registry.get_model_class(model.arch)
    if model_cls is None:
        names = sorted(registry.mapping["model_name_mapping"])
        _refuse(str(model.arch), "model.arch (registered models)", set(names))
    _check_section(model, "model", model_keys(model_cls))

    run = user_cfg.run
    lookups = {
        "task": (registry.get_task_class, "task_name_mapping"),
        "lr_sched": (registry.get_lr_scheduler_class, "lr_scheduler_name_mapping"),
        "runner": (registry.get_runner_class, "runner_name_mapping"),
    }
    for key, (getter, mapping) in lookups.items():
        name = run.get(key)
        if name is not None and getter(name) is None:
            _refuse(str(name), f"run.{key} (registered)", set(registry.mapping[mapping]))
    _check_section(run, "run", run_keys(run))

    for name, dataset in user_cfg.datasets.items():
        builder = registry.get_builder_class(name)
        if builder is None:
            _refuse(
                str(name), "datasets (registered builders)", set(registry.mapping["builder_name_mapping"])
            )
        default = _yaml_section(
            builder.default_config_path(type=dataset.get("type", "default")), "datasets", name
        )
        _check_section(dataset, f"datasets.{name}", _GENERIC_DATASET_KEYS | set(default))
        if isinstance(dataset.get("build_info"), DictConfig) and isinstance(
            default.get("build_info"), DictConfig
        ):
            _check_section(dataset.build_info, f"datasets.{name}.build_info", set(default.build_info))

    if "preprocess" in user_cfg:
        _check_section(user_cfg.preprocess, "preprocess", _PREPROCESS_KEYS)


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _absolute(value, cwd: Path):
    if isinstance(value, str) and value and value != "latest" and not _is_url(value):
        return str((cwd / Path(value).expanduser()).resolve())
    return value


def _path_keys(user_cfg: DictConfig) -> list[str]:
    """Dotted keys of the user's config that hold local paths."""
    keys = [f"run.{k}" for k in ("output_dir", "resume_ckpt_path") if k in user_cfg.run]
    keys += [f"model.{k}" for k in ("finetuned", "pretrained") if k in user_cfg.model]

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, DictConfig):
                walk(value, f"{prefix}.{key}")
            elif key in ("root", "storage"):
                keys.append(f"{prefix}.{key}")

    for name, dataset in user_cfg.datasets.items():
        if isinstance(dataset.get("build_info"), DictConfig):
            walk(dataset.build_info, f"datasets.{name}.build_info")
    return keys


def resolve_paths(config: DictConfig, user_cfg: DictConfig, cwd: str | Path) -> dict[str, str]:
    """Make the user's relative paths absolute against ``cwd`` in the merged ``config``; return what changed.

    Only values the user wrote are touched: LAVIS's own dataset YAMLs give ``storage`` paths relative to its
    cache folder on purpose. ``run.resume_ckpt_path: latest`` and URLs stay as they are.
    """
    cwd = Path(cwd)
    if "output_dir" not in user_cfg.run:
        raise ConfigError(
            "run.output_dir is missing: the folder (relative to the working directory) for this run"
        )
    changed = {}
    for key in _path_keys(user_cfg):
        value = OmegaConf.select(config, key)
        if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
            new = [_absolute(v, cwd) for v in value]
        else:
            new = _absolute(value, cwd)
        if new != value:
            OmegaConf.update(config, key, new, merge=False)
            changed[key] = new
    return changed


def check_evaluation(config: DictConfig, user_cfg: DictConfig) -> str | None:
    """For ``run.evaluate: True``: which weights will be evaluated; refuse when it would be the random init.

    A ``model.finetuned`` the user gives is what they want evaluated, so ``load_finetuned`` is switched on
    unless they set it themselves (the ``tiny`` type's YAML has it off, which silently ignored the file).
    Returns a sentence for the log, or None when not evaluating.
    """
    run, model = config.run, config.model
    if user_cfg.model.get("finetuned") and "load_finetuned" not in user_cfg.model:
        model.load_finetuned = True
    if not run.get("evaluate", False):
        return None
    if run.get("resume_ckpt_path"):
        return f"evaluating the weights of run.resume_ckpt_path={run.resume_ckpt_path}"
    key = "finetuned" if model.get("load_finetuned", True) else "pretrained"
    if model.get(key):
        return f"evaluating model.{key}={model[key]}"
    raise ConfigError(
        f"run.evaluate=True would evaluate randomly initialised weights: model type "
        f"'{model.get('model_type')}' has no {key} weights (model.{key} is empty). Give the checkpoint to "
        f"evaluate: run.resume_ckpt_path=<checkpoint>, run.resume_ckpt_path=latest (newest in "
        f"run.output_dir) or model.finetuned=<checkpoint>"
    )


def _number(run: DictConfig, key: str, kind, minimum, strict: bool):
    value = run.get(key)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (strict and number == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(
            f"run.{key} must be a{'n int' if kind is int else ' number'} {bound}, got {value!r}"
        )
    return number


def check_run_values(config: DictConfig, user_cfg: DictConfig) -> None:
    """Refuse run values that would fail late (after the model is built) or train nothing.

    ``run.max_epoch=0`` trained and evaluated nothing and said nothing; ``run.max_epoch=abc`` and
    ``run.batch_size_eval=0`` failed after everything was built; a negative ``run.init_lr`` trained uphill
    (0 is allowed, with a warning: it keeps the loaded weights, which tests use); ``run.output_dir`` naming
    a file ended in a FileExistsError; ``run.resume_ckpt_path`` naming a folder said "does not exist". Paths must be absolute already (:func:`resolve_paths`).
    """
    run = config.run
    _number(run, "max_epoch", int, 0, strict=True)
    for key in ("batch_size_train", "batch_size_eval"):
        if key in run:
            _number(run, key, int, 0, strict=True)
    if (
        "init_lr" in run
        and _number(run, "init_lr", float, 0.0, strict=False) == 0
        and not run.get("evaluate")
    ):
        logging.warning("run.init_lr=0: the optimizer moves no weight; the run trains nothing")
    for key in ("min_lr", "warmup_lr", "weight_decay"):
        if key in run:
            _number(run, key, float, 0.0, strict=False)
    output_dir = Path(str(run.output_dir))
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir={output_dir} is a file; it must be a folder (created if missing)")
    resume = run.get("resume_ckpt_path")
    if resume and resume != "latest" and not _is_url(str(resume)):
        if Path(resume).is_dir():
            raise ConfigError(
                f"run.resume_ckpt_path={resume} is a folder; give a checkpoint file (e.g. "
                f"{Path(resume) / 'checkpoint_last.pth'}) or run.resume_ckpt_path=latest with "
                "run.output_dir=<that folder>"
            )
        if not Path(resume).is_file():
            raise ConfigError(f"run.resume_ckpt_path={resume}: no such file")
    for key in ("finetuned", "pretrained"):
        value = config.model.get(key)
        if key in user_cfg.model and value and not _is_url(str(value)) and not Path(value).is_file():
            raise ConfigError(f"model.{key}={value}: no such checkpoint file")
