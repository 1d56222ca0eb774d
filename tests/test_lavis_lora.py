"""LoRA on the Q-Former from the model config: what trains, what the runner saves, and bad configs."""

import pytest
import torch
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (registers the model)
from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt

torch.set_num_threads(1)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
CAPTIONS = ["make the red circle larger", "remove the green star", "turn the blue square into a star"]


def build(lora=LORA, seed=0, **overrides):
    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("tiny")).model
    if lora is not None:
        cfg.lora = lora
    for key, value in overrides.items():
        cfg[key] = value
    torch.manual_seed(seed)
    return Blip2QformerCirAlignPrompt.from_config(cfg)


def batch(n=3):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "target": torch.randn(n, 3, 32, 32, generator=g),
        "text_input": CAPTIONS[:n],
    }


def runner_state_dict(model):
    """What LAVIS's RunnerBase._save_checkpoint keeps: the state dict minus parameters without grad."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    return {k: v.clone() for k, v in model.state_dict().items() if k not in frozen}


def scores(model):
    model.eval()
    data = batch()
    with torch.no_grad():
        return model.inference(
            model.extract_reference_features(data["image"]),
            model.extract_target_features(data["target"]),
            data["text_input"],
        )


def test_only_lora_trains_in_the_qformer():
    model = build()
    qformer = {name: p.requires_grad for name, p in model.Qformer.named_parameters()}
    lora = [name for name in qformer if "lora_" in name]
    assert lora and all(qformer[name] for name in lora)
    assert not any(trainable for name, trainable in qformer.items() if "lora_" not in name)
    # adapters sit on every self- and cross-attention query/value layer, and nowhere else
    adapted = {name.split(".lora_")[0] for name in lora}
    assert adapted and all(name.rsplit(".", 1)[-1] in ("query", "value") for name in adapted)
    assert any("crossattention" in name for name in adapted)
    # the parts outside the Q-Former keep training (SPRC trains them)
    for name in ("query_tokens", "prompt_tokens", "temp", "text_proj.weight", "vision_proj.weight"):
        assert dict(model.named_parameters())[name].requires_grad, name


def test_lora_starts_as_the_base_model():
    """peft's B matrix starts at zero: switching LoRA on changes no output before training."""
    assert torch.equal(scores(build()), scores(build(lora=None)))


def test_gradient_reaches_lora_and_not_the_frozen_qformer():
    model = build().train()
    model(batch())["loss"].backward()
    grads = {name: p.grad for name, p in model.Qformer.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
    assert all(g is None for name, g in grads.items() if "lora_" not in name)


def test_runner_checkpoint_holds_only_trainable_weights_and_reproduces_outputs():
    model = build().train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(batch())["loss"].backward()
    optimizer.step()
    trained = scores(model)
    saved = runner_state_dict(model)
    frozen_qformer = [k for k in saved if k.startswith("Qformer.") and "lora_" not in k]
    # only buffers (position ids) remain of the frozen Q-Former
    assert all(
        not isinstance(dict(model.named_parameters()).get(k), torch.nn.Parameter) for k in frozen_qformer
    )
    assert any("lora_A" in k for k in saved)
    full = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in saved.values()) < full

    fresh = build()  # same seed = the same frozen base weights a pretrained checkpoint would give
    assert not torch.equal(scores(fresh), trained)
    result = fresh.load_state_dict(saved)  # strict, as the runner resumes: only frozen parameters missing
    frozen = {name for name, p in fresh.named_parameters() if not p.requires_grad}
    assert not result.unexpected_keys and set(result.missing_keys) == frozen
    assert any(k.startswith("Qformer.bert.encoder") for k in frozen)
    assert torch.equal(scores(fresh), trained)


def test_strict_load_still_rejects_missing_trainable_weights():
    model = build()
    state = runner_state_dict(model)
    lora_key = next(k for k in state if "lora_A" in k)
    del state[lora_key]
    with pytest.raises(RuntimeError, match="Missing key"):
        build().load_state_dict(state)


@pytest.mark.parametrize(
    ("lora", "error", "message"),
    [
        ({**LORA, "rank": 4}, ValueError, r"unknown key\(s\) \['rank'\] in model config 'lora'; accepted"),
        ({**LORA, "r": 0}, ValueError, r"'lora.r' must be a positive int"),
        ({**LORA, "r": -2}, ValueError, r"'lora.r' must be a positive int"),
        ({**LORA, "r": 2.5}, TypeError, r"'lora.r' must be int"),
        ({**LORA, "dropout": 1.5}, ValueError, r"'lora.dropout' must be in \[0, 1\)"),
        ({"alpha": 8}, ValueError, r"'lora.r' is required"),
        (
            {**LORA, "target_modules": ["qkv"]},
            ValueError,
            r"entry 'qkv' matches no nn.Linear of the Q-Former",
        ),
        ({**LORA, "target_modules": []}, ValueError, r"'lora.target_modules' must be non-empty"),
        ("yes", TypeError, r"'lora' must be dict"),
    ],
)
def test_bad_lora_config_is_a_clear_error(lora, error, message):
    with pytest.raises(error, match=message):
        build(lora=lora)


def test_runner_trains_lora_and_saves_only_trainable_weights(tmp_path):
    from lavis_helpers import CFG
    from lavis_inprocess import train

    from vlext.toyworld import write_cirr

    data = write_cirr(tmp_path / "cirr_dataset", 32, 12, 6, seed=0, image_size=32)
    options = [
        f"datasets.cirr.build_info.root={data}",
        f"run.output_dir={tmp_path / 'out'}",
        "run.batch_size_train=8",
        "model.lora.r=4",
        "model.lora.alpha=8",
        "model.lora.target_modules=[query,value]",
    ]
    train(*options, cfg=CFG)  # in this process: what the runner saves, not how it is launched
    (job,) = list((tmp_path / "out").iterdir())
    checkpoint = torch.load(job / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    saved = checkpoint["model"]
    model = build(lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    parameters = {name for name, _ in model.named_parameters()}
    assert {k for k in saved if k in parameters} == trainable
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)  # the adapters trained
