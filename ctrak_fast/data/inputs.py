"""Training images as users hold them: image files, PIL images, or the image column of a Hugging
Face `datasets.Dataset`, read a batch at a time (ImageSequence) and preprocessed as diffusers'
training scripts do (images.Preprocess). `training_inputs` turns such a data set, with its
captions, into what `Attributor.featurize` takes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .dataset import ConceptDataset
from .images import Preprocess, image_tensor, load_image


class ImageSequence:
    """N training images, decoded only when a slice is asked for: ``seq[i:j]`` is float32
    [j-i, 3, S, S] in [-1, 1]. A latent model encodes them a batch at a time, so a set larger
    than memory featurizes (only the latents are kept); a pixel model takes :meth:`tensor`.

    items: image paths, PIL images, or a `datasets.Dataset` (its `column` holds the images).
    Image i's random crop or flip is seeded by i (see Preprocess).

    Examples:
        >>> from PIL import Image
        >>> seq = ImageSequence([Image.new("RGB", (20, 10), "red")], 8)
        >>> seq[0:1].shape, round(float(seq[0:1][0, 0, 0, 0]), 3)
        (torch.Size([1, 3, 8, 8]), 1.0)
    """

    def __init__(
        self,
        items: Any,
        image_size: int,
        preprocess: Preprocess | None = None,
        column: str = "image",
    ) -> None:
        self.items, self.image_size, self.column = items, int(image_size), column
        self.preprocess = preprocess or Preprocess()
        if is_hf_dataset(items) and column not in items.column_names:
            raise ValueError(f"the dataset has no column {column!r} (columns {items.column_names})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        if not isinstance(sl, slice):
            raise TypeError("an ImageSequence is read in slices: seq[i:j]")
        start, stop, _ = sl.indices(len(self))
        if is_hf_dataset(self.items):
            batch = self.items[start:stop][self.column]  # decodes only these rows
        else:
            batch = list(self.items[start:stop])
        return torch.stack([self._one(item, start + i) for i, item in enumerate(batch)])

    def _one(self, item: Any, index: int) -> torch.Tensor:
        if isinstance(item, str | os.PathLike):
            return load_image(Path(item), self.image_size, self.preprocess, index)
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            return image_tensor(item, self.image_size, self.preprocess, index, f"image {index}")
        raise TypeError(f"image {index}: a path or a PIL image, got {type(item).__name__}")

    def tensor(self, batch_size: int = 64) -> torch.Tensor:
        """Every image, [N, 3, S, S] (filled a batch at a time)."""
        out = torch.empty(len(self), 3, self.image_size, self.image_size)
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


def is_hf_dataset(obj: Any) -> bool:
    """A Hugging Face `datasets.Dataset` (duck-typed: datasets stays an optional package)."""
    return hasattr(obj, "column_names") and hasattr(obj, "features")


def training_inputs(
    dataset: Any,
    image_size: int,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    preprocess: Preprocess | None = None,
) -> Any:
    """`dataset` as `Attributor.featurize` reads it: a `datasets.Dataset` (its image and caption
    columns) or a tuple (images, captions[, ids]) whose images are paths or PIL images becomes
    (ImageSequence, captions[, ids]); anything else is returned unchanged."""
    if is_hf_dataset(dataset):
        if caption_column not in dataset.column_names:
            raise ValueError(
                f"the dataset has no column {caption_column!r} (columns {dataset.column_names}): "
                "pass caption_column"
            )
        captions = [str(c) for c in dataset[caption_column]]
        return ImageSequence(dataset, image_size, preprocess, image_column), captions
    if isinstance(dataset, tuple) and dataset and _is_image_list(dataset[0]):
        return (ImageSequence(list(dataset[0]), image_size, preprocess), *dataset[1:])
    return dataset


def _is_image_list(images: Any) -> bool:
    if torch.is_tensor(images) or not isinstance(images, Sequence) or not images:
        return False
    first = images[0]
    return isinstance(first, str | os.PathLike) or hasattr(first, "convert")


def sources_of(dataset: Any, ids: torch.Tensor) -> dict[str, Any] | None:
    """The sources record a store keeps of `dataset` (after training_inputs): a ConceptDataset's
    files or generator, or image paths with their captions; None where rows have no name (a
    tensor, PIL images, a `datasets.Dataset`: the result then names ids only)."""
    from .sources import dataset_sources, file_sources

    if isinstance(dataset, ConceptDataset):
        try:
            return dataset_sources(dataset)
        except ValueError:  # a dataset of no folder or generator
            return None
    images = dataset[0] if isinstance(dataset, tuple) else None
    if not isinstance(images, ImageSequence) or not all(
        isinstance(p, str | os.PathLike) for p in images.items
    ):
        return None
    paths = [os.path.abspath(p) for p in images.items]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    conds = dataset[1] if isinstance(dataset[1], list | tuple) else []
    captions = [c if isinstance(c, str) else "" for c in conds]  # captions, or other conditions
    captions = captions if len(captions) == len(paths) else [""] * len(paths)
    return file_sources(root, paths, captions, ids.tolist(), None, images.preprocess)
