"""Captions of labelled images ("a red triangle"): the prompts of text-to-image models trained on
a ConceptDataset; and a folder's caption file (read_captions, for `ctrak t2i featurize`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .folder import contained, image_name

# Where a factor's word goes: before the noun, as the noun, or in a phrase after it.
ADJECTIVES, NOUNS = ("colour",), ("shape",)
SUFFIX = {"texture": "with {}", "background": "on a {} background"}


def caption(factors: list[str], values: dict[str, list[str]], label_row, keep=None) -> str:
    """Caption of one labelled image; factors with keep[f] False are left out, "" if none is kept.

    Examples:
        >>> v = {"shape": ["circle", "triangle"], "colour": ["red", "blue"]}
        >>> caption(["shape", "colour"], v, [1, 0])
        'a red triangle'
        >>> caption(["shape", "colour"], v, [1, 0], keep=[False, True])
        'a red'
    """
    keep = [True] * len(factors) if keep is None else list(keep)
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


def read_captions(root, captions_file=None) -> tuple[list[Path], list[str]]:
    """The image files of a folder and their captions, in sorted file-name order (ids 0..N-1).

    captions_file: `metadata.jsonl` (one {"file_name": ..., "text": ...} per line, the Hugging Face
    imagefolder convention; default <root>/metadata.jsonl), JSON {file_name: caption}, or CSV
    with columns file_name (or filename) and text (or caption).
    """
    root = Path(root)
    path = Path(captions_file) if captions_file else root / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    try:
        table = _caption_table(path, suffix)
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
    return [root / n for n in names], [table[n] for n in names]


def _caption_table(path: Path, suffix: str) -> dict[str, str]:
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        table = {r["file_name"]: r["text"] for r in rows}
    elif suffix == ".json":
        table = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    elif suffix == ".csv":
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        name_col = "file_name" if rows and "file_name" in rows[0] else "filename"
        text_col = "text" if rows and "text" in rows[0] else "caption"
        if not rows or name_col not in rows[0] or text_col not in rows[0]:
            raise ValueError(f"{path}: CSV needs file_name/filename and text/caption columns")
        table = {r[name_col]: r[text_col] for r in rows}
    else:
        raise ValueError(f"{path}: captions must be .jsonl, .json or .csv")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ValueError("file names and captions must be strings")
    return table
