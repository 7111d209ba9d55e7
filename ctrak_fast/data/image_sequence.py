"""Training images read from where the user holds them, a batch at a time: ImageSequence, N
image files, PIL images, or the image column of a Hugging Face `datasets.Dataset`, decoded only
when rows are asked for. Featurization reads it batch by batch, so a set larger than memory
featurizes with O(batch) images resident (pixel models), or keeps only its latents (latent
models); a labelled folder (folder.load_image_folder(decode=False)) is one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .images import Preprocess, check_image_file, image_tensor, load_image


class ImageSequence:
    """N training images, decoded only when rows are asked for: ``seq[i:j]`` (or ``seq[rows]``,
    a list or int64 tensor of row numbers) is float32 [n, 3, S, S] in [-1, 1]; nothing is kept.

    items: image paths, PIL images, or a `datasets.Dataset` (its `column` holds the images).
    seeds: the number that seeds each item's random crop or flip (Preprocess), default its
    position; a subset (:meth:`select`) keeps its rows' seeds, so it decodes the same pixels.

    Examples:
        >>> from PIL import Image
        >>> seq = ImageSequence([Image.new("RGB", (20, 10), "red")], 8)
        >>> seq[0:1].shape, round(float(seq[0:1][0, 0, 0, 0]), 3), seq.shape
        (torch.Size([1, 3, 8, 8]), 1.0, (1, 3, 8, 8))
    """

    def __init__(
        self,
        items: Any,
        image_size: int,
        preprocess: Preprocess | None = None,
        column: str = "image",
        seeds: Sequence[int] | None = None,
    ) -> None:
        self.items, self.image_size, self.column = items, int(image_size), column
        self.preprocess = preprocess or Preprocess()
        if is_hf_dataset(items) and column not in items.column_names:
            raise ValueError(f"the dataset has no column {column!r} (columns {items.column_names})")
        self.seeds = list(range(len(items))) if seeds is None else [int(s) for s in seeds]
        if len(self.seeds) != len(items):
            raise ValueError(f"{len(self.seeds)} seeds for {len(items)} images")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, 3, S, S): the shape of :meth:`tensor`, known without decoding anything."""
        return (len(self), 3, self.image_size, self.image_size)

    def __getitem__(self, rows: slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise ValueError("an ImageSequence is read in contiguous slices: seq[i:j]")
            index = list(range(start, stop))
        elif torch.is_tensor(rows) or isinstance(rows, Sequence):
            index = [int(r) for r in rows]
        else:
            raise TypeError("an ImageSequence is read in slices seq[i:j] or lists of rows")
        if not index:
            return torch.empty(0, *self.shape[1:])
        if is_hf_dataset(self.items):  # decodes only these rows
            picked = self.items[index[0] : index[-1] + 1] if rows_run(index) else self.items[index]
            batch = picked[self.column]
        elif rows_run(index):
            batch = list(self.items[index[0] : index[-1] + 1])
        else:
            batch = [self.items[i] for i in index]
        return torch.stack([self._one(item, i) for item, i in zip(batch, index, strict=True)])

    def _one(self, item: Any, row: int) -> torch.Tensor:
        seed = self.seeds[row]
        if isinstance(item, str | os.PathLike):
            return load_image(Path(item), self.image_size, self.preprocess, seed)
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            return image_tensor(item, self.image_size, self.preprocess, seed, f"image {row}")
        raise TypeError(f"image {row}: a path or a PIL image, got {type(item).__name__}")

    def select(self, rows: Sequence[int] | torch.Tensor) -> ImageSequence:
        """The rows `rows` (a bool mask [N] or row numbers) as a new sequence, still on disk."""
        if torch.is_tensor(rows) and rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        index = [int(r) for r in rows]
        items = (
            self.items.select(index)
            if is_hf_dataset(self.items)
            else [self.items[i] for i in index]
        )
        seeds = [self.seeds[i] for i in index]
        return ImageSequence(items, self.image_size, self.preprocess, self.column, seeds)

    def check_files(self) -> None:
        """Every path item is a readable image of an allowed size and mode, its header read
        only (ValueError naming the file): a bad file is refused before featurization starts,
        not when its batch comes up."""
        if is_hf_dataset(self.items):
            return
        for item in self.items:
            if isinstance(item, str | os.PathLike):
                check_image_file(Path(item))

    def tensor(self, batch_size: int = 64) -> torch.Tensor:
        """Every image, [N, 3, S, S] (filled a batch at a time): the whole set in memory."""
        out = torch.empty(self.shape)
        for i in range(0, len(self), batch_size):
            out[i : i + batch_size] = self[i : i + batch_size]
        return out

    def digest(self) -> str:
        """sha256 of the images (a file's bytes, a PIL image's pixels) and the preprocessing:
        what a latent cache is keyed by."""
        h = hashlib.sha256(repr((self.image_size, self.preprocess)).encode())
        for i in range(0, len(self), 64):
            h.update(self[i : i + 64].numpy().tobytes())
        return h.hexdigest()


def rows_run(index: Sequence[int]) -> bool:
    """The rows are one ascending run (i, i+1, ...): read as one slice."""
    return all(b == a + 1 for a, b in zip(index, index[1:], strict=False))


def is_hf_dataset(obj: Any) -> bool:
    """A Hugging Face `datasets.Dataset` (duck-typed: datasets stays an optional package)."""
    return hasattr(obj, "column_names") and hasattr(obj, "features")
