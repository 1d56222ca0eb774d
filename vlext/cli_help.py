"""Is this process only going to print a command's ``--help``?

``python -m lavis_ext.train --help`` first imports the package ``lavis_ext``, whose ``__init__`` applies the
LAVIS compatibility layer and fills LAVIS's registry (torch, transformers and LAVIS: 15 s or more). A user
asking for ``--help`` should not wait for that. While the interpreter looks up the module of ``-m``, it keeps
``sys.argv[0] == "-m"`` (runpy sets the module's path only once the module is found), so a package
``__init__`` can tell that it is being imported on the way to a command line and not by user code. An
installed console script (``lavis-ext-train --help``) imports the package from a wrapper whose
``sys.argv[0]`` is the script's path; its name is one of this distribution's ``console_scripts``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["help_only_invocation"]

DISTRIBUTION = "vl-extensions"


def _our_console_scripts() -> set[str]:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        points = distribution(DISTRIBUTION).entry_points
    except PackageNotFoundError:  # run from a source tree that is not installed
        return set()
    return {point.name for point in points if point.group == "console_scripts"}


def help_only_invocation(argv: list[str] | None = None) -> bool:
    """True when the process is ``python -m <package>.<cli> ... --help`` (or ``-h``) being set up, or one of
    this distribution's console scripts called with ``--help``."""
    argv = sys.argv if argv is None else argv
    if not argv or not any(arg in ("-h", "--help") for arg in argv[1:]):
        return False
    return argv[0] == "-m" or Path(argv[0]).name in _our_console_scripts()
