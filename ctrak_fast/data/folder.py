"""A user's image folder plus a labels file, as a ConceptDataset.

Labels file: JSON {filename: {factor: value, ...}, ...} or CSV with a `filename` column and one
column per factor. Factor values are strings; each factor's values are sorted to give indices.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import ConceptDataset

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _read_labels(labels_file: Path) -> dict[str, dict[str, str]]:
    if not labels_file.is_file():
        raise ValueError(f"labels file not found: {labels_file}")
    if labels_file.suffix.lower() == ".json":
        try:
            raw = json.loads(labels_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{labels_file}: invalid JSON ({e})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise ValueError(f"{labels_file}: expected {{filename: {{factor: value}}}}")
        return {str(k): {str(f): str(v) for f, v in d.items()} for k, d in raw.items()}
    if labels_file.suffix.lower() == ".csv":
        with open(labels_file, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "filename" not in reader.fieldnames:
                raise ValueError(f"{labels_file}: CSV needs a 'filename' column")
            rows = list(reader)
        return {r["filename"]: {k: v for k, v in r.items() if k != "filename"} for r in rows}
    raise ValueError(f"{labels_file}: labels must be .json or .csv")


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """float32 [3, S, S] in [-1, 1]; ValueError naming the file on any problem."""
    if not path.is_file():
        raise ValueError(f"image file missing: {path}")
    if path.suffix.lower() not in _IMAGE_SUFFIXES:
        raise ValueError(f"{path}: not a PNG/JPG file")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in ("RGB", "RGBA", "L", "P"):
                raise ValueError(
                    f"{path}: unsupported image mode {mode!r} (need RGB, RGBA, L or P)"
                )
            if mode == "RGBA":  # composite onto white, the synthetic background
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BOX)
            arr = np.asarray(im, dtype=np.float32)
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{path}: expected 3 channels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: image contains NaN/Inf")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_image_folder(
    root: str | os.PathLike,
    labels_file: str | os.PathLike,
    image_size: int = 16,
    factors: list[str] | None = None,
    values: dict[str, list[str]] | None = None,
) -> ConceptDataset:
    """Load the images named in `labels_file` (paths relative to `root`) into a ConceptDataset.

    Args:
        root: folder holding the images.
        labels_file: JSON or CSV (see module docstring); rows are kept in the file's order and get
            ids 0..N-1 in that order.
        image_size: images are resized (box filter) to image_size x image_size RGB.
        factors: factor order (default: every factor named in the file, in first-seen order).
        values: per-factor value lists fixing the index order (default: sorted values seen);
            pass the training set's `values` to load a query folder with the same indices.

    Returns: ConceptDataset with images float32 [N, 3, S, S] in [-1, 1], labels int64 [N, F].
    Raises ValueError naming the file for a missing/unreadable/non-RGB image or a missing label.
    """
    root, labels_file = Path(root), Path(labels_file)
    table = _read_labels(labels_file)
    if not table:
        raise ValueError(f"{labels_file}: no entries")
    names = list(table)
    if factors is None:  # union of the keys, in first-seen order, so a missing label is caught
        factors = list(dict.fromkeys(f for name in names for f in table[name]))
    factors = list(factors)
    for name in names:
        missing = [f for f in factors if not table[name].get(f)]
        if missing:
            raise ValueError(f"{labels_file}: entry {name!r} has no value for factor(s) {missing}")
    if values is None:
        values = {f: sorted({table[n][f] for n in names}) for f in factors}
    labels = []
    for name in names:
        row = []
        for f in factors:
            v = table[name][f]
            if v not in values[f]:
                raise ValueError(
                    f"{labels_file}: entry {name!r}: unknown {f} value {v!r}; known {values[f]}"
                )
            row.append(values[f].index(v))
        labels.append(row)
    images = torch.stack([load_image(root / name, image_size) for name in names])
    return ConceptDataset(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        ids=torch.arange(len(names), dtype=torch.int64),
        factors=factors,
        values={f: list(values[f]) for f in factors},
        heldout=[],
        meta={"folder": str(root), "labels_file": str(labels_file), "filenames": names},
    )
