"""The trainer rehearses its flags before it loads weights (issue 26): on a GPU a run that will not fit is
refused with the flags that would fit (8-bit Adam's runs too); --no-memory-check lets it go on. The GPU is faked: the visible card's size is patched."""

import pytest

from diffusers_ext.training import plan
from diffusers_ext.training.train_spatial_adapter import check_memory_before_loading, parse_args


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("preflight") / "sd")


def _args(folder, *extra):
    return parse_args(
        [
            "--mixed-data",
            "x.jsonl",
            "--pretrained-model",
            str(folder),
            "--output-dir",
            "o",
            "--batch-size",
            "4",
            *extra,
        ]
    )


@pytest.fixture
def small_gpu(monkeypatch):
    monkeypatch.setattr(plan, "visible_gpu_gib", lambda: 1e-4)  # 100 KiB: the tiny step does not fit


def test_a_run_that_will_not_fit_the_visible_gpu_is_refused_before_loading(tiny_folder, small_gpu):
    said = []
    with pytest.raises(SystemExit) as e:
        check_memory_before_loading(_args(tiny_folder), said.append)
    assert "does NOT fit" in str(e.value) and "--no-memory-check trains anyway" in str(e.value)
    assert said and said[0].startswith("verdict: does NOT fit on ")


def test_no_memory_check_goes_on_and_8_bit_adam_is_judged_too(tiny_folder, small_gpu):
    said = []
    check_memory_before_loading(_args(tiny_folder, "--no-memory-check"), said.append)
    assert said == []
    with pytest.raises(SystemExit, match="--no-memory-check trains anyway"):
        check_memory_before_loading(_args(tiny_folder, "--use-8bit-adam"), said.append)
    assert said[0].startswith("verdict: does NOT fit")


def test_without_a_gpu_nothing_is_rehearsed(tiny_folder, monkeypatch):
    monkeypatch.setattr(plan, "visible_gpu_gib", lambda: None)
    monkeypatch.setattr(plan, "rehearse", lambda opts: pytest.fail("rehearsed without a GPU"))
    check_memory_before_loading(_args(tiny_folder), pytest.fail)


def test_the_preflight_rehearses_the_bf16_adapter_it_was_given(tiny_folder, monkeypatch):
    seen = []
    monkeypatch.setattr(plan, "rehearse", lambda opts: seen.append(opts.trainer_flags) or pytest.skip("seen"))
    with pytest.raises(pytest.skip.Exception):
        plan.preflight(_args(tiny_folder, "--bf16-adapter", "--mixed-precision", "bf16"), gpu_gib=24)
    assert seen and "--bf16-adapter" in seen[0]
