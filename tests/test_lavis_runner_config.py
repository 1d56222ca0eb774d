"""``lavis_ext.train`` checks the config before anything is built: unknown keys, relative paths, evaluation."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (registrations)
from lavis_ext.config_check import ConfigError, check_evaluation, check_keys, resolve_paths, run_keys
from lavis_ext.train import main

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = sorted((ROOT / "lavis_ext" / "projects").glob("*.yaml"))
TINY = ROOT / "lavis_ext" / "projects" / "cirr_tiny.yaml"


def refused(tmp_path, monkeypatch, yaml_text=None, options=()):
    """Run main() from tmp_path; return the ConfigError message and check that no run folder was made."""
    monkeypatch.chdir(tmp_path)
    cfg = TINY
    if yaml_text is not None:
        cfg = tmp_path / "project.yaml"
        cfg.write_text(yaml_text)
    argv = ["--cfg-path", str(cfg), "--options", "run.output_dir=out", *options]
    with pytest.raises(ConfigError) as error:
        main(argv)
    assert not (tmp_path / "out").exists()
    return str(error.value)


@pytest.mark.parametrize("project", PROJECTS, ids=[p.stem for p in PROJECTS])
def test_every_shipped_project_yaml_passes_the_key_check(project):
    check_keys(OmegaConf.load(project))


def test_misspelt_model_key_in_the_yaml_is_refused_with_the_nearest_key(tmp_path, monkeypatch):
    text = TINY.read_text().replace("use_gated_fusion: False", "use_gated_fusoin: True")
    message = refused(tmp_path, monkeypatch, yaml_text=text)
    assert "unknown config key 'use_gated_fusoin' in section 'model'" in message
    assert "did you mean use_gated_fusion?" in message


def test_misspelt_keys_in_options_are_refused(tmp_path, monkeypatch):
    message = refused(tmp_path, monkeypatch, options=["model.use_gated_fusoin=True"])
    assert "'use_gated_fusoin' in section 'model'" in message and "did you mean use_gated_fusion?" in message
    message = refused(tmp_path, monkeypatch, options=["run.max_epochs=3"])
    assert "'max_epochs' in section 'run'" in message and "did you mean max_epoch?" in message


def test_dataset_and_build_info_keys_are_checked_per_builder(tmp_path, monkeypatch):
    message = refused(tmp_path, monkeypatch, options=["datasets.cirr.build_info.rot=data"])
    assert "section 'datasets.cirr.build_info'" in message and "did you mean root?" in message
    message = refused(tmp_path, monkeypatch, options=["datasets.cirr.vis_procesor.train.name=x"])
    assert "section 'datasets.cirr'" in message and "did you mean vis_processor?" in message


def test_unknown_task_and_dataset_names_are_refused(tmp_path, monkeypatch):
    message = refused(tmp_path, monkeypatch, options=["run.task=composed_image_retreival"])
    assert "did you mean composed_image_retrieval?" in message
    text = TINY.read_text().replace("  cirr:\n", "  cir:\n")
    assert "did you mean cirr?" in refused(tmp_path, monkeypatch, yaml_text=text)


def test_run_keys_are_what_the_runner_task_and_scheduler_read():
    keys = run_keys(OmegaConf.load(TINY).run)
    # read by LAVIS's RunnerBase, our task, LAVIS's linear_warmup_cosine_lr, our SafeRunner
    assert {"max_epoch", "init_lr", "warmup_steps", "resume_ckpt_path", "output_dir", "amp"} <= keys
    assert {"rank_chunk", "rank_gallery_chunk", "gallery_fp16", "write_submission"} <= keys
    assert {"optimizer_betas", "optimizer_eps"} <= keys
    assert "max_epochs" not in keys and "use_gated_fusion" not in keys


def test_model_class_extra_config_keys_are_accepted(monkeypatch):
    from lavis.common.registry import registry

    cls = registry.get_model_class("blip2_cir_align_prompt")
    cfg = OmegaConf.load(TINY)
    cfg.model.some_new_key = 1
    with pytest.raises(ConfigError, match="some_new_key"):
        check_keys(cfg)
    monkeypatch.setattr(cls, "EXTRA_CONFIG_KEYS", ("some_new_key",), raising=False)
    check_keys(cfg)


def test_relative_paths_resolve_against_the_working_directory(tmp_path):
    user = OmegaConf.create(
        {
            "model": {"finetuned": "ckpt/best.pth", "pretrained": "https://example.org/w.pth"},
            "datasets": {"cirr": {"build_info": {"root": "data/cirr", "images": {"storage": "imgs"}}}},
            "run": {"output_dir": "runs", "resume_ckpt_path": "latest"},
        }
    )
    merged = OmegaConf.merge(user, {"datasets": {"cirr": {"build_info": {"annotations": {"storage": "x"}}}}})
    changed = resolve_paths(merged, user, tmp_path)
    assert merged.run.output_dir == str(tmp_path / "runs")
    assert merged.model.finetuned == str(tmp_path / "ckpt" / "best.pth")
    assert merged.datasets.cirr.build_info.root == str(tmp_path / "data" / "cirr")
    assert merged.datasets.cirr.build_info.images.storage == str(tmp_path / "imgs")
    # URLs, "latest" and values from LAVIS's own default YAMLs (relative to its cache) stay as they are
    assert merged.model.pretrained == "https://example.org/w.pth"
    assert merged.run.resume_ckpt_path == "latest"
    assert merged.datasets.cirr.build_info.annotations.storage == "x"
    assert set(changed) == {
        "run.output_dir",
        "model.finetuned",
        "datasets.cirr.build_info.root",
        "datasets.cirr.build_info.images.storage",
    }


def test_evaluating_random_weights_is_refused(tmp_path, monkeypatch):
    message = refused(tmp_path, monkeypatch, options=["run.evaluate=True"])
    assert "run.evaluate=True would evaluate randomly initialised weights" in message
    assert "model type 'tiny'" in message and "run.resume_ckpt_path=<checkpoint>" in message


def test_finetuned_given_by_the_user_is_loaded_even_where_the_yaml_turns_it_off():
    config = OmegaConf.create(
        {"model": {"model_type": "tiny", "load_finetuned": False, "finetuned": "/c.pth"}}
    )
    config.run = {"evaluate": True}
    user = OmegaConf.create({"model": {"finetuned": "/c.pth"}, "run": {"evaluate": True}})
    assert check_evaluation(config, user) == "evaluating model.finetuned=/c.pth"
    assert config.model.load_finetuned is True
    # an explicit load_finetuned=False is the user's word
    config.model.load_finetuned = False
    user.model.load_finetuned = False
    with pytest.raises(ConfigError, match="no pretrained weights"):
        check_evaluation(config, user)
