"""Every published checkpoint layout (SPRC, LAVIS, bare state dict) loads; anything else is named and refused."""

import pytest
import torch

from lavis_ext.models.checkpoint_io import CheckpointFormatError, read_state_dict

STATE = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.tensor([1.0, -1.0])}


def save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("layout", "expected_format"),
    [
        ({"epoch": 7, "Blip2QformerCirAlignPrompt": STATE}, "sprc"),
        (
            {
                "model": STATE,
                "optimizer": {"state": {}, "param_groups": []},
                "config": {"run": {}},
                "scaler": None,
                "epoch": 3,
            },
            "lavis",
        ),
        ({"model": STATE}, "lavis"),
        (STATE, "state_dict"),
    ],
)
def test_each_published_layout_gives_the_same_state_dict(tmp_path, layout, expected_format):
    state_dict, meta = read_state_dict(save(tmp_path, layout))
    assert meta["format"] == expected_format
    assert state_dict.keys() == STATE.keys()
    assert all(torch.equal(state_dict[k], STATE[k]) for k in STATE)


def test_meta_keeps_the_epoch_and_the_runner_entries(tmp_path):
    _, sprc = read_state_dict(save(tmp_path, {"epoch": 7, "Blip2QformerCirAlignPrompt": STATE}))
    _, lavis = read_state_dict(save(tmp_path, {"model": STATE, "epoch": 3, "config": {"x": 1}}, "l.pth"))
    assert sprc["epoch"] == 7 and lavis["epoch"] == 3 and lavis["config"] == {"x": 1}


def test_sprc_file_saved_under_ddp_drops_the_module_prefix(tmp_path):
    wrapped = {f"module.{k}": v for k, v in STATE.items()}
    state_dict, _ = read_state_dict(save(tmp_path, {"epoch": 1, "DistributedDataParallel": wrapped}))
    assert sorted(state_dict) == sorted(STATE)


def test_safetensors_bare_state_dict_loads(tmp_path):
    from safetensors.torch import save_file

    save_file(STATE, tmp_path / "w.safetensors")
    state_dict, meta = read_state_dict(tmp_path / "w.safetensors")
    assert meta["format"] == "state_dict" and torch.equal(state_dict["a.weight"], STATE["a.weight"])


def test_unknown_layout_names_the_file_and_the_keys_it_found(tmp_path):
    path = save(tmp_path, {"state_dict": STATE, "step": 5})
    with pytest.raises(CheckpointFormatError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert str(path) in message and "['state_dict', 'step']" in message and "accepted: SPRC" in message


def test_truncated_file_is_named_and_refused(tmp_path):
    path = save(tmp_path, {"model": {"w": torch.randn(256, 256)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=rf"{path}.*truncated or corrupt"):
        read_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        read_state_dict(tmp_path / "nope.pth")


# ---------------------------------------------------------------- through the model's config keys (tiny)
def tiny_model(**overrides):
    from omegaconf import OmegaConf

    from lavis_ext.models.blip2_cir_align_prompt import Blip2QformerCirAlignPrompt

    cfg = OmegaConf.load(Blip2QformerCirAlignPrompt.default_config_path("tiny")).model
    for key, value in overrides.items():
        cfg[key] = value
    return Blip2QformerCirAlignPrompt.from_config(cfg)


@pytest.fixture(scope="module")
def trained_state():
    torch.manual_seed(123)  # another init than the one the loading model starts from
    return tiny_model().state_dict()


def layouts(state):
    return {
        "sprc": {"epoch": 12, "Blip2QformerCirAlignPrompt": state},
        "lavis": {"model": state, "optimizer": {}, "config": {}, "scaler": None, "epoch": 2},
        "state_dict": state,
    }


@pytest.mark.parametrize("layout", ["sprc", "lavis", "state_dict"])
@pytest.mark.parametrize("key", ["finetuned", "pretrained"])
def test_config_checkpoint_keys_accept_every_layout(tmp_path, trained_state, layout, key):
    path = save(tmp_path, layouts(trained_state)[layout])
    torch.manual_seed(0)
    model = tiny_model(load_finetuned=key == "finetuned", **{key: str(path)})
    loaded = model.state_dict()
    assert loaded.keys() == trained_state.keys()
    assert all(torch.equal(loaded[k], trained_state[k]) for k in trained_state)


def test_load_checkpoint_on_the_model_reads_sprc_files(tmp_path, trained_state):
    path = save(tmp_path, layouts(trained_state)["sprc"])
    model = tiny_model()
    assert not torch.equal(model.prompt_tokens.detach(), trained_state["prompt_tokens"])
    model.load_checkpoint(str(path))
    assert torch.equal(model.prompt_tokens.detach(), trained_state["prompt_tokens"])


def test_finetuned_missing_a_trainable_weight_is_refused(tmp_path, trained_state):
    state = {k: v for k, v in trained_state.items() if k != "prompt_tokens"}
    path = save(tmp_path, layouts(state)["sprc"])
    with pytest.raises(RuntimeError, match="prompt_tokens"):
        tiny_model(load_finetuned=True, finetuned=str(path))


def test_finetuned_with_an_unknown_layout_names_its_keys(tmp_path, trained_state):
    path = save(tmp_path, {"weights": trained_state, "epoch": 1})
    with pytest.raises(CheckpointFormatError, match=r"top-level keys \['epoch', 'weights'\]"):
        tiny_model(load_finetuned=True, finetuned=str(path))
