"""Input checks run before any work starts, so that bad input costs one clear line, not a
half-written store or a traceback from deep inside a model.

Every check raises :class:`InputError` (a ``ValueError``: the CLI prints it as one line and exits
non-zero) whose message names the offending value, file or sample id. Checks are cheap next to
featurization: one pass over the images at most.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "InputError",
    "NonFiniteFeatures",
    "check_training_data",
    "check_data_matches_model",
    "check_topk",
    "check_input_file",
    "check_input_dir",
    "check_output_dir",
    "check_positive",
]

_SHOW = 5  # ids quoted in a message; the rest are counted


class InputError(ValueError):
    """Input that cannot be used as given; the message says what and where."""


class NonFiniteFeatures(ValueError):
    """Samples whose features (per-sample gradients) are NaN/Inf; ``ids`` lists all of them."""

    def __init__(self, ids: Sequence[int], why: str, hint: str = "") -> None:
        self.ids = [int(i) for i in ids]
        super().__init__(f"{why} for sample id(s) {_ids(self.ids)}" + (f"; {hint}" if hint else ""))


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_SHOW])
    more = f", ... ({len(ids)} in all)" if len(ids) > _SHOW else ""
    return f"[{shown}{more}]"


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def check_topk(k: int, n: int) -> None:
    """``k`` results of ``n`` rows: 1 <= k <= n."""
    check_positive("k", k)
    if k > n:
        raise InputError(f"k={k} is larger than the {n} rows to search")


def check_training_data(images: torch.Tensor, conds: torch.Tensor, ids: torch.Tensor) -> None:
    """images float [N,C,H,W] finite, conds int [N,F], ids int [N] unique; N >= 1.

    Raises:
        InputError: naming the sample ids of non-finite images or duplicated ids.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"images must be float [N, C, H, W], got {images.dtype} {_shape(images)}")
    n = images.shape[0]
    if n == 0:
        raise InputError("empty dataset: nothing to featurize")
    if conds.ndim != 2 or conds.shape[0] != n or conds.is_floating_point():
        raise InputError(f"conditions must be int [{n}, F], got {conds.dtype} {_shape(conds)}")
    if ids.shape != (n,) or ids.is_floating_point():
        raise InputError(f"ids must be int [{n}], got {ids.dtype} {_shape(ids)}")
    bad = ~torch.isfinite(images.reshape(n, -1)).all(1)
    if bad.any():
        raise InputError(f"images of sample id(s) {_ids(ids[bad].tolist())} contain NaN/Inf")
    uniq, counts = torch.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"duplicate sample id(s) {_ids(uniq[counts > 1].tolist())}")


def check_data_matches_model(
    images: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    config: Mapping,
    factors: Sequence[str] | None = None,
    values: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """The images and labels are what the model (its ``config``, e.g. FactorUNet.config) expects.

    Checks image size and channel count, the number of factors, and each label against the
    model's value range. With names on both sides, the factor order and each factor's value list
    must be the model's: labels are indices, and a different order would silently condition the
    model on other values.
    """
    size, channels = config.get("image_size"), config.get("in_channels", 3)
    if images.shape[1] != channels:
        raise InputError(f"images have {images.shape[1]} channel(s), the model expects {channels}")
    if size is not None and tuple(images.shape[2:]) != (size, size):
        h, w = images.shape[2:]
        raise InputError(f"images are {h}x{w} pixels, the model expects {size}x{size}")
    n_values = config.get("n_values")
    if n_values is None:
        return
    if labels.shape[1] != len(n_values):
        raise InputError(f"labels have {labels.shape[1]} factor(s), the model has {len(n_values)}")
    model_factors, model_values = config.get("factors"), config.get("values")
    if factors is not None and model_factors is not None and list(factors) != list(model_factors):
        raise InputError(f"dataset factors {list(factors)} differ from the model's {model_factors}")
    if values and model_values:
        for f in model_factors or []:
            if list(values.get(f, [])) != list(model_values.get(f, [])):
                raise InputError(
                    f"dataset values of factor {f!r} are {list(values.get(f, []))}, the model's "
                    f"are {list(model_values[f])} (labels are indices into that list)"
                )
    for f, n in enumerate(n_values):
        bad = (labels[:, f] < 0) | (labels[:, f] >= n)
        if bad.any():
            name = (model_factors or [f"factor {f}"])[f]
            raise InputError(
                f"labels of {name!r} outside the model's {n} values for sample id(s) "
                f"{_ids(ids[bad].tolist())}"
            )


def check_input_file(path, what: str) -> Path:
    """An existing, readable regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if not p.is_file():
        raise InputError(f"{what} is not a file: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} is not readable: {p}")
    return p


def check_input_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{what} not found or not a directory: {p}")
    return p


def check_output_dir(path, what: str = "output directory") -> Path:
    """A directory that exists and is writable, or can be created: checked without creating
    anything, so a refused run leaves no trace."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{what} {p} exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{what} {p} is not writable")
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {what} {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {what} {p}: {parent} is not writable")
    return p


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)
