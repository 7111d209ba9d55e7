"""Lazy access to the compiled extension ``ctrak_fast._C``.

``import ctrak_fast`` never needs the extension; code that wants the native engines calls
:func:`load`, which imports it once and raises an ImportError that says how to build it.

Examples:
    >>> from ctrak_fast.engine import native
    >>> if native.available():
    ...     C = native.load()
    ...     C.cpu_isa() in C.cpu_isas()
    True
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

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
            _module = importlib.import_module("ctrak_fast._C")
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


# ---- the fused projection kernel ------------------------------------------------------------


def native_available() -> bool:
    """True when the compiled extension providing ``rademacher_tile`` imports."""
    try:
        native_tile_fn()
    except Exception:  # any failure to load means "not available"
        return False
    return True


def native_tile_fn():
    return load().rademacher_tile


def native_project_fn():
    return load().rademacher_project


def native_project_into(out: torch.Tensor, x: torch.Tensor, seed: int, row_start: int) -> None:
    """out [B, k] (float32, C-contiguous, CPU) += x [B, n] @ P[row_start : row_start + n] with the
    fused C++ kernel on ``torch.get_num_threads()`` threads (so set_num_threads governs it)."""
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if (x.shape[1] > 1 and x.stride(1) != 1) or (x.shape[0] > 1 and x.stride(0) < 1):
        x = x.contiguous()  # the kernel takes contiguous rows at a positive stride
    if x.numel():
        k = out.shape[1]
        native_project_fn()(seed, row_start, x.numpy(), k, out.numpy(), torch.get_num_threads())


def native_grid_rows() -> int:
    return int(load().PROJECT_GRID_ROWS)


__all__ = [
    "BUILD_HINT",
    "available",
    "has_cuda",
    "load",
    "native_available",
    "native_project_into",
]
