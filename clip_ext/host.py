"""Every name clip_ext takes over in, or builds on from, ``open_clip_train``: listed, checked and bound here.

open_clip_train has no plugin mechanism, so ``clip_ext.train`` rebinds names that ``open_clip_train.main``
imported (its ``main`` looks them up as module globals when it runs) and builds on a few functions of
``open_clip_train.data``. A release that renames or reshapes one of them would otherwise break deep inside a
run, or, worse, run without our part: open_clip's main branch (4.x) has replaced ``create_loss`` and the loss
call of ``train_one_epoch`` by ``create_task`` and ``TrainingTask`` subclasses (see docs/clip_webdataset.md,
"open_clip 4.x TrainingTask"). :func:`check_host` runs at start-up, before any work, and stops naming the
first missing or reshaped name; :func:`bound` rebinds exactly :data:`REBOUND` and puts the originals back.

Only light imports at module level: ``clip_ext.train --help`` must not import torch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
from dataclasses import dataclass

__all__ = ["HostName", "HostMismatchError", "REBOUND", "check_host", "bound", "host_version"]

SUPPORTED = "open_clip_torch 3.x"


@dataclass(frozen=True)
class HostName:
    """One name of an ``open_clip_train`` module that clip_ext relies on.

    ``params`` are the leading parameter names of the signature we wrap or call (``None``: not a function,
    only its presence is checked).
    """

    module: str
    name: str
    params: tuple[str, ...] | None
    why: str


MAIN = "open_clip_train.main"
DATA = "open_clip_train.data"

# Rebound in open_clip_train.main while clip_ext.train.main() runs (restored when it returns or raises).
REBOUND_NAMES: tuple[HostName, ...] = (
    HostName(MAIN, "parse_args", ("args",), "our flags are parsed first, then open_clip's"),
    HostName(MAIN, "create_model_and_transforms", ("model_name", "pretrained"),
             "attaches the memory bank and region head to the model, sets the logit scale"),
    HostName(MAIN, "create_loss", ("args",), "returns clip_ext.loss.MemoryBankClipLoss"),
    HostName(MAIN, "train_one_epoch",
             ("model", "data", "loss", "epoch", "optimizer", "scaler", "scheduler", "dist_model", "args"),
             "hooks the optimizer step (bank enqueue, diagnostics); the loss is called with the model's dict"),
    HostName(MAIN, "get_data", ("args", "preprocess_fns"),
             "adds boxes, region captions and sample ids to the train batches (CSV and webdataset)"),
    HostName(MAIN, "pt_load", ("file_path", "map_location"), "merges our checkpoint state back on --resume"),
    HostName(MAIN, "get_latest_checkpoint", ("path", "remote"), "--resume latest skips incomplete files"),
    HostName(MAIN, "torch", None, "its save() writes checkpoints atomically, with our state under a key"),
)  # fmt: skip

# Read, not rebound.
USED_NAMES: tuple[HostName, ...] = (
    HostName(MAIN, "main", ("args",), "the trainer clip_ext.train runs"),
    HostName(MAIN, "is_master", ("args",), "only rank 0 logs diagnostics and region counts"),
    HostName(DATA, "get_wds_dataset", ("args", "preprocess_img", "is_train", "epoch", "floor", "tokenizer"),
             "the webdataset pipeline whose stages clip_ext.region_shards extends"),
    HostName(DATA, "CsvDataset", None, "the CSV dataset clip_ext.region_data wraps"),
    HostName(DATA, "DataInfo", None, "the train split's container"),
)  # fmt: skip

REBOUND: tuple[str, ...] = tuple(h.name for h in REBOUND_NAMES)


class HostMismatchError(SystemExit):
    """The installed open_clip_train lacks a name clip_ext needs, or has it with another signature."""


def host_version() -> str:
    """``X.Y`` of the installed open_clip_torch (open_clip_train ships in it)."""
    try:
        version = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"
    return ".".join(version.split(".")[:2])


def _leading_params(obj) -> list[str] | None:
    try:
        return list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def check_host(modules: dict[str, object], version: str | None = None) -> None:
    """Stop with :class:`HostMismatchError` at the first name of :data:`REBOUND_NAMES` / :data:`USED_NAMES`
    that ``modules`` (``{"open_clip_train.main": module, "open_clip_train.data": module}``) lack, or whose
    signature does not start with the parameters we wrap."""
    version = version or host_version()
    for entry in (*REBOUND_NAMES, *USED_NAMES):
        module = modules[entry.module]
        missing = object()
        obj = getattr(module, entry.name, missing)
        if obj is missing:
            raise HostMismatchError(
                f"open_clip_train {version} no longer has {entry.name}; clip_ext supports {SUPPORTED} "
                f"({entry.module}.{entry.name}: clip_ext.train relies on it because it {entry.why})"
            )
        if entry.params is None:
            continue
        params = _leading_params(obj)
        if params is None or params[: len(entry.params)] != list(entry.params):
            raise HostMismatchError(
                f"open_clip_train {version} has {entry.module}.{entry.name}({', '.join(params or ['?'])}) but "
                f"clip_ext wraps {entry.name}({', '.join(entry.params)}); clip_ext supports {SUPPORTED}"
            )


@contextlib.contextmanager
def bound(main_module, replacements: dict[str, object]):
    """Rebind :data:`REBOUND` in ``main_module`` for the ``with`` block; the originals come back on exit, also
    when the block raises. ``replacements`` must name exactly :data:`REBOUND` (one list of what we take over)."""
    if set(replacements) != set(REBOUND):
        raise ValueError(
            f"replacements {sorted(replacements)} must be exactly clip_ext.host.REBOUND {REBOUND}"
        )
    originals = {name: getattr(main_module, name) for name in REBOUND}
    try:
        for name, value in replacements.items():
            setattr(main_module, name, value)
        yield originals
    finally:
        for name, value in originals.items():
            setattr(main_module, name, value)
