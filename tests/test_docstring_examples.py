"""The ``Example:`` blocks of the public docstrings run and print what they show (doctest).

The CIR model's examples need LAVIS weights and stay marked ``+SKIP``; every other example here runs on the
tiny offline pipelines."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = [
    "vlext.atomic_files",
    "vlext.images",
    "vlext.lazy_exports",
    "diffusers_ext.spatial_adapter",
    "diffusers_ext.fuser_presets",
    "diffusers_ext.training.optimizers",
    "diffusers_ext.loaders",
    "diffusers_ext.generation",
    "diffusers_ext.gated_self_attention",
    "diffusers_ext.evaluation.layout_scoring",
    "clip_ext.memory_bank",
    "clip_ext.loss",
    "clip_ext.checkpoint",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_print_what_they_show(name):
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0
    assert result.attempted > 0
