"""The memory plan (benchmarks/bench_diffusers_train_memory.py) counts the published models' real parameters,
adds the trainer's bytes per parameter, and measures activations that checkpointing reduces."""

from __future__ import annotations

import pytest

from benchmarks import bench_diffusers_train_memory as plan


@pytest.mark.parametrize(
    "model, expected",
    [
        # published sizes: SD1.5 UNet 859.52 M, CLIP ViT-L/14 text 123.06 M, SD VAE 83.65 M
        ("sd15", {"unet": 859_520_964, "text_encoders": 123_060_480, "vae": 83_653_863}),
        # SDXL base UNet 2.567 B; text: CLIP ViT-L/14 123.06 M + OpenCLIP bigG/14 with projection 694.66 M
        ("sdxl", {"unet": 2_567_463_684, "text_encoders": 123_060_480 + 694_659_840, "vae": 83_653_863}),
        # Kolors: SDXL's UNet with a 4096 -> 2048 text projection; ChatGLM3-6B 6.24 B
        ("kolors", {"unet": 2_579_458_820, "text_encoders": 6_243_584_000, "vae": 83_653_863}),
    ],
)
def test_parameter_counts_are_the_published_ones(model, expected):
    counts = plan.parameter_counts(plan.MODELS[model])
    assert {k: counts[k] for k in expected} == expected
    # the mid/up subset adapts fewer blocks than all of them
    assert 0 < counts["adapter_subset"] < counts["adapter_all"]


def test_sdxl_adapter_is_the_1_8_billion_parameters_the_issue_names():
    counts = plan.parameter_counts(plan.MODELS["sdxl"])
    assert counts["adapter_all"] == 1_812_443_084 and counts["adapter_subset"] == 1_203_846_556


def test_plan_bytes_follow_the_trainer_precision_and_cache_rules():
    counts = {"unet": 1000, "text_encoders": 300, "vae": 50, "adapter_all": 100, "adapter_subset": 40}
    act = {(layers, ckpt): (10.0, 1.0) for layers in ("all", "subset") for ckpt in (False, True)}
    spec = {"latent": 4}
    rows = {(r["precision"], r["layers"], r["cache"]): r for r in plan.plan_rows("m", spec, counts, act)}
    fp32 = rows[("no", "all", "none")]
    assert (fp32["unet"], fp32["text_encoders"], fp32["vae"]) == (4000, 1200, 200)
    assert (fp32["adapter"], fp32["grads"], fp32["adamw"]) == (
        400,
        400,
        800,
    )  # fp32 adapter, grads, 2 moments
    assert fp32["totals"][(4, False)] == 4000 + 1200 + 200 + 1600 + 10 + 16 * 4
    bf16 = rows[("bf16/fp16", "subset", "cache-dir")]
    assert (bf16["unet"], bf16["text_encoders"], bf16["vae"], bf16["adamw"]) == (2000, 0, 100, 320)
    assert bf16["totals"][(1, True)] == 2000 + 100 + 640 + 0.5 * (10 + 16)  # activations halved
    assert rows[("bf16/fp16", "all", "cache-dir+latents")]["vae"] == 0


def test_measured_activations_grow_with_latent_pixels_and_checkpointing_cuts_them():
    spec = plan.TINY["tiny"]
    small = plan.activation_bytes(spec, None, 8, 1, checkpointing=False)
    large = plan.activation_bytes(spec, None, 16, 1, checkpointing=False)
    checkpointed = plan.activation_bytes(spec, None, 16, 1, checkpointing=True)
    assert small > 0 and large > 2 * small
    assert checkpointed < 0.6 * large


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
    assert "--measure-subset" in run.stdout and "24 / 48 / 80 GB" in run.stdout
    listed = subprocess.run([sys.executable, str(repo / "benchmarks" / "run_all.py"), "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "bench_diffusers_train_memory" in listed.stdout
