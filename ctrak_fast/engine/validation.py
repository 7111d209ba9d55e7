"""Input checks run before any work starts, so that bad input costs one clear line, not a
half-written store or a traceback from deep inside a model.

Every check raises :class:`InputError` (a ``ValueError``: the CLI prints it as one line and exits
non-zero) whose message names the offending value, file or sample id. Checks are cheap next to
featurization: one pass over the images at most.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "InputError",
    "NonFiniteFeatures",
    "check_training_data",
    "check_image_rows",
    "check_device",
    "check_input_file",
    "check_input_dir",
    "check_output_dir",
    "check_output_path",
    "check_outputs",
    "check_positive",
    "show_ids",
]

_SHOW = 5  # ids quoted in a message; the rest are counted


class InputError(ValueError):
    """Input that cannot be used as given; the message says what and where."""


class NonFiniteFeatures(ValueError):
    """Samples whose features (per-sample gradients) are not finite; ``ids``: those of the batch
    where they were found."""

    def __init__(self, ids: Sequence[int], why: str, hint: str = "") -> None:
        self.ids = [int(i) for i in ids]
        super().__init__(
            f"{why} for sample id(s) {show_ids(self.ids)}" + (f"; {hint}" if hint else "")
        )


def show_ids(ids: Sequence[int]) -> str:
    """Sample ids for an error message: the first few, and how many in all."""
    shown = ", ".join(str(int(i)) for i in ids[:_SHOW])
    more = f", ... ({len(ids)} in all)" if len(ids) > _SHOW else ""
    return f"[{shown}{more}]"


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def check_training_data(images, conds, ids: torch.Tensor) -> None:
    """images float [N, C, H, W] (pixels or latents), finite, or a row source read a batch at a
    time (``len``, ``.shape`` [N, C, H, W], ``images[i:j]`` a float tensor: see
    ctrak_fast.method.rows), whose batches are checked as they are read (check_image_rows);
    conds: N conditions of any kind (a tensor [N, ...], finite if floating, or a sequence such
    as captions); ids int [N], unique; N >= 1.

    Raises:
        InputError: naming the sample ids of non-finite images or conditions, or duplicated ids.
    """
    in_memory = isinstance(images, torch.Tensor)
    if len(images.shape) != 4 or (in_memory and not images.is_floating_point()):
        what = images.dtype if in_memory else type(images).__name__
        raise InputError(f"images must be float [N, C, H, W], got {what} {_shape(images)}")
    n = images.shape[0]
    if n == 0:
        raise InputError("empty dataset: nothing to featurize")
    if ids.shape != (n,) or ids.is_floating_point():
        raise InputError(f"ids must be int [{n}], got {ids.dtype} {_shape(ids)}")
    if conds is not None and len(conds) != n:
        raise InputError(f"{len(conds)} conditions for {n} images")
    if in_memory:
        check_image_rows(images, ids)
    if isinstance(conds, torch.Tensor) and conds.is_floating_point():
        bad = ~torch.isfinite(conds.reshape(n, -1)).all(1)
        if bad.any():
            raise InputError(
                f"conditions of sample id(s) {show_ids(ids[bad].tolist())} are NaN/Inf"
            )
    uniq, counts = torch.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"duplicate sample id(s) {show_ids(uniq[counts > 1].tolist())}")


def check_image_rows(images: torch.Tensor, ids: torch.Tensor) -> None:
    """images [n, ...] finite (InputError naming the ids of the rows that are not)."""
    bad = ~torch.isfinite(images.reshape(len(images), -1)).all(1)
    if bad.any():
        raise InputError(f"images of sample id(s) {show_ids(ids[bad].tolist())} contain NaN/Inf")


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


def check_output_path(path, what: str = "output file") -> Path:
    """A file path whose directory exists and is writable, and that is not a directory: checked
    before the work, so a run is not refused only after computing its result."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise InputError(f"cannot write {what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {p}: {parent} is not writable")
    return p


def check_outputs(outputs: Mapping[str, object], inputs: Mapping[str, object]) -> None:
    """Output files (flag -> path, None: not given) that may be written: each in an existing,
    writable directory (check_output_path), none the same file as an input of the command
    (flag -> path; resolved, symlinks and hard links included) or as another output, and none
    inside a feature store (a folder holding manifest.json). Run before any work: a refused
    command has computed nothing and overwritten nothing."""
    given = {flag: Path(str(p)) for flag, p in outputs.items() if p is not None}
    sources = {flag: Path(str(p)) for flag, p in inputs.items() if p is not None}
    seen: dict[Path, str] = {}
    for flag, path in given.items():
        check_output_path(path, f"{flag} file")
        real = path.resolve()
        if real in seen:
            raise InputError(f"{flag} and {seen[real]} name the same file {path}")
        seen[real] = flag
        for src_flag, src in sources.items():
            if _same_file(real, src):
                raise InputError(f"{flag} {path} is the input {src_flag}: it would be overwritten")
        for parent in real.parents:
            if _is_store(parent):
                raise InputError(f"{flag} {path} is inside the feature store {parent}")


def _is_store(folder: Path) -> bool:
    """A FeatureStore's folder (its manifest.json names shards and k), not any folder that
    happens to hold a file of that name."""
    manifest = folder / "manifest.json"
    try:
        if not manifest.is_file() or manifest.stat().st_size > 1 << 26:
            return False
        m = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and "shards" in m and "k" in m


def _same_file(real: Path, src: Path) -> bool:
    if real == src.resolve():
        return True
    try:  # another name of the same inode (a hard link)
        return real.exists() and src.exists() and os.path.samefile(real, src)
    except OSError:
        return False


def check_device(name: str | None, what: str = "--device") -> torch.device | None:
    """A torch device this build and machine can use (None: the default); InputError naming
    it otherwise ('bogus', or 'cuda' on a CPU-only build or a machine without a GPU)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"{what} {name!r} is not a device (cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what} {name!r}: this build or machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{what} {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"{what} {name!r}: only cpu and cuda devices are supported")
    return device


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)
