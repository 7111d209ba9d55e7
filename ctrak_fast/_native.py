"""Lazy access to the compiled extension ``ctrak_fast._C``.

``import ctrak_fast`` never needs the extension; code that wants the native engines calls
:func:`load`, which imports it once and raises an ImportError that says how to build it.

Examples:
    >>> from ctrak_fast import _native
    >>> if _native.available():
    ...     C = _native.load()
    ...     C.cpu_isa() in C.cpu_isas()
    True
"""

from __future__ import annotations

import importlib
from types import ModuleType

BUILD_HINT = (
    "ctrak_fast._C is not built: run `pip install --no-build-isolation -e .` from the repository "
    "root (needs cmake and a C++17 compiler; `./dev setup` does it)"
)

_module: ModuleType | None = None
_failure: ImportError | None = None  # first import error, kept so later calls stay cheap


def load() -> ModuleType:
    """Import and cache ``ctrak_fast._C``.

    Raises:
        ImportError: the extension is missing or does not load; the message names the fix and
            the original error.
    """
    global _module, _failure
    if _module is None and _failure is None:
        try:
            _module = importlib.import_module(f"{__package__}._C")
        except ImportError as e:
            _failure = e
    if _module is None:
        raise ImportError(f"{BUILD_HINT}. Original error: {_failure}") from _failure
    return _module


def available() -> bool:
    """True when ``ctrak_fast._C`` imports."""
    try:
        load()
    except ImportError:
        return False
    return True


def has_cuda() -> bool:
    """True when ``ctrak_fast._C`` imports and was compiled with the CUDA engine."""
    return available() and bool(load().has_cuda())


__all__ = ["BUILD_HINT", "available", "has_cuda", "load"]
