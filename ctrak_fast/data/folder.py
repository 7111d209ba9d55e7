"""A user's image folder plus a labels file, as a ConceptDataset.

Labels file: JSON {filename: {factor: value, ...}, ...}, JSON records {"samples": [...],
"held_out": [...]}, or CSV with a `filename` column and one column per factor (read_labels).
Factor values are strings; each factor's values are sorted to give indices. A value may be
missing (the key absent, `null` or `""`): the caption leaves that factor out, and the model is
told its null token. A second labels file (`truth_file`) can say what such images show.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import posixpath
from pathlib import Path

import torch

from .dataset import ConceptDataset
from .image_sequence import ImageSequence
from .images import Preprocess, load_image


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"lists {dup[:3]} more than once")
    return dict(pairs)


MISSING = ""
"""A factor the caption leaves out (absent, null or "" in the labels file)."""


def _label_value(labels_file: Path, name: str, factor: str, v) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ValueError(f"{labels_file}: entry {name!r}: {factor} must be a string, got {v!r}")
    return str(v).strip() if isinstance(v, str) else str(v)


def image_name(labels_file: Path, name) -> str:
    """A labels file's image path, normalised ('./0.png' and 'sub/../0.png' are '0.png'), so
    that duplicates are found; an absolute path or one that climbs out of the folder is refused
    (symlinks are checked where the folder is known: load_image_folder)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{labels_file}: an entry has no file name ({name!r})")
    norm = posixpath.normpath(name.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"{labels_file}: {name!r} is not a file inside the image folder")
    return norm


def _entry(labels_file: Path, name, d, skip: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{labels_file}: an entry has no file name ({name!r})")
    if not isinstance(d, dict):
        raise ValueError(f"{labels_file}: entry {name!r} is not an object of factor values")
    return name, {
        str(f): _label_value(labels_file, name, str(f), v) for f, v in d.items() if f not in skip
    }


def read_labels(labels_file: str | os.PathLike) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """(filename -> {factor: value}, held-out combinations) of a labels file, in file order.

    Formats (any number of factors; values are strings or integers):

    - JSON mapping: ``{"img/0.png": {"digit": "3", "colour": "red"}, ...}``
    - JSON records: ``{"samples": [{"file": "img/0.png", "digit": "3", ...}, ...],
      "held_out": [{"digit": "3", "colour": "red"}, ...]}`` (``held_out`` optional; each entry
      names the factor values of one combination absent from training, any subset of factors)
    - CSV: a ``filename`` (or ``file``) column and one column per factor.

    A file listed twice, a file that is not UTF-8, a malformed entry: ValueError naming the file.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "l.json"
        >>> _ = p.write_text('{"samples": [{"file": "a.png", "d": 1}], "held_out": [{"d": "2"}]}')
        >>> read_labels(p)
        ({'a.png': {'d': '1'}}, [{'d': '2'}])
    """
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise ValueError(f"labels file not found: {labels_file}")
    try:
        text = labels_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{labels_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = labels_file.suffix.lower()
    try:
        if suffix == ".json":
            return _json_labels(labels_file, json.loads(text, object_pairs_hook=_no_duplicate_keys))
        if suffix == ".csv":
            return _csv_labels(labels_file, text), []
    except json.JSONDecodeError as e:
        raise ValueError(f"{labels_file}: invalid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{labels_file}: invalid JSON (nested too deeply)") from None
    except ValueError as e:
        msg = str(e)
        raise ValueError(
            msg if msg.startswith(str(labels_file)) else f"{labels_file}: {msg}"
        ) from None
    raise ValueError(f"{labels_file}: labels must be .json or .csv")


def _json_labels(labels_file: Path, raw) -> tuple[dict[str, dict[str, str]], list[dict]]:
    if not isinstance(raw, dict):
        raise ValueError('expected {filename: {factor: value}} or {"samples": [...]}')
    if "samples" not in raw:
        return _table(labels_file, (_entry(labels_file, k, d) for k, d in raw.items())), []
    extra = sorted(set(raw) - {"samples", "held_out"})
    if extra:
        raise ValueError(f"unknown top-level keys {extra} (expected samples, held_out)")
    samples, held = raw["samples"], raw.get("held_out", [])
    if not isinstance(samples, list) or not isinstance(held, list):
        raise ValueError("samples and held_out must be lists")
    table = _table(
        labels_file,
        (
            _entry(labels_file, rec.get("file") if isinstance(rec, dict) else None, rec, ("file",))
            for rec in samples
        ),
    )
    combos = [_entry(labels_file, f"held_out[{i}]", c)[1] for i, c in enumerate(held)]
    if any(not c or MISSING in c.values() for c in combos):
        raise ValueError("a held_out combination names no factor, or a factor without a value")
    return table, combos


def _table(labels_file: Path, entries) -> dict[str, dict[str, str]]:
    """filename -> factors, each name normalised (image_name) and listed once."""
    table: dict[str, dict[str, str]] = {}
    for i, (name, row) in enumerate(entries):
        norm = image_name(labels_file, name)
        if norm in table:
            same = "" if norm == name else f" (as {name!r})"
            raise ValueError(f"lists {norm!r} more than once{same}, entry {i + 1}")
        table[norm] = row
    return table


def _csv_labels(labels_file: Path, text: str) -> dict[str, dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip() for f in reader.fieldnames or []]
    dup = sorted({f for f in fields if fields.count(f) > 1})
    if dup:  # DictReader would keep the last column of that name
        raise ValueError(f"the CSV header repeats column(s) {dup}")
    key = "filename" if "filename" in fields else ("file" if "file" in fields else None)
    if key is None:
        raise ValueError("CSV needs a 'filename' column")
    if not [f for f in fields if f and f != key]:
        raise ValueError(f"the CSV has no factor column besides {key!r}")
    reader.fieldnames = fields
    table: dict[str, dict[str, str]] = {}
    for line, r in enumerate(reader, start=2):
        if None in r or any(v is None for v in r.values()):
            raise ValueError(f"line {line} has a different number of columns than the header")
        name = image_name(labels_file, r[key])
        if name in table:
            raise ValueError(f"lists {name!r} twice (line {line})")
        table[name] = {k: v.strip() for k, v in r.items() if k != key}
    return table


def load_image_folder(
    root: str | os.PathLike,
    labels_file: str | os.PathLike,
    image_size: int = 16,
    factors: list[str] | None = None,
    values: dict[str, list[str]] | None = None,
    truth_file: str | os.PathLike | None = None,
    preprocess: Preprocess | None = None,
    decode: bool = True,
) -> ConceptDataset:
    """Load the images named in `labels_file` (paths relative to `root`) into a ConceptDataset.

    Args:
        root: folder holding the images.
        labels_file: JSON or CSV (see module docstring); rows are kept in the file's order and get
            ids 0..N-1 in that order.
        image_size: images are resized on their short side (box filter) and cropped to
            image_size x image_size RGB (see `preprocess`).
        factors: factor order (default: every factor named in the file, in first-seen order).
        values: per-factor value lists fixing the index order (default: sorted values seen);
            pass the training set's `values` to load a query folder with the same indices.
        truth_file: what the images show, where it differs from their captions (a labels file
            of the same format, naming files of `labels_file`); default: the captions.
        preprocess: crop and flip (default: centre crop, no flip, as diffusers' scripts).
        decode: read every image now (a tensor); False: the images stay on disk as an
            ImageSequence decoded a batch at a time (featurization streams it), each file's
            header checked now.

    Returns: ConceptDataset with images float32 [N, 3, S, S] in [-1, 1], captions int64 [N, F]
    (a missing value: the null index n_values[f]) and labels: the truth file's value, else the
    caption's, else unknown (n_values[f]).
    Raises ValueError naming the file for a missing/unreadable/non-RGB image, a factor that no
    image has a value for, or a truth file naming another file or factor.
    """
    root, labels_file = Path(root), Path(labels_file)
    table, held_combos = read_labels(labels_file)
    if not table:
        raise ValueError(f"{labels_file}: no entries")
    names = list(table)
    truth = _read_truth(truth_file, names) if truth_file is not None else {}
    seen_factors = list(dict.fromkeys(f for name in names for f in table[name]))
    if factors is None:  # union of the keys, in first-seen order, so a missing label is caught
        factors = seen_factors
    elif set(factors) != set(seen_factors):
        raise ValueError(
            f"{labels_file}: its factors {seen_factors} are not the model's {list(factors)}: "
            "pass --model, the model trained on these labels (`ctrak train --folder`)"
        )
    factors = list(factors)
    unknown = sorted({f for row in truth.values() for f in row} - set(factors))
    if unknown:
        raise ValueError(f"{truth_file}: factor(s) {unknown} are not in {labels_file}")
    if values is None:
        named = {f: {c[f] for c in held_combos if f in c} for f in factors}
        stated = {
            f: {src[n].get(f, MISSING) for src in (table, truth) for n in names if n in src}
            for f in factors
        }
        values = {f: sorted((stated[f] | named[f]) - {MISSING}) for f in factors}
        empty = [f for f in factors if not values[f]]
        if empty:
            raise ValueError(f"{labels_file}: no image has a value for factor(s) {empty}")

    def index(name: str, f: str, v: str) -> int:
        if v == MISSING:
            return len(values[f])
        if f not in values:
            raise ValueError(f"{labels_file}: {name}: unknown factor {f!r}; factors {factors}")
        if v not in values[f]:
            raise ValueError(
                f"{labels_file}: entry {name!r}: unknown {f} value {v!r}; known {values[f]}"
            )
        return values[f].index(v)

    captions = [[index(name, f, table[name].get(f, MISSING)) for f in factors] for name in names]
    labels = [list(row) for row in captions]  # the truth: the captions where no file says
    for i, name in enumerate(names):
        for j, f in enumerate(factors):
            shown = truth.get(name, {}).get(f, MISSING)
            if shown != MISSING:
                labels[i][j] = index(name, f, shown)
    heldout = _expand_heldout(labels_file, held_combos, factors, values, index)
    present = set(map(tuple, labels)) & set(heldout)
    if present:
        shown = {f: values[f][v] for f, v in zip(factors, sorted(present)[0], strict=True)}
        raise ValueError(f"{labels_file}: held-out combination {shown} has training images")
    if not factors:
        raise ValueError(f"{labels_file}: its entries name no factor")
    paths = [contained(root, name, labels_file) for name in names]
    images: torch.Tensor | ImageSequence
    if decode:
        decoded = [load_image(p, image_size, preprocess, i) for i, p in enumerate(paths)]
        images = torch.stack(decoded)
    else:
        images = ImageSequence(paths, image_size, preprocess)
        images.check_files()
    return ConceptDataset(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        ids=torch.arange(len(names), dtype=torch.int64),
        factors=factors,
        values={f: list(values[f]) for f in factors},
        heldout=heldout,
        meta={
            "folder": str(root),
            "labels_file": str(labels_file),
            "filenames": names,
            "preprocess": (preprocess or Preprocess()).to_dict(),
        },
        captions=torch.tensor(captions, dtype=torch.int64),
    )


def contained(root: Path, name: str, labels_file: Path) -> Path:
    """root / name, refused (ValueError) unless it resolves inside root, symlinks included."""
    path = root / name
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise ValueError(f"{labels_file}: {name!r} leads outside the image folder {root}")
    return path


def _read_truth(truth_file, names: list[str]) -> dict[str, dict[str, str]]:
    """The truth file's table; every file it names must be one of `names`."""
    table, _ = read_labels(truth_file)
    stray = [n for n in table if n not in set(names)]
    if stray:
        raise ValueError(f"{truth_file}: names {stray[:3]}, not in the labels file")
    return table


def _expand_heldout(labels_file, combos, factors, values, index) -> list[tuple[int, ...]]:
    """Full value tuples of the held-out combinations; a factor a combination does not name
    ranges over all its values."""
    out: list[tuple[int, ...]] = []
    for i, combo in enumerate(combos):
        axes = [
            [index(f"held_out[{i}]", f, combo[f])] if f in combo else range(len(values[f]))
            for f in factors
        ]
        unknown = sorted(set(combo) - set(factors))
        if unknown:
            raise ValueError(f"{labels_file}: held_out[{i}] names unknown factor(s) {unknown}")
        out.extend(t for t in itertools.product(*axes) if t not in out)
    return out
