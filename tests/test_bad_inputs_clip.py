"""Bad inputs to ``clip_ext.train`` / ``clip_ext.export`` are refused (or warned about) before work starts
(issue 23). Flags are parsed with ``clip_ext.train.parse_args``, which is where they are checked."""

import logging

import pytest
import torch

from clip_ext.export import main as export
from clip_ext.region_data import load_region_table
from clip_ext.train import parse_args
from vlext.toyworld import write_clip_csv


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return write_clip_csv(tmp_path_factory.mktemp("bad_clip") / "data", 6, seed=0, image_size=32)


def edited(csv, tmp_path, edit):
    lines = csv.read_text().splitlines()
    out = tmp_path / "edited.csv"
    out.write_text("\n".join(edit(lines)) + "\n")
    return out


def refusal(argv):
    with pytest.raises(SystemExit) as error:
        parse_args(["--model", "clip-ext-tiny", *argv])
    return str(error.value)


def checkpoint(path):
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(2)}, "optimizer": {"state": {}}}, path)
    return path


def test_export_onto_its_own_input_is_refused_and_the_checkpoint_kept(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "epoch_1.pt")
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as error:
        export([str(ckpt), str(tmp_path / "." / "epoch_1.pt")])
    assert error.value.code == 2
    assert "is CHECKPOINT itself; write the plain state dict to another file" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_export_over_an_existing_file_needs_overwrite(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "epoch_1.pt")
    out = tmp_path / "plain.pt"
    out.write_bytes(b"an earlier export")
    with pytest.raises(SystemExit):
        export([str(ckpt), str(out)])
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier export"
    assert export([str(ckpt), str(out), "--overwrite"]) == 0
    assert torch.load(out, weights_only=True)["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("which", ["OUT", "CHECKPOINT"])
def test_export_refuses_a_folder_for_either_path(tmp_path, capsys, which):
    ckpt = checkpoint(tmp_path / "epoch_1.pt")
    folder = tmp_path / "folder"
    folder.mkdir()
    argv = [str(ckpt), str(folder)] if which == "OUT" else [str(folder), str(tmp_path / "plain.pt")]
    with pytest.raises(SystemExit):
        export(argv)
    assert f"{which} {folder} is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and not (tmp_path / "plain.pt").exists()


def test_an_empty_title_is_refused_instead_of_training_as_nan(csv, tmp_path):
    def blank_row_3(lines):
        path, _ = lines[3].split("\t")
        lines[3] = f"{path}\t"
        return lines

    message = refusal(["--train-data", str(edited(csv, tmp_path, blank_row_3))])
    assert "1 caption(s) in column 'title' are empty or read as missing by pandas (line 4 ''" in message
    assert "open_clip would train on the text 'nan'" in message


def test_a_title_pandas_reads_as_missing_is_refused(csv, tmp_path):
    def na_titles(lines):
        for i in (2, 5):
            lines[i] = lines[i].split("\t")[0] + "\tNA"
        return lines

    message = refusal(["--val-data", str(edited(csv, tmp_path, na_titles))])
    assert "--val-data" in message and "2 caption(s)" in message and "line 3 'NA', line 6 'NA'" in message


def test_a_comma_separated_csv_is_refused_with_the_separator_to_pass(csv, tmp_path):
    import pandas as pd

    comma = tmp_path / "comma.csv"
    pd.read_csv(csv, sep="\t").to_csv(comma, index=False)  # quotes the titles that hold commas
    message = refusal(["--train-data", str(comma)])
    assert "column(s) ['filepath', 'title'] not found" in message
    assert "the header looks ','-separated: pass --csv-separator ','" in message
    assert parse_args(["--model", "clip-ext-tiny", "--train-data", str(comma), "--csv-separator", ","])


def test_lr_zero_is_refused():
    assert "--lr must be > 0 (a learning rate of 0 trains nothing), got 0.0" in refusal(["--lr", "0"])


def test_a_bank_larger_than_the_dataset_warns_unless_dedup(csv, caplog):
    with caplog.at_level(logging.WARNING):
        parse_args(["--model", "clip-ext-tiny", "--train-data", str(csv), "--memory-bank-size", "8"])
    (warning,) = [r.getMessage() for r in caplog.records if "--memory-bank-size" in r.getMessage()]
    assert "--memory-bank-size 8 is larger than --train-data's 6 rows" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_args(["--model", "clip-ext-tiny", "--train-data", str(csv), "--memory-bank-size", "6"])
        parse_args(["--model", "clip-ext-tiny", "--train-data", str(csv), "--memory-bank-size", "8",
                    "--memory-bank-dedup"])  # fmt: skip
    assert [r for r in caplog.records if "--memory-bank-size" in r.getMessage()] == []


def test_region_lines_for_images_not_in_the_csv_are_counted_in_a_warning(csv, tmp_path, caplog):
    regions = csv.with_name("train_regions.jsonl")
    lines = regions.read_text().splitlines()
    extra = tmp_path / "regions.jsonl"
    foreign = [line.replace('"filepath": "', '"filepath": "other/') for line in lines[:2]]
    extra.write_text("\n".join([*lines, *foreign]) + "\n")
    import pandas as pd

    images = pd.read_csv(csv, sep="\t")["filepath"].tolist()
    with caplog.at_level(logging.WARNING):
        table = load_region_table(extra, images, 0.0, 0.0)
    assert len(table.boxes) == 6
    (warning,) = [r.getMessage() for r in caplog.records if "not in --train-data" in r.getMessage()]
    assert "2 of its 8 lines name images that are not in --train-data and are not used" in warning
    assert f"{extra}:7 other/" in warning
