"""A training set's sources record (which image file, or which generator, each store row came
from, and its caption) and the images it names, read back for a gallery.

The record is what a store keeps as its sources.json (ctrak_fast.engine.store.sources): an image
folder's rows name their files relative to the folder (``root``); generated data (the shipped
synthetic sets, a saved ConceptDataset file) names its generator, which draws the same images
again. Captions are what the model was told for the row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .dataset import ConceptDataset
from .folder import contained, image_name
from .images import Preprocess, load_image


def file_sources(
    root: str | os.PathLike[str],
    files: Sequence[str | os.PathLike[str]],
    captions: Sequence[str],
    ids: Sequence[int],
    labels: Sequence[dict[str, str]] | None = None,
    preprocess: Preprocess | None = None,
) -> dict[str, Any]:
    """The record of images in the folder `root`: their paths as `open` takes them (absolute, or
    relative to the current directory, as `root` is), each inside root; one caption and id per
    file, optionally each file's {factor: value} labels, and how the images were cropped and
    flipped (`preprocess`, default centre crop, no flip). The record names each file relative
    to root, and root as an absolute path. ValueError for a file outside root.

    Examples:
        >>> r = file_sources("/data", ["/data/a.png", "/data/b/c.png"], ["a cat", "a dog"], [0, 1])
        >>> r["files"], r["captions"], r["root"]
        (['a.png', 'b/c.png'], ['a cat', 'a dog'], '/data')
    """
    top = Path(os.path.abspath(root))
    names = []
    for f in files:
        try:  # one reading of a relative path, the one `open` has: "images/0.png" under "images"
            rel = Path(os.path.abspath(f)).relative_to(top)
        except ValueError:
            raise ValueError(f"{f} is not a file inside the image folder {root}") from None
        names.append(image_name(top, rel.as_posix()))
    record: dict[str, Any] = {
        "root": str(top),
        "files": names,
        "captions": [str(c) for c in captions],
        "ids": [int(i) for i in ids],
        "preprocess": (preprocess or Preprocess()).to_dict(),
    }
    if labels is not None:
        record["labels"] = [dict(row) for row in labels]
    return record


def dataset_sources(
    data: ConceptDataset,
    captions: Sequence[str] | None = None,
    dataset_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The record of a ConceptDataset: its files (a labelled folder), or its generator (the
    synthetic config, or `dataset_file`, the saved ConceptDataset it was loaded from, with the
    file's sha256). captions: what the model was told per row (default: the factor values the
    caption states, e.g. 'shape=circle, colour=red'); labels: what each image shows."""
    if captions is None:
        told_rows = data.labels if data.captions is None else data.captions
        captions = [told(data, row) for row in told_rows.tolist()]
    labels = [
        {f: data.values[f][v] if v < len(data.values[f]) else "?" for f, v in pairs}
        for pairs in (zip(data.factors, row, strict=True) for row in data.labels.tolist())
    ]
    ids = data.ids.tolist()
    if "filenames" in data.meta and "folder" in data.meta:
        folder = Path(data.meta["folder"])  # ids are the folder's row numbers
        by_row = [folder / data.meta["filenames"][i] for i in ids]
        crop = Preprocess(**data.meta.get("preprocess", {}))
        return file_sources(folder, by_row, captions, ids, labels, crop)
    if dataset_file is not None:
        digest = hashlib.sha256(Path(dataset_file).read_bytes()).hexdigest()
        generator = {"dataset_file": os.path.abspath(dataset_file), "sha256": digest}
    elif "synthetic" in data.meta:
        generator = {"synthetic": data.meta["synthetic"], "split": data.meta.get("split", "train")}
    else:
        raise ValueError("a dataset of no folder, file or generator: its rows cannot be named")
    return {"generator": generator, "captions": list(captions), "ids": ids, "labels": labels}


def told(data: ConceptDataset, caption_row: Sequence[int]) -> str:
    """The factor values a caption row states ('shape=circle, colour=red'; '' when none)."""
    pairs = zip(data.factors, caption_row, strict=True)
    return ", ".join(f"{f}={data.values[f][v]}" for f, v in pairs if v < len(data.values[f]))


def source_images(
    record: dict[str, Any],
    ids: Sequence[int],
    image_size: int,
    image_root: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """The images of rows `ids` [n, 3, S, S] in [-1, 1], read as the store's record says: only
    these files are opened (a gallery of 15 images reads 15 files). image_root: where the folder
    is now, if it moved since the store was made. ValueError naming what is missing."""
    known = {int(i): r for r, i in enumerate(record["ids"])}
    unknown = [i for i in ids if int(i) not in known]
    if unknown:
        raise ValueError(f"ids {unknown[:5]} are not rows of the store's sources record")
    rows = [known[int(i)] for i in ids]
    if "files" in record:
        root = Path(image_root or record["root"])
        paths = [contained(root, record["files"][r], root) for r in rows]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(paths)} training images to draw are missing, e.g. "
                f"{missing[0]} (the store records the folder {record['root']}): pass "
                "--image-root DIR where its images are now"
            )
        crop = Preprocess(**record.get("preprocess", {}))
        pairs = zip(paths, ids, strict=True)
        return torch.stack([load_image(p, image_size, crop, int(i)) for p, i in pairs])
    data = generated(record["generator"])
    row_of = {int(i): r for r, i in enumerate(data.ids.tolist())}
    lost = [i for i in ids if int(i) not in row_of]
    if lost:
        raise ValueError(f"the store's generator draws no rows of ids {lost[:5]}")
    images = data.images[[row_of[int(i)] for i in ids]]
    if images.shape[-1] != image_size:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size))
    return images


def generated(generator: dict[str, Any]) -> ConceptDataset:
    """The ConceptDataset a sources record's generator draws (ValueError if it cannot)."""
    from .synthetic import SyntheticConfig, make_dataset

    if "synthetic" in generator:
        cfg = SyntheticConfig.from_dict(generator["synthetic"])
        return make_dataset(cfg, generator.get("split", "train"))
    path = Path(generator.get("dataset_file", ""))
    if not path.is_file():
        raise ValueError(f"the store's dataset file {path} is missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != generator.get("sha256"):
        raise ValueError(f"the store's dataset file {path} changed since the store was made")
    return ConceptDataset.load(path)


def source_names(record: dict[str, Any], ids: Sequence[int]) -> dict[str, list[Any]]:
    """{"files": [...], "captions": [...]} of rows `ids` (files only for a folder's record)."""
    row_of = {int(i): r for r, i in enumerate(record["ids"])}
    rows = [row_of.get(int(i)) for i in ids]
    out: dict[str, list[Any]] = {}
    for key in ("files", "captions"):
        if key in record:
            out[key] = [None if r is None else record[key][r] for r in rows]
    return out
