"""clip_ext.host: the open_clip_train names clip_ext takes over are checked at start-up and refused by name."""

import types

import open_clip_train.data as host_data
import open_clip_train.main as host_main
import pytest

import clip_ext.train as clip_train
from clip_ext.host import DATA, MAIN, REBOUND, HostMismatchError, bound, check_host, host_version


def _stand_in(module, without: str) -> types.ModuleType:
    """A copy of ``module``'s names, less one (an open_clip_train release that dropped it)."""
    copy = types.ModuleType(module.__name__)
    copy.__dict__.update({k: v for k, v in vars(module).items() if k != without})
    return copy


def test_the_installed_open_clip_train_has_every_name_with_the_signature_we_wrap():
    check_host({MAIN: host_main, DATA: host_data})  # raises on the first mismatch
    assert host_version().startswith("3.")


def test_a_host_without_create_loss_is_refused_by_name():
    with pytest.raises(HostMismatchError) as refused:
        check_host({MAIN: _stand_in(host_main, "create_loss"), DATA: host_data}, version="4.2")
    message = str(refused.value)
    assert message.startswith(
        "open_clip_train 4.2 no longer has create_loss; clip_ext supports open_clip_torch 3.x"
    )
    assert "open_clip_train.main.create_loss" in message


def test_a_reshaped_signature_is_refused_naming_both_signatures():
    reshaped = _stand_in(host_main, "train_one_epoch")
    reshaped.train_one_epoch = lambda state, data, args, tb_writer=None: None  # open_clip 4.x's shape
    with pytest.raises(HostMismatchError, match=r"has open_clip_train.main.train_one_epoch\(state, data, args, "
                                                r"tb_writer\) but clip_ext wraps train_one_epoch\(model, data"):  # fmt: skip
        check_host({MAIN: reshaped, DATA: host_data}, version="4.2")


def test_a_missing_data_function_is_refused_too():
    with pytest.raises(HostMismatchError, match="open_clip_train 3.9 no longer has get_wds_dataset;"):
        check_host({MAIN: host_main, DATA: _stand_in(host_data, "get_wds_dataset")}, version="3.9")


def test_training_stops_before_any_work_when_a_host_name_is_missing(tmp_path, monkeypatch):
    monkeypatch.delattr(host_main, "create_loss")
    argv = ["--model", "clip-ext-tiny", "--train-data", str(tmp_path / "none.csv"), "--logs", str(tmp_path)]
    with pytest.raises(
        HostMismatchError, match=f"open_clip_train {host_version()} no longer has create_loss;"
    ):
        clip_train.main(argv)
    assert list(tmp_path.iterdir()) == []  # no log folder: refused before open_clip's main started
    monkeypatch.undo()
    assert [name for name in REBOUND if not hasattr(host_main, name)] == []


def test_binding_takes_exactly_the_listed_names_and_restores_them_on_error():
    stand_in = _stand_in(host_main, "")
    with pytest.raises(ValueError, match="must be exactly clip_ext.host.REBOUND"):
        with bound(stand_in, {"create_loss": None}):
            pass
    before = {name: getattr(stand_in, name) for name in REBOUND}
    with pytest.raises(RuntimeError):
        with bound(stand_in, {name: f"ours-{name}" for name in REBOUND}):
            assert stand_in.create_loss == "ours-create_loss"
            raise RuntimeError("training failed")
    assert all(getattr(stand_in, name) is value for name, value in before.items())
