"""Is this process only going to print a command's ``--help``?

``python -m lavis_ext.train --help`` first imports the package ``lavis_ext``, whose ``__init__`` applies the
LAVIS compatibility layer and fills LAVIS's registry (torch, transformers and LAVIS: 15 s or more). A user
asking for ``--help`` should not wait for that. While the interpreter looks up the module of ``-m``, it keeps
``sys.argv[0] == "-m"`` (runpy sets the module's path only once the module is found), so a package
``__init__`` can tell that it is being imported on the way to a command line and not by user code.
"""

from __future__ import annotations

import sys

__all__ = ["help_only_invocation"]


def help_only_invocation(argv: list[str] | None = None) -> bool:
    """True when the process is ``python -m <package>.<cli> ... --help`` (or ``-h``) being set up."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and argv[0] == "-m" and any(arg in ("-h", "--help") for arg in argv[1:])
