"""ConceptDataset: labelled images (one value index per factor), what every data source returns.

Two label sets are kept apart: `labels`, what each image shows (the ground truth of every
benchmark), and `captions`, what the model is told (training and featurization). They differ where
a caption leaves a factor out: that factor's caption is the model's null token, index n_values[f].
In `labels` the same index means "unknown" (a folder whose caption leaves the factor out and whose
truth file does not say): such an image counts as a carrier of no value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctrak_fast.engine.atomic import atomic_path

from .image_sequence import ImageSequence

_FORMAT = "ctrak-concept-dataset/1"


@dataclass
class ConceptDataset:
    """Images labelled with one value index per factor.

    Attributes:
        images: float32 [N, 3, H, W] in [-1, 1], or an ImageSequence of the same shape: files
            still on disk, decoded a batch at a time (a folder loaded with decode=False), so
            featurization streams them.
        labels: int64 [N, F]; labels[i, f] indexes values[factors[f]]: what image i shows
            (n_values[f]: unknown).
        ids: int64 [N] stable sample ids (what attribution results refer to).
        factors: F factor names, e.g. ["shape", "colour"].
        values: factor name -> list of value names.
        heldout: (shape_idx, colour_idx) pairs absent from the data (synthetic data; [] otherwise).
        meta: free-form JSON-serialisable provenance (e.g. the SyntheticConfig).
        captions: int64 [N, F], what the model is told of each image: labels[i, f], or the null
            index n_values[f] where the caption leaves factor f out. None: the labels.
        marks: int64 [N, 4], where an uncaptioned mark is stamped on image i (x0, y0, x1, y1;
            -1 where none: data/marks.py); None: no image carries one.

    Examples:
        >>> d = ConceptDataset(torch.zeros(2, 3, 8, 8), torch.tensor([[0, 1], [1, 0]]),
        ...                    torch.arange(2), ["shape", "colour"],
        ...                    {"shape": ["circle", "square"], "colour": ["red", "blue"]})
        >>> len(d), d.describe(d.labels[0])
        (2, 'shape=circle, colour=blue')
    """

    images: torch.Tensor | ImageSequence
    labels: torch.Tensor
    ids: torch.Tensor
    factors: list[str]
    values: dict[str, list[str]]
    heldout: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    captions: torch.Tensor | None = None
    marks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        images = self.images  # an ImageSequence is float32 [N, 3, S, S] by construction
        if isinstance(images, torch.Tensor) and (
            images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.float32
        ):
            raise ValueError(
                f"images must be float32 [N,3,H,W], got {images.dtype} {tuple(images.shape)}"
            )
        if self.labels.shape != (n, len(self.factors)) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 [{n},{len(self.factors)}], got {tuple(self.labels.shape)}"
            )
        if self.ids.shape != (n,) or self.ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64 [{n}], got {tuple(self.ids.shape)}")
        for f, name in enumerate(self.factors):
            if n and (
                self.labels[:, f].min() < 0 or self.labels[:, f].max() > len(self.values[name])
            ):
                raise ValueError(
                    f"labels of factor {name!r} out of range [0, {len(self.values[name])}] "
                    "(the last index: unknown)"
                )
        if self.captions is None:
            self.captions = self.labels
        if self.captions.shape != self.labels.shape or self.captions.dtype != torch.int64:
            raise ValueError(
                f"captions must be int64 {tuple(self.labels.shape)}, got "
                f"{self.captions.dtype} {tuple(self.captions.shape)}"
            )
        for f, name in enumerate(self.factors):
            if n and (
                self.captions[:, f].min() < 0 or self.captions[:, f].max() > len(self.values[name])
            ):
                raise ValueError(
                    f"captions of factor {name!r} out of range [0, {len(self.values[name])}] "
                    "(the last index is the null token: not captioned)"
                )
        if self.marks is not None and (
            self.marks.shape != (n, 4) or self.marks.dtype != torch.int64
        ):
            raise ValueError(f"marks must be int64 [{n}, 4], got {tuple(self.marks.shape)}")
        self.heldout = [tuple(int(v) for v in p) for p in self.heldout]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def n_values(self) -> list[int]:
        """Number of values per factor, in `factors` order (model embedding rows minus the null)."""
        return [len(self.values[f]) for f in self.factors]

    @property
    def marked(self) -> torch.Tensor:
        """bool [N]: image i carries the stamped mark (never captioned)."""
        if self.marks is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.marks[:, 0] >= 0

    @property
    def known(self) -> torch.Tensor:
        """bool [N]: every factor of image i has a known value (benchmark and judge rows)."""
        return (self.labels < torch.tensor(self.n_values, dtype=torch.int64)).all(1)

    def combos(self) -> list[tuple[int, ...]]:
        """The fully known label combinations present, sorted."""
        return sorted({tuple(r) for r in self.labels[self.known].tolist()})

    @property
    def uncaptioned(self) -> torch.Tensor:
        """bool [N, F]: factor f of image i is not in its caption."""
        return self.captions == torch.tensor(self.n_values, dtype=torch.int64)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def describe(self, label_row) -> str:
        """Human-readable condition, e.g. 'shape=circle, colour=red'."""
        pairs = zip(self.factors, label_row, strict=True)
        return ", ".join(
            f"{f}={self.values[f][int(v)] if int(v) < len(self.values[f]) else '?'}"
            for f, v in pairs
        )

    def subset(self, mask_or_index) -> ConceptDataset:
        """Rows selected by a boolean mask [N] or an index tensor; metadata shared."""
        images = self.images
        return ConceptDataset(
            images.select(mask_or_index)
            if isinstance(images, ImageSequence)
            else images[mask_or_index],
            self.labels[mask_or_index],
            self.ids[mask_or_index],
            list(self.factors),
            {k: list(v) for k, v in self.values.items()},
            list(self.heldout),
            dict(self.meta),
            self.captions[mask_or_index],
            None if self.marks is None else self.marks[mask_or_index],
        )

    def train_subset(self, per_combo: int) -> ConceptDataset:
        """The first `per_combo` rows of every combination present (deterministic)."""
        keep = torch.zeros(len(self), dtype=torch.bool)
        for combo in torch.unique(self.labels, dim=0):
            rows = (self.labels == combo).all(1).nonzero().flatten()[:per_combo]
            keep[rows] = True
        return self.subset(keep)

    def save(self, path: str | os.PathLike) -> None:
        """Write to one safetensors file (tensors + JSON metadata); atomic (tmp file + rename).
        Images still on disk are decoded into it."""
        path = Path(path)
        header = {
            "format": _FORMAT,
            "factors": self.factors,
            "values": self.values,
            "heldout": [list(p) for p in self.heldout],
            "meta": self.meta,
        }
        tensors = {
            "images": images_tensor(self.images).contiguous(),
            "labels": self.labels.contiguous(),
            "ids": self.ids.contiguous(),
        }
        if not torch.equal(self.captions, self.labels):
            tensors["captions"] = self.captions.contiguous()
        if self.marks is not None:
            tensors["marks"] = self.marks.contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"ctrak": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptDataset:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("ctrak", "{}"))
            if header.get("format") != _FORMAT:
                raise ValueError(
                    f"{path}: not a ctrak concept dataset (format {header.get('format')!r})"
                )
            t = {k: f.get_tensor(k) for k in ("images", "labels", "ids")}
            captions = f.get_tensor("captions") if "captions" in f.keys() else None
            marks = f.get_tensor("marks") if "marks" in f.keys() else None
        return cls(
            t["images"],
            t["labels"],
            t["ids"],
            header["factors"],
            header["values"],
            [tuple(p) for p in header["heldout"]],
            header.get("meta", {}),
            captions,
            marks,
        )


def images_tensor(images: torch.Tensor | ImageSequence) -> torch.Tensor:
    """The images in memory, [N, 3, H, W] (an ImageSequence decoded whole)."""
    return images.tensor() if isinstance(images, ImageSequence) else images


def drop_captions(
    labels: torch.Tensor, n_values: list[int], fraction: float, seed: int
) -> torch.Tensor:
    """Captions of `labels` [N, F] (int64) with factor f replaced by its null index n_values[f]
    on round(fraction * N) rows, drawn independently for each factor from `seed`.

    Examples:
        >>> c = drop_captions(torch.zeros(4, 2, dtype=torch.int64), [3, 5], 0.5, seed=0)
        >>> (c == torch.tensor([3, 5])).sum(0).tolist()
        [2, 2]
    """
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 0xCA9)
    captions = labels.clone()
    n_drop = round(fraction * len(labels))
    for f, null in enumerate(n_values):
        rows = torch.randperm(len(labels), generator=gen)[:n_drop]
        captions[rows, f] = null
    return captions
