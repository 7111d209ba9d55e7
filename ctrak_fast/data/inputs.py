"""Training images as users hold them: image files, PIL images, or the image column of a Hugging
Face `datasets.Dataset`, read a batch at a time (image_sequence.ImageSequence) and preprocessed
as diffusers' training scripts do (images.Preprocess). `training_inputs` turns such a data set,
with its captions, into what `Attributor.featurize` takes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .dataset import ConceptDataset
from .image_sequence import ImageSequence, is_hf_dataset
from .images import Preprocess


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
        images = ImageSequence(list(dataset[0]), image_size, preprocess)
        images.check_files()  # a bad file is refused before the store is touched
        return (images, *dataset[1:])
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
