"""What a change of world size does to the batch is named in the log, or undone by a global batch key
(issue 29: ``batch_size_train: 128`` is per GPU in LAVIS, so SPRC's recipe on 8 GPUs trained with 1024)."""

import pytest
from lavis_helpers import CFG
from lavis_inprocess import run_main
from omegaconf import OmegaConf

from lavis_ext.batch_plan import apply_batch_plan, describe_batch_plan
from lavis_ext.config_check import ConfigError


def test_a_global_batch_is_split_over_the_processes():
    for world, per_gpu in ((1, 128), (2, 64), (8, 16)):
        run = OmegaConf.create({"batch_size_train_global": 128})
        plan = apply_batch_plan(run, world)
        assert run.batch_size_train == per_gpu
        assert plan == {"per_gpu": per_gpu, "world_size": world, "global": 128, "scaled": True}


@pytest.mark.parametrize(
    "run, world, expected",
    [
        (
            {"batch_size_train_global": 128},
            3,
            "run.batch_size_train_global=128 does not split evenly over 3 processes",
        ),
        ({"batch_size_train_global": 0}, 1, "run.batch_size_train_global must be an int > 0, got 0"),
        ({"batch_size_train_global": 8, "batch_size_train": 8}, 1, "are both given; give one"),
    ],
)
def test_a_global_batch_that_cannot_be_kept_is_refused(run, world, expected):
    with pytest.raises(ConfigError) as error:
        apply_batch_plan(OmegaConf.create(run), world)
    assert expected in str(error.value)


def test_a_per_gpu_batch_on_several_processes_names_what_changed():
    plan = apply_batch_plan(OmegaConf.create({"batch_size_train": 128}), 8)
    assert plan == {"per_gpu": 128, "world_size": 8, "global": 1024, "scaled": False}
    line, differs = describe_batch_plan(plan, steps_per_epoch=28, n_train=28_800, gather_negatives=False)
    assert differs
    assert line.startswith(
        "batch: 128 per GPU x world size 8 = global batch 1024; 28 steps/epoch over 28800 training triplets; "
        "128 contrastive negatives per query. This differs from the recipe on one process"
    )
    assert (
        "an epoch has 28 steps instead of 225, at the same lr (a one-cycle schedule runs over 1/8 of" in line
    )
    assert "set run.batch_size_train_global=128 (and model.gather_negatives=True)" in line


def test_a_global_batch_with_gathered_negatives_is_the_one_process_run():
    plan = apply_batch_plan(OmegaConf.create({"batch_size_train_global": 128}), 8)
    line, differs = describe_batch_plan(plan, steps_per_epoch=225, n_train=28_800, gather_negatives=True)
    assert not differs
    assert "16 per GPU x world size 8 = global batch 128; 225 steps/epoch" in line
    assert "128 contrastive negatives per query" in line
    line, differs = describe_batch_plan(plan, steps_per_epoch=225, n_train=28_800, gather_negatives=False)
    assert differs and "each GPU's loss sees 16 negatives, not 128" in line


def test_two_batch_keys_are_refused_before_the_data_is_read(tmp_path):
    from lavis_ext.train import main

    argv = [
        "--cfg-path",
        CFG,
        "--options",
        f"run.output_dir={tmp_path / 'out'}",
        "run.batch_size_train_global=8",
    ]
    # cirr_tiny.yaml gives batch_size_train: 16; the root does not exist: the refusal comes first
    argv.append(f"datasets.cirr.build_info.root={tmp_path / 'missing'}")
    with pytest.raises(
        ConfigError, match="run.batch_size_train=16 .* and run.batch_size_train_global=8 are both"
    ):
        run_main(main, argv)
