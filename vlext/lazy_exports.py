"""A package's public names, loaded on first use (PEP 562), shared by diffusers_ext, clip_ext and lavis_ext.

``python -m <package>.<cli> --help`` imports the package first; importing torch, diffusers, open_clip or
LAVIS there would make the help wait for them. A package therefore lists its exports as a name -> module map
and hands the module its ``__getattr__`` and ``__dir__`` from :func:`lazy_exports`; ``from package import
Name`` then imports ``Name``'s module at that moment. The package also imports every exported name under
``if TYPE_CHECKING:``, so editors and type checkers see them (that block never runs). Standard library only.

Example (a package's ``__init__.py``)::

    from typing import TYPE_CHECKING

    from vlext.lazy_exports import lazy_exports

    if TYPE_CHECKING:
        from mypackage.model import Model

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"Model": "mypackage.model"})
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

__all__ = ["lazy_exports", "load_all"]


def _resolve(package: str, name: str, module_name: str):
    module = import_module(module_name)
    # a name that is the module's own last component exports the module itself (``lavis_ext.compat``)
    return module if module_name == f"{package}.{name}" else getattr(module, name)


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for package ``package`` exporting ``exports`` (name -> module).

    Args:
        package: the package's ``__name__``.
        exports: every public name and the module that defines it.

    Returns:
        ``__getattr__`` (imports the name's module on first access and caches the value in the package, so
        the next access is an ordinary attribute; an unknown name raises ``AttributeError``), ``__dir__``
        (the package's globals plus every export) and ``__all__`` (the sorted export names).

    Example:
        >>> getattr_, dir_, all_ = lazy_exports("json", {"JSONDecoder": "json.decoder"})
        >>> getattr_("JSONDecoder").__name__, all_
        ('JSONDecoder', ['JSONDecoder'])
        >>> getattr_("nope")
        Traceback (most recent call last):
        ...
        AttributeError: module 'json' has no attribute 'nope'
    """
    exports = dict(exports)

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = _resolve(package, name, exports[name])
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__, sorted(exports)


def load_all(package: str, exports: dict[str, str]) -> None:
    """Import every export of ``package`` now (a package whose imports register things in a host's registry,
    such as lavis_ext with LAVIS's, calls this when it is not only answering ``--help``)."""
    for name, module_name in exports.items():
        setattr(sys.modules[package], name, _resolve(package, name, module_name))
