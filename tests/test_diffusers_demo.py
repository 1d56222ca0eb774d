"""The demo runs end to end on a micro configuration and its adapter leaves the zero-init point."""

import json

import pytest
import torch

from diffusers_ext.demo import main, run

torch.set_num_threads(1)

MICRO = {
    "n_train": 16,
    "n_eval": 2,
    "batch_size": 4,
    "adapter_batch_size": 4,
    "base_steps": 2,
    "adapter_steps": 3,
    "sample_steps": 2,
    "log_every": 1,
    "base_unet": None,  # train a 2-step base here instead of loading the shipped one (its config differs)
    "base_sha256": None,
}


def test_micro_demo_writes_its_evidence_and_leaves_the_zero_init_point(tmp_path):
    result = run(tmp_path, MICRO)  # the default init, zero_out: output layers start at 0, gates at tanh(1)
    assert result["init_mode"] == "zero_out"
    assert result["output_layer_norm_init"] == 0.0 < result["output_layer_norm_end"]
    for key in ("mean_iou", "share_iou_gt_0.5", "share_center_in_box"):
        assert 0.0 <= result[f"{key}_adapter"] <= 1.0 and 0.0 <= result[f"{key}_baseline"] <= 1.0
    assert result["n_objects"] == 2  # one object in each of the 2 held-out scenes
    assert (tmp_path / "diffusers_layout_grid.png").stat().st_size > 0
    assert (tmp_path / "diffusers_gate_loss.png").stat().st_size > 0
    assert [f["file"] for f in result["figures"]] == ["diffusers_layout_grid.png", "diffusers_gate_loss.png"]
    (table,) = result["tables"]  # the page's table: adapter and no-adapter scores, as computed
    assert table["rows"][0][1:] == [
        round(result["mean_iou_adapter"], 3),
        round(result["mean_iou_baseline"], 3),
    ]
    assert json.loads((tmp_path / "diffusers_demo.json").read_text())["n_objects"] == result["n_objects"]


def test_micro_demo_in_gligen_gate_mode_opens_the_gate(tmp_path):
    result = run(tmp_path, {**MICRO, "adapter_init_mode": "gate"})
    assert result["gate_abs_mean_end"] > 0.0  # gradients reached the zero-initialised gates
    assert result["gate_abs_mean_init"] == 0.0 and result["output_layer_norm_init"] > 0.0


def _adapter_weights(result_dir):
    """The adapter's output-layer norm and loss curve end: what a training seed or a lever changes."""
    data = json.loads((result_dir / "diffusers_demo.json").read_text())
    return data["output_layer_norm_end"], data["adapter_loss_end"]


def test_the_training_seed_moves_the_adapter_and_nothing_else(tmp_path):
    own = run(tmp_path / "own", MICRO)
    zero = run(tmp_path / "zero", MICRO, seed=0)
    other = run(tmp_path / "other", MICRO, seed=5)
    assert _adapter_weights(tmp_path / "own") == _adapter_weights(tmp_path / "zero")  # 0 is the demo's own
    assert _adapter_weights(tmp_path / "other") != _adapter_weights(tmp_path / "zero")
    assert other["training_seed"] == 5 and own["training_seed"] == 0
    # the base, the held-out layouts and the sampling noise belong to the data seed
    assert other["base"]["loss_last_25"] == zero["base"]["loss_last_25"]
    assert other["mean_iou_baseline"] == zero["mean_iou_baseline"]


def test_accumulated_micro_batches_take_the_step_of_the_whole_batch(tmp_path):
    whole = run(tmp_path / "whole", MICRO)
    parts = run(tmp_path / "parts", {**MICRO, "gradient_accumulation_steps": 2})
    assert parts["levers"]["gradient_accumulation_steps"] == 2
    # the same draws, gradients summed in another order: equal to float rounding
    assert parts["output_layer_norm_end"] == pytest.approx(whole["output_layer_norm_end"], rel=1e-5)
    assert parts["adapter_loss_end"] == pytest.approx(whole["adapter_loss_end"], rel=1e-5)


@pytest.mark.parametrize(
    "lever",
    [{"adapter_layers": "mid"}, {"adapter_optimizer": "adamw8bit"}, {"bf16_adapter": True}],
    ids=["mid-preset", "8bit-adam", "bf16-adapter"],
)
def test_each_memory_lever_trains_the_adapter_away_from_its_zero_init(tmp_path, lever):
    result = run(tmp_path, {**MICRO, **lever})
    assert result["output_layer_norm_init"] == 0.0 < result["output_layer_norm_end"]
    assert {k: result["levers"][k] for k in lever} == lever
    if "adapter_layers" in lever:
        assert result["fusers"] == 1  # the mid block's one transformer block of the tiny UNet


@pytest.mark.parametrize(
    "lever, message",
    [
        ({"adapter_optimizer": "sgd"}, "bad adapter_optimizer 'sgd' (accepted: adamw, adamw8bit)"),
        ({"gradient_accumulation_steps": 0}, "bad gradient_accumulation_steps 0 (an integer from 1 to"),
        (
            {"gradient_accumulation_steps": 8},
            "bad gradient_accumulation_steps 8 (an integer from 1 to adapter_batch_size 4)",
        ),
        ({"bf16_adapter": "yes"}, "bad bf16_adapter 'yes' (true or false)"),
    ],
)
def test_a_lever_the_adapter_phase_cannot_run_is_refused_before_anything_loads(tmp_path, lever, message):
    with pytest.raises(ValueError) as error:
        run(tmp_path / "out", {**MICRO, **lever})
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_demo_command_line_refuses_a_step_count_it_cannot_run(capsys):
    with pytest.raises(SystemExit):
        main(["--adapter-steps", "0"])
    assert "--adapter-steps must be >= 1, got 0" in capsys.readouterr().err


def test_a_saved_base_loads_back_and_a_base_for_another_config_is_refused(tmp_path):
    from diffusers_ext.demo import DEMO_CONFIG, load_base, save_base, train_base

    cfg = {**DEMO_CONFIG, **MICRO}
    unet, table, losses = train_base(cfg)
    save_base(tmp_path / "base.safetensors", unet, table, cfg, losses)
    loaded, loaded_table, metadata = load_base(tmp_path / "base.safetensors", cfg)
    for (name, a), b in zip(unet.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-3 * a.abs().max().item() + 1e-6), name  # stored as fp16
    assert all(torch.equal(table[w], loaded_table[w]) for w in table)  # phrase vectors stored exactly
    assert metadata["command"].startswith("python -m diffusers_ext.demo --train-base")
    with pytest.raises(ValueError, match="n_train"):
        load_base(tmp_path / "base.safetensors", {**cfg, "n_train": 32})
    with pytest.raises(ValueError, match="sha256"):
        load_base(tmp_path / "base.safetensors", cfg, sha256="0" * 64)


def test_demo_command_line_refuses_a_base_file_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--base-unet", str(tmp_path / "missing.safetensors")])
    assert "missing.safetensors: no such file; write one with --train-base FILE" in capsys.readouterr().err


def test_the_shipped_base_matches_its_checksum_and_the_demo_config():
    from diffusers_ext.demo import DEMO_CONFIG, SHIPPED_BASE, _phrase_table, load_base

    unet, table, metadata = load_base(SHIPPED_BASE, DEMO_CONFIG, sha256=DEMO_CONFIG["base_sha256"])
    expected = _phrase_table(DEMO_CONFIG["text_dim"], DEMO_CONFIG["seed"])
    assert all(torch.equal(table[w], expected[w]) for w in expected)  # the vectors the demo would draw
    assert float(metadata["loss_last_25"]) < 0.5 * float(metadata["loss_first_25"])  # it was trained


def test_an_unknown_config_key_is_refused_before_any_work(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown demo config key\(s\) \['adapter_step'\]; DEMO_CONFIG has .*'adapter_steps'",
    ):
        run(tmp_path / "out", {**MICRO, "adapter_step": 5})  # a typo of adapter_steps
    assert not (tmp_path / "out").exists()
