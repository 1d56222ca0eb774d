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
