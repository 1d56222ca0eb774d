"""The meta-device rehearsal (diffusers_ext/training/plan.py) runs the trainer's own steps: it names a
component the placement left on the host, counts the trainer's bytes per parameter, keeps attention linear in
tokens, casts as autocast does and proposes the levers that make a run fit."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from diffusers_ext.training import plan

GiB = 2**30


@pytest.fixture(scope="module")
def tiny_sd():
    from diffusers_ext.testing.tiny_pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline()


def _opts(**changes) -> argparse.Namespace:
    return plan._with(plan.parse_args(["--model", "sd15"]), **changes)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_a_component_the_placement_leaves_on_the_host_is_named(tiny_sd, monkeypatch):
    """PyTorch's meta/cpu mismatch in the first op that meets the forgotten VAE becomes a message naming it."""
    from diffusers_ext.training import placement

    original = placement.place_for_training

    def forgets_the_vae(pipe, table, **kwargs):
        vae, pipe.vae = pipe.vae, None
        try:
            original(pipe, table, **kwargs)
        finally:
            pipe.vae = vae

    monkeypatch.setattr(placement, "place_for_training", forgets_the_vae)
    monkeypatch.setattr(placement, "check_placement", lambda *a, **k: None)
    with pytest.raises(
        plan.LeftOnHost,
        match=r"rehearsal: vae left on the host while the step runs on the device .*PyTorch said: ",
    ):
        plan.rehearse(_opts(), pipeline=plan.meta_copy(tiny_sd))


def test_bytes_per_parameter_are_the_trainers(tiny_sd):
    """bf16: frozen UNet, VAE and text encoder at 2 bytes a parameter, the fp32 adapter at 4, AdamW's two
    fp32 moments at 8 a trainable parameter, the EMA copy at 4; with --cache-dir --cache-latents no encoder is
    on the device during the step."""
    from diffusers_ext.spatial_adapter import SpatialAdapter

    adapter = _numel(SpatialAdapter.for_unet(tiny_sd.unet, phrase_dim=32))
    frozen = {name: _numel(getattr(tiny_sd, name)) for name in ("unet", "vae", "text_encoder")}
    full = plan.rehearse(_opts(), pipeline=plan.meta_copy(tiny_sd))
    assert full.step["Parameter"] == 2 * sum(frozen.values()) + 4 * adapter
    # at the tiny size the peak falls in the optimizer step: AdamW's moments plus its foreach temporaries
    assert 8 * adapter <= full.step["Optstate"] < 12 * adapter
    cached = plan.rehearse(
        _opts(cache_dir=True, cache_latents=True, ema=True), pipeline=plan.meta_copy(tiny_sd)
    )
    assert cached.step["Parameter"] == 2 * frozen["unet"] + 4 * adapter
    assert cached.step["EMA"] == 4 * adapter
    assert cached.cache_pass > 0  # the encoders ran on the device, one kind at a time


def test_attention_memory_is_linear_in_tokens_as_on_the_gpu():
    """Meta's SDPA takes the math path, which would hold the (tokens x tokens) scores; the rehearsal routes it
    to memory-efficient attention: twice the tokens, twice the saved bytes (the math path: about 4 x)."""

    def saved(tokens: int, routed: bool) -> int:
        q = torch.randn(1, 8, tokens, 64, device="meta", requires_grad=True)
        tracker = plan._tracker()
        with plan._MetaDevice() if routed else plan.contextlib.nullcontext(), tracker:
            out = F.scaled_dot_product_attention(q, q, q)
            peak = plan._device_bytes(tracker.get_tracker_snapshot("peak"))["Total"]
            del out
        return peak

    routed = saved(8192, True) / saved(4096, True)
    math = saved(8192, False) / saved(4096, False)
    assert 1.9 < routed < 2.1
    assert math > 3.5


def test_emulated_autocast_casts_as_cpu_autocast_does():
    """Differential: the same ops under torch.autocast('cpu', bf16) and under the emulation give the same dtypes."""
    x, w = torch.randn(2, 8, 4, 4), torch.randn(8, 8, 3, 3)
    lin, vec = torch.randn(3, 8), torch.randn(2, 8)
    ops = {
        "conv2d": lambda: F.conv2d(x, w, padding=1),
        "linear": lambda: F.linear(vec, lin),
        "group_norm": lambda: F.group_norm(x.bfloat16(), 2),
        "layer_norm": lambda: F.layer_norm(x.bfloat16(), (4,)),
        "mse_loss": lambda: F.mse_loss(x.bfloat16(), x.bfloat16()),
        "matmul": lambda: x @ x,
        "silu": lambda: F.silu(x),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = {name: op().dtype for name, op in ops.items()}
    with plan._emulated_autocast(torch.bfloat16, "cpu"):
        emulated = {name: op().dtype for name, op in ops.items()}
    assert emulated == real
    # CUDA's lists keep norms and the loss in fp32
    with plan._emulated_autocast(torch.bfloat16, "cuda"):
        assert F.group_norm(x.bfloat16(), 2).dtype == torch.float32
        assert F.linear(vec, lin).dtype == torch.bfloat16


def test_advice_adds_the_levers_in_order_until_the_run_fits():
    """Each lever is one entry of LEVERS; the first combination that fits is returned."""
    tried = []

    def fake_rehearse(opts):
        tried.append(plan.user_flags(opts))
        fits = opts.gradient_checkpointing and opts.batch_size == 1
        return plan.Rehearsal(flags=[], step={}, cache_pass=0, peak=(1 if fits else 100) * GiB, seconds=0.0)

    fix, found = plan.advise(_opts(batch_size=4), gpu_gib=10, rehearse_fn=fake_rehearse)
    assert plan.user_flags(fix) == (
        "--mixed-precision bf16 --batch-size 1 --gradient-accumulation-steps 4 --gradient-checkpointing "
        "--cache-dir DIR --cache-latents"
    )
    assert tried == [
        "--mixed-precision bf16 --batch-size 4 --cache-dir DIR",
        "--mixed-precision bf16 --batch-size 4 --cache-dir DIR --cache-latents",
        "--mixed-precision bf16 --batch-size 4 --gradient-checkpointing --cache-dir DIR --cache-latents",
        "--mixed-precision bf16 --batch-size 2 --gradient-accumulation-steps 2 --gradient-checkpointing "
        "--cache-dir DIR --cache-latents",
        "--mixed-precision bf16 --batch-size 1 --gradient-accumulation-steps 4 --gradient-checkpointing "
        "--cache-dir DIR --cache-latents",
    ]
    assert found.peak == GiB


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cache-latents"], "--cache-latents needs --cache-dir"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--gpu-memory", "nan"], "--gpu-memory must be > 0 GiB, got nan"),
        (["--headroom", "1.5"], "--headroom must be in (0, 1], got 1.5"),
    ],
)
def test_bad_options_are_refused_before_anything_is_built(argv, message, capsys):
    with pytest.raises(SystemExit):
        plan.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_pipeline_folder_is_rehearsed_from_its_configs_and_preflight_judges_it(tmp_path):
    """--pretrained-model: the folder's configs on the meta device (no weights read); the trainer's
    pre-flight check refuses a card the run does not fit and names the flags that would."""
    from diffusers_ext.testing.tiny_pipelines import save_tiny_pipeline
    from diffusers_ext.training.train_spatial_adapter import parse_args

    folder = save_tiny_pipeline(tmp_path / "sd")
    for weights in folder.glob("*/*.safetensors"):
        weights.write_bytes(b"not read")  # a rehearsal never opens them
    result = plan.rehearse(plan.parse_args(["--pretrained-model", str(folder), "--batch-size", "4"]))
    assert result.step["Parameter"] > 0 and result.step["Activation"] > 0
    targs = parse_args(["--mixed-data", "x.jsonl", "--pretrained-model", str(folder), "--output-dir", "o",
                        "--batch-size", "4"])  # fmt: skip
    fits, message = plan.preflight(targs, gpu_gib=result.peak / GiB)  # 90 % of it is the budget
    assert not fits
    assert message.startswith("verdict: does NOT fit on ")
    assert "; --mixed-precision no --batch-size" in message and "--cache-dir DIR" in message, message
    fits, message = plan.preflight(targs, gpu_gib=2 * result.peak / GiB)
    assert fits and message.startswith("verdict: fits on ")


def _state_layout(optimizer) -> tuple[list[dict], int]:
    """Per parameter, each state tensor's dtype and shape; and the bytes held, a shared map counted once."""
    layout, seen, total = [], set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            layout.append(
                {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)}
            )
            for v in state.values():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.numel() * v.element_size()
    return layout, total


@pytest.mark.parametrize("bf16_adapter", [False, True], ids=["fp32-adapter", "bf16-adapter"])
def test_the_rehearsed_8bit_adam_holds_the_state_bitsandbytes_holds(bf16_adapter):
    """--use-8bit-adam on the meta device: after one step the stand-in holds, parameter by parameter, the
    state tensors the real bitsandbytes AdamW8bit holds after one CPU step (uint8 moments and fp32 absmax
    per 256 values from 4096 values on, fp32 moments below, two shared 256-value maps), byte for byte."""
    import bitsandbytes as bnb

    from diffusers_ext.training.optimizers import build_optimizer

    def adapter():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({
            "proj": torch.nn.Linear(128, 96),  # 12288-value weight (48 blocks), 96-value bias
            "ff": torch.nn.Linear(64, 65),  # 4160 values: 17 blocks, the last one partial
            "norm": torch.nn.LayerNorm(64),
            "edge": torch.nn.Linear(4095, 1, bias=False),  # one value short of min_8bit_size
            "gate": torch.nn.Linear(4096, 1, bias=False),  # exactly min_8bit_size: 8-bit
        })  # fmt: skip

    dtype = torch.bfloat16 if bf16_adapter else torch.float32
    real_params = list(adapter().to(dtype).parameters())
    real = build_optimizer(real_params, name="adamw8bit", lr=1e-3, bf16_stochastic_rounding=bf16_adapter)
    for p in real_params:
        p.grad = torch.randn_like(p)
    real.step()

    meta_params = list(adapter().to(dtype).to("meta").parameters())
    with plan._rehearsed_8bit_adam(True):
        stand_in = build_optimizer(
            meta_params, name="adamw8bit", lr=1e-3, bf16_stochastic_rounding=bf16_adapter
        )
    assert bnb.optim.AdamW8bit.__name__ == "AdamW8bit"  # the real class is back after the rehearsal
    for p in meta_params:
        p.grad = torch.zeros_like(p)
    stand_in.step()

    real_layout, real_bytes = _state_layout(real)
    meta_layout, meta_bytes = _state_layout(stand_in)
    assert meta_layout == real_layout
    assert all(v.is_meta for s in stand_in.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    sizes = [p.numel() for p in real_params]
    expected = sum(2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes) + 2 * 256 * 4
    # 8-bit: 12288, 4160 and 4096 values (48, 17 and 16 blocks); fp32: the biases, the norm and 4095 values
    assert (
        meta_bytes
        == real_bytes
        == expected
        == 2 * (12288 + 4160 + 4096) + 8 * (48 + 17 + 16) + 2_048 + 8 * (96 + 65 + 128 + 4095)
    )


def test_the_rehearsal_counts_8bit_adam_state(tiny_sd):
    """The rehearsal runs --use-8bit-adam through the trainer's build_optimizer: optimizer state at the step's
    peak is what bitsandbytes holds for the adapter, not AdamW's 8 bytes a parameter."""
    from diffusers_ext.spatial_adapter import SpatialAdapter

    sizes = [p.numel() for p in SpatialAdapter.for_unet(tiny_sd.unet, phrase_dim=32).parameters()]
    held = sum(2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes) + 2 * 256 * 4
    eight = plan.rehearse(_opts(trainer_flags=["--use-8bit-adam"]), pipeline=plan.meta_copy(tiny_sd))
    assert eight.step["Optstate"] == held < 8 * sum(sizes)


def test_8bit_adam_is_a_lever_before_the_lighter_presets_and_preflight_passes_it_on():
    """8-bit moments cost no capacity: the advice tries them before it shrinks the adapter, once, and the
    trainer's --optimizer adamw8bit is rehearsed as such."""
    from diffusers_ext.training.train_spatial_adapter import parse_args

    names = [lever.name for lever in plan.LEVERS]
    assert names.index("--use-8bit-adam") < names.index("--layers migc")
    eight = next(lever for lever in plan.LEVERS if lever.name == "--use-8bit-adam")
    with_it = eight.apply(_opts())
    assert plan.user_flags(with_it).endswith(" --use-8bit-adam")
    assert not eight.applies(with_it)
    assert not eight.applies(_opts(trainer_flags=["--optimizer", "adamw8bit"]))
    targs = parse_args(["--mixed-data", "x.jsonl", "--pretrained-model", "p", "--output-dir", "o", "--use-8bit-adam",
                        "--mixed-precision", "bf16", "--bf16-adapter"])  # fmt: skip
    assert plan._preflight_flags(targs) == ["--bf16-adapter", "--use-8bit-adam"]
