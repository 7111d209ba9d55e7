"""Where a store's rows came from: ``sources.json`` beside the manifest.

A store's features mean little without the training images they stand for. The record names,
for each row id, its image file (relative to ``root``, the data folder) and its caption, or,
for generated data, the generator that draws it again (``generator``: a JSON object the data
layer understands). The manifest's ``meta.sources`` holds the file's name, sha256 and row count,
so it is covered by the spec checksum: a resumed run with other data is refused as any other
spec change, and ``verify`` re-reads the file and checks its ids against the shards'.

The file is written atomically (tmp + fsync + rename) by the writer that creates or resumes the
store, before its first row (by the merge, before it marks a torchrun store complete), so a
complete store has it; when it is deleted, readers name it as missing. The engine never
interprets the fields beyond their types: the data layer (ctrak_fast.data.sources) makes and
reads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctrak_fast.engine.atomic import atomic_write, sha256_bytes
from ctrak_fast.engine.store.manifest import StoreError

SOURCES = "sources.json"
SOURCES_FORMAT = "ctrak-sources/1"
# Per-row lists a record may hold beside "ids" (each as long as "ids").
ROW_FIELDS = ("files", "captions", "labels")


def sources_bytes(record: Mapping[str, Any]) -> bytes:
    """The record as written: canonical JSON (sorted keys), so equal records hash equal."""
    check_record(record)
    return json.dumps({**record, "format": SOURCES_FORMAT}, sort_keys=True).encode() + b"\n"


def sources_meta(record: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``meta.sources``: {"file", "sha256", "rows"} of ``record``."""
    return {
        "file": SOURCES,
        "sha256": sha256_bytes(sources_bytes(record)),
        "rows": len(record["ids"]),
    }


def check_record(record: Mapping[str, Any]) -> None:
    """Refuse (ValueError) a record whose fields have the wrong types or lengths."""
    ids = record.get("ids")
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ValueError("a sources record needs 'ids', a list of integers")
    if ("files" in record) == ("generator" in record):
        raise ValueError("a sources record names either 'files' (with 'root') or a 'generator'")
    if "files" in record and not isinstance(record.get("root"), str):
        raise ValueError("a sources record with 'files' needs 'root', the folder they are in")
    if "generator" in record and not isinstance(record["generator"], dict):
        raise ValueError("a sources record's 'generator' must be a JSON object")
    for key in ROW_FIELDS:
        rows = record.get(key)
        if rows is not None and (not isinstance(rows, list) or len(rows) != len(ids)):
            raise ValueError(f"a sources record's {key!r} must list one entry per id")


def write_sources(store_path: str | Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` as the store's sources.json (atomically; nothing when it is there)."""
    data = sources_bytes(record)
    path = Path(store_path) / SOURCES
    if path.is_file() and sha256_bytes(path.read_bytes()) == sha256_bytes(data):
        return
    atomic_write(path, data)


def read_sources(store_path: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The store's sources record, checked against the manifest's ``meta.sources``.

    Raises StoreError naming the store when it records no sources (featurized by a version
    before they were kept, or from tensors with no file names), or when the file is missing or
    altered."""
    ref = meta.get("sources")
    if not isinstance(ref, dict) or ref.get("file") != SOURCES:
        raise StoreError(
            f"store {store_path} records no sources of its rows (no meta.sources: featurized "
            "from tensors, or by a version before stores kept them): featurize again"
        )
    path = Path(store_path) / SOURCES
    if not path.is_file():
        raise StoreError(
            f"{path} is missing (the store's record of its training images): rerun the "
            "featurize command that wrote the store (it resumes and writes it)"
        )
    data = path.read_bytes()
    if sha256_bytes(data) != ref.get("sha256"):
        raise StoreError(f"{path}: sha256 differs from the manifest's meta.sources (altered)")
    try:
        record: dict[str, Any] = json.loads(data)
        check_record(record)
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{path}: not a sources record ({str(e).splitlines()[0]})") from None
    if record.get("format") != SOURCES_FORMAT:
        raise StoreError(f"{path}: format {record.get('format')!r}, not {SOURCES_FORMAT}")
    return record


def sources_problems(store_path: Path, meta: Mapping[str, Any], ids: list[int] | None) -> list[str]:
    """``verify``'s lines about sources.json (none when the store records no sources): it is
    there, unaltered, and names exactly the rows ``ids`` (the shards' ids; None: not known)."""
    if "sources" not in meta:
        return []
    try:
        record = read_sources(store_path, meta)
    except StoreError as e:
        return [str(e)]
    if ids is not None and sorted(record["ids"]) != sorted(ids):
        return [f"{SOURCES}: its ids are not the ids of the store's rows"]
    return []
