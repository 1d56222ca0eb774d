"""The memory plan (benchmarks/bench_diffusers_train_memory.py) is the rehearsal of the trainer's step on the
published-size pipelines (diffusers_ext/training/plan.py): their real parameter counts, the trainer's bytes per
parameter, and each published size rehearsed in under a minute of CPU time."""

from __future__ import annotations

import pytest

from diffusers_ext.training import plan

GiB = 2**30


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "model, expected",
    [
        # published sizes: SD1.5 UNet 859.52 M, CLIP ViT-L/14 text 123.06 M, SD VAE 83.65 M
        ("sd15", {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}),
        # SDXL base UNet 2.567 B; text: CLIP ViT-L/14 123.06 M + OpenCLIP bigG/14 with projection 694.66 M
        (
            "sdxl",
            {
                "unet": 2_567_463_684,
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
                "vae": 83_653_863,
            },
        ),  # fmt: skip
        # Kolors: SDXL's UNet with a 4096 -> 2048 text projection; ChatGLM3-6B 6.24 B
        ("kolors", {"unet": 2_579_458_820, "text_encoder": 6_243_584_000, "vae": 83_653_863}),
    ],
)
def test_the_rehearsed_pipelines_have_the_published_parameter_counts(model, expected, tmp_path):
    pipe = plan.meta_pipeline(model, workdir=tmp_path)
    assert {name: _numel(getattr(pipe, name)) for name in expected} == expected
    # placeholders: the whole pipeline holds one element per tensor on the host
    assert all(p.untyped_storage().nbytes() <= 8 for p in pipe.unet.parameters())


def test_sdxl_adapter_is_the_1_8_billion_parameters_the_issue_names():
    import torch

    from diffusers_ext.spatial_adapter import SpatialAdapter

    pipe = plan.meta_pipeline("sdxl")
    with torch.device("meta"):
        adapter = SpatialAdapter.for_unet(pipe.unet.to("meta"), phrase_dim=2048)
    assert _numel(adapter) == 1_812_443_084


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd15", "sdxl", "kolors"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_each_published_size_rehearses_in_under_a_minute(model, cached):
    """SD1.5 at 512 px, SDXL and Kolors at 1024 px, with and without the cache: under 60 s of CPU time, and
    the frozen UNet (2 bytes a parameter in bf16) is on the device in either case."""
    argv = ["--model", model, "--mixed-precision", "bf16"] + (
        ["--cache-dir", "--cache-latents"] if cached else []
    )
    result = plan.rehearse(plan.parse_args(argv))
    assert result.cpu_seconds < 60, result.cpu_seconds
    unet_bytes = 2 * {"sd15": 859_520_964, "sdxl": 2_567_463_684, "kolors": 2_579_458_820}[model]
    assert result.step["Parameter"] > unet_bytes
    assert (result.cache_pass > 0) == cached


def test_it_starts_by_path_from_another_directory_and_run_all_lists_it(tmp_path):
    """Started by path, fairscale's top-level `benchmarks` package must not shadow ours (see
    tests/test_bench_entry_points.py); `make bench` (benchmarks/run_all.py) finds it by its bench_ name."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = repo / "benchmarks" / "bench_diffusers_train_memory.py"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--grid" in run.stdout and "24 / 48 / 80 GB" in " ".join(run.stdout.split())
    listed = subprocess.run([sys.executable, str(repo / "benchmarks" / "run_all.py"), "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "bench_diffusers_train_memory" in listed.stdout
