"""The manifest of a FeatureStore: format versions, the spec fields, errors, fingerprints.

See :mod:`ctrak_fast.engine.store` for the layout and the guarantees.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

FORMAT_VERSION = 2  # the newest manifest format this build reads and writes (see the docstring)

MANIFEST = "manifest.json"

LOCK_FILE = ".lock"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

REQUIRED = ("format_version", "k", "dtype", "shard_rows", "meta", "n_rows", "shards")


class StoreError(Exception):
    """A store cannot be opened, read or written as asked; the message names the file."""


class SpecMismatch(StoreError, ValueError):
    """A spec (k, dtype, meta field, ...) differs from the store's. ``field`` names it."""

    def __init__(self, path: Path | str, field: str, stored, given) -> None:
        self.field, self.stored, self.given = field, stored, given
        super().__init__(
            f"spec mismatch in {field!r}: store {path} has {short(stored)}, got {short(given)}"
        )


MISSING = object()  # a key absent on one side of a comparison


def short(v) -> str:
    s = json.dumps(v, sort_keys=True) if v is not MISSING else "<missing>"
    return s if len(s) <= 200 else s[:197] + "..."


def created_by() -> str:
    from ctrak_fast._version import __version__

    return f"ctrak_fast {__version__}"


def library_versions() -> dict[str, str]:
    """The versions of the libraries that make a store's features (recorded in its manifest, so
    features of another torch or diffusers can be told apart); from the installed metadata,
    without importing them."""
    from importlib import metadata

    from ctrak_fast._version import __version__

    out = {"ctrak_fast": __version__}
    for name in ("torch", "diffusers", "transformers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def model_fingerprint(named_params) -> str:
    """sha256 hex digest of parameter names, shapes, dtypes and values, in name order.

    Args:
        named_params: an ``nn.Module`` (its ``named_parameters()``), a mapping name -> tensor, or
            an iterable of (name, tensor) pairs. Pass only the parameters that get gradients if a
            filter is used, or the whole model to pin the checkpoint.

    Examples:
        >>> m = torch.nn.Linear(2, 3)
        >>> model_fingerprint(m) == model_fingerprint(dict(m.named_parameters()))
        True
    """
    if isinstance(named_params, torch.nn.Module):
        items = list(named_params.named_parameters())
    elif isinstance(named_params, Mapping):
        items = list(named_params.items())
    else:
        items = list(named_params)
    items.sort(key=lambda kv: kv[0])
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("model_fingerprint: duplicate parameter names")
    h = hashlib.sha256(b"ctrak_fast model fingerprint v1\0")
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        head = json.dumps([name, list(t.shape), str(t.dtype).removeprefix("torch.")]).encode()
        h.update(len(head).to_bytes(8, "little") + head)  # length prefix: no ambiguous joins
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def normalize_meta(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise StoreError(f"meta must be a JSON object (dict), got {type(meta).__name__}")
    try:
        return json.loads(canonical_json(meta))  # tuples -> lists: compare as stored
    except (TypeError, ValueError) as e:
        raise StoreError(f"meta must be JSON-serialisable with finite numbers: {e}") from e


def first_difference(stored, given, field: str):
    """Dotted path of the first difference between two JSON values, or None."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in sorted(set(stored) | set(given)):
            sub = first_difference(
                stored.get(key, MISSING), given.get(key, MISSING), f"{field}.{key}"
            )
            if sub:
                return sub
        return None
    if type(stored) is not type(given) or stored != given:
        return field, stored, given
    return None


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreError(f"{path} is not a feature store (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested too deeply too
        raise StoreError(f"{mpath}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{mpath}: manifest is not a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"{mpath}: missing or invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"store {path} was written by a newer format version {version}; "
            f"this build reads <= {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise StoreError(f"{mpath}: manifest lacks {missing}")
    if "spec_sha256" not in manifest:  # without it, edits of meta would pass unseen
        raise StoreError(
            f"{mpath}: manifest lacks spec_sha256, the checksum of k, dtype, shard_rows and meta "
            "(deleted, or a store written before it existed): featurize into a new directory"
        )
    check_manifest_types(mpath, manifest)
    return manifest


def _is_int(v, low: int) -> bool:
    return type(v) is int and v >= low


def _is_hex(v, n: int = 64) -> bool:
    return isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)


# Shard record fields: the check each value must pass (zeroed_ids and crc32c are optional).
RECORD_FIELDS = {
    "file": lambda v: isinstance(v, str),
    "first_row": lambda v: _is_int(v, 0),
    "rows": lambda v: _is_int(v, 1),
    "bytes": lambda v: _is_int(v, 1),
    "sha256": _is_hex,
    "ids_sha256": _is_hex,
}
OPTIONAL_RECORD_FIELDS = {
    "zeroed_ids": lambda v: isinstance(v, list) and all(type(i) is int for i in v),
    "crc32c": lambda v: _is_int(v, 0) and v < 1 << 32,
}


def check_manifest_types(mpath: Path, m: dict) -> None:
    """Every field of a manifest has the type and range the readers assume (StoreError naming
    the field otherwise): a hand-edited or damaged manifest is refused here, not deep inside."""

    def bad(what: str):
        raise StoreError(f"{mpath}: {what}")

    if not isinstance(m["dtype"], str) or m["dtype"] not in DTYPES:
        bad(f"unknown dtype {m['dtype']!r}")
    for key, low in (("k", 1), ("shard_rows", 1), ("n_rows", 0)):
        if not _is_int(m[key], low):
            bad(f"{key} must be an integer >= {low}, got {short(m[key])}")
    if not isinstance(m["meta"], dict):
        bad(f"meta must be a JSON object, got {short(m['meta'])}")
    if not isinstance(m["shards"], list):
        bad(f"shards must be a list of records, got {short(m['shards'])}")
    if m.get("spec_sha256") != spec_sha256(m):
        bad("k, dtype, shard_rows or meta was edited (spec_sha256 does not match)")
    if "complete" in m and type(m["complete"]) is not bool:
        bad(f"complete must be true or false, got {short(m['complete'])}")
    if "expected_rows" in m and not _is_int(m["expected_rows"], m["n_rows"]):
        bad(f"expected_rows must be an integer >= n_rows, got {short(m['expected_rows'])}")
    seen: set[str] = set()
    for i, rec in enumerate(m["shards"]):
        if not isinstance(rec, dict):
            bad(f"shard record {i} is not an object: {short(rec)}")
        for key, ok in RECORD_FIELDS.items():
            if key not in rec or not ok(rec[key]):
                bad(f"shard record {i}: bad or missing {key!r}: {short(rec.get(key, MISSING))}")
        for key, ok in OPTIONAL_RECORD_FIELDS.items():
            if key in rec and not ok(rec[key]):
                bad(f"shard record {i}: bad {key!r}: {short(rec[key])}")
        for key in ("file", "sha256"):
            if (key, rec[key]) in seen:
                bad(f"shard record {i} repeats the {key} of an earlier one ({rec[key][:16]})")
            seen.add((key, rec[key]))


def is_complete(m: Mapping) -> bool:
    """The last writer closed cleanly and, where the manifest records how many rows its writer
    was asked for (``expected_rows``), all of them are there. A manifest without ``complete``
    (every writer since the first format writes it) is taken as incomplete."""
    expected = m.get("expected_rows")
    return m.get("complete") is True and (expected is None or m["n_rows"] == expected)


def describe_rows(m: Mapping) -> str:
    """'96 of 875 rows' (or '96 rows, the expected number not recorded')."""
    expected = m.get("expected_rows")
    if expected is None:
        return f"{m['n_rows']} rows, of a number not recorded"
    return f"{m['n_rows']} of {expected} rows"


def spec_sha256(manifest: Mapping) -> str:
    """sha256 of what a store's features mean (k, dtype, shard_rows, meta): written on create,
    checked on open, so an edit of meta.projection.k cannot pass unseen."""
    spec = {key: manifest[key] for key in ("k", "dtype", "shard_rows", "meta")}
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def check_spec(k, dtype, shard_rows) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise StoreError(f"k must be a positive int, got {k!r}")
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise StoreError(f"shard_rows must be a positive int, got {shard_rows!r}")


def with_version(manifest: dict) -> dict:
    """The manifest with the oldest format version that describes it (see the module docstring)."""
    zeroed = any(rec.get("zeroed_ids") for rec in manifest["shards"])
    return dict(manifest, format_version=2 if zeroed else 1)


def is_debris(name: str) -> bool:
    return name.endswith(".tmp") or name == LOCK_FILE
