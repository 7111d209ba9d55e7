"""Captions of labelled images ("a red triangle"): the prompts of text-to-image models trained on
a ConceptDataset; and a folder's caption file (read_captions, for `ctrak t2i featurize`)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

from .folder import contained, image_name

# Where a factor's word goes: before the noun, as the noun, or in a phrase after it.
ADJECTIVES, NOUNS = ("colour",), ("shape",)
SUFFIX = {"texture": "with {}", "background": "on a {} background"}


def caption(factors: list[str], values: dict[str, list[str]], label_row, keep=None) -> str:
    """Caption of one labelled image; factors with keep[f] False, or whose value is the factor's
    null index (len(values[f]): a caption that leaves it out), are left out; "" if none is kept.

    Examples:
        >>> v = {"shape": ["circle", "triangle"], "colour": ["red", "blue"]}
        >>> caption(["shape", "colour"], v, [1, 0])
        'a red triangle'
        >>> caption(["shape", "colour"], v, [1, 0], keep=[False, True])
        'a red'
        >>> caption(["shape", "colour"], v, [2, 0])  # the shape's null index: not captioned
        'a red'
    """
    keep = [True] * len(factors) if keep is None else list(keep)
    keep = [k and int(v) < len(values[f]) for f, v, k in zip(factors, label_row, keep, strict=True)]
    if not any(keep):
        return ""
    pre, noun, suffix = [], [], []
    for f, v, k in zip(factors, label_row, keep, strict=True):
        if not k:
            continue
        word = values[f][int(v)]
        if f in ADJECTIVES:
            pre.append(word)
        elif f in NOUNS:
            noun.append(word)
        else:
            suffix.append(SUFFIX.get(f, f"with {f} {{}}").format(word))
    return " ".join(["a", *pre, *noun, *suffix])


def read_captions(
    root: str | Path,
    captions_file: str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> tuple[list[Path], list[str]]:
    """The image files of a folder and their captions, in sorted file-name order (ids 0..N-1).

    captions_file: `metadata.jsonl` or `metadata.csv` (the Hugging Face imagefolder convention:
    a `file_name` column and a `text` or `caption` column; default <root>/metadata.jsonl, else
    <root>/metadata.csv), or JSON {file_name: caption}. image_column / caption_column: other
    column names (diffusers' --image_column / --caption_column). Images of the folder that no
    row names are left out, counted and named in one warning.
    """
    root = Path(root)
    path = Path(captions_file) if captions_file else root / "metadata.jsonl"
    if not captions_file and not path.is_file() and (root / "metadata.csv").is_file():
        path = root / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    try:
        table = _caption_table(path, suffix, image_column, caption_column)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a captions file ({type(e).__name__}: {first})") from None
    if not table:
        raise ValueError(f"{path}: no captions")
    names = [image_name(path, n) for n in table]  # normalised: ./a.png is a.png
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: names one image twice (after normalising the paths)")
    table = {n: c for n, c in zip(names, table.values(), strict=True)}
    missing = [n for n in table if not contained(root, n, path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} captioned image(s) missing, e.g. {root / missing[0]}"
        )
    names = sorted(table)
    warn_uncaptioned(root, set(names))
    return [root / n for n in names], [table[n] for n in names]


def warn_uncaptioned(root: Path, named: set[str]) -> None:
    """One warning counting and naming the folder's images that no caption row names."""
    from .images import IMAGE_SUFFIXES

    found = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    left = [n for n in found if n not in named]
    if left:
        shown = ", ".join(left[:5]) + (f", ... ({len(left) - 5} more)" if len(left) > 5 else "")
        warnings.warn(
            f"{len(left)} image(s) in {root} have no caption row and are left out: {shown}",
            UserWarning,
            stacklevel=3,
        )


def _columns(
    row: dict[str, Any], path: Path, image_column: str | None, caption_column: str | None
) -> tuple[str, str]:
    """The file-name and caption columns of a metadata row: the ones asked for, else
    file_name (or filename) and text (or caption)."""
    name = image_column or ("file_name" if "file_name" in row else "filename")
    text = caption_column or ("text" if "text" in row else "caption")
    missing = [c for c in (name, text) if c not in row]
    if missing:
        raise ValueError(
            f"no column {missing[0]!r} (columns: {sorted(row)}): pass --image-column / "
            "--caption-column"
        )
    return name, text


def _caption_table(
    path: Path, suffix: str, image_column: str | None = None, caption_column: str | None = None
) -> dict[str, str]:
    if suffix in (".jsonl", ".csv"):
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError("expected one object per row")
        name_col, text_col = _columns(rows[0], path, image_column, caption_column)
        table = {r[name_col]: r[text_col] for r in rows}
    elif suffix == ".json":
        table = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    else:
        raise ValueError(f"{path}: captions must be .jsonl, .json or .csv")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ValueError("file names and captions must be strings")
    return table
