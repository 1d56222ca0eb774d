"""Test-only fault injection: one environment variable, one function. Unset in normal use; never set it.

The crash tests must kill or stall a trainer at an exact moment (between two files of a checkpoint, between
writing a file and renaming it) to prove that resume survives. Library code marks such moments with
``hook("point-name", subject)``; a test arms them through ``VLEXT_TEST_HOOKS``, a comma-separated list of
``point[@subject]=action`` entries, where action is ``kill`` (SIGKILL this process, the way a preempted job
dies) or ``sleep:<seconds>`` (stall there, so the test can kill the process from outside)::

    VLEXT_TEST_HOOKS="atomic-write:before-rename@epoch_2.pt=sleep:600"
    VLEXT_TEST_HOOKS="diffusers-train:checkpoint-first-file@checkpoint-3=kill"

With the variable unset, :func:`hook` returns at once. Hook points in the code base:

- ``atomic-write:half-written`` (subject: file name) -- :mod:`vlext.atomic_files`, half of the bytes of a
  ``torch.save`` written and flushed to the temporary file;
- ``atomic-write:before-rename`` (subject: file name) -- :mod:`vlext.atomic_files`, the temporary file
  complete and fsynced, not yet renamed;
- ``diffusers-train:checkpoint-first-file`` (subject: ``checkpoint-<step>``) -- the spatial-adapter
  trainer, the checkpoint's first file written, the others not.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["ENV", "armed", "arm", "hook"]

ENV = "VLEXT_TEST_HOOKS"


def _entries() -> list[tuple[str, str | None, str]]:
    spec = os.environ.get(ENV, "")
    entries = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        target, sep, action = item.partition("=")
        if not sep or not (action == "kill" or action.startswith("sleep:")):
            raise ValueError(
                f"{ENV} entry {item!r}: expected point[@subject]=kill or point[@subject]=sleep:<s>"
            )
        point, _, subject = target.partition("@")
        entries.append((point, subject or None, action))
    return entries


def armed(point: str, subject: str | None = None) -> bool:
    """True when ``VLEXT_TEST_HOOKS`` arms ``point`` (for ``subject``, when the entry names one)."""
    if not os.environ.get(ENV):
        return False
    return any(p == point and s in (None, subject) for p, s, _ in _entries())


def hook(point: str, subject: str | None = None) -> None:
    """Run the action ``VLEXT_TEST_HOOKS`` sets for ``point`` (and ``subject``); nothing when it is unset."""
    if not os.environ.get(ENV):
        return
    for p, s, action in _entries():
        if p != point or s not in (None, subject):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(action.removeprefix("sleep:")))


def arm(point: str, action: str, subject: str | None = None) -> dict[str, str]:
    """The environment entry that arms ``point`` (for a test's ``subprocess`` ``env``)."""
    return {ENV: f"{point}{'@' + subject if subject else ''}={action}"}
