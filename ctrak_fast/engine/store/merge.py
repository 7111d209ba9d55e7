"""Merging stores (e.g. one per torchrun rank) by linking their shard files: the result has the
bytes one writer appending the same rows would produce.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ctrak_fast.engine.atomic import atomic_write, fsync_dir, fsync_file, sha256_file
from ctrak_fast.engine.store.manifest import (
    MANIFEST,
    SpecMismatch,
    StoreError,
    created_by,
    describe_rows,
    first_difference,
    is_complete,
    library_versions,
    manifest_bytes,
    read_manifest,
    spec_sha256,
    with_version,
)
from ctrak_fast.engine.store.shards import check_shards, shard_file
from ctrak_fast.engine.store.store import FeatureStore
from ctrak_fast.engine.store.writer import acquire_lock, release_lock


def merge_stores(
    dest: str | os.PathLike,
    sources: Sequence[str | os.PathLike | FeatureStore],
    *,
    check: bool = True,
    expected_rows: int | None = None,
) -> FeatureStore:
    """Append the rows of ``sources`` (stores, in order) to the store at ``dest``.

    ``dest`` is created with the first source's spec when it holds no manifest (it may hold other
    files, e.g. the sub-stores being merged); nothing is created or changed if the merge is
    refused. Each source shard is hard-linked (copied where a link is impossible) under dest's
    next shard name and listed with its checksums, so the result has the bytes one writer
    appending the same rows would have written, and the sources are never modified. Atomic:
    dest's manifest is replaced once, after every file is in place; an interrupted merge leaves
    only unlisted files, which the next merge or writer replaces.

    Args:
        check: re-hash every linked shard against its record (reads each byte once), so that a
            corrupt source is refused instead of being listed.
        expected_rows: the rows the merged store must hold to be complete (recorded; without
            it, a merge of complete sources is complete).

    Raises:
        SpecMismatch: a source's k, dtype, shard_rows or a meta field differs from dest's (the
            message names the field and both values).
        StoreError: a source is dest itself, is being written, is corrupt, or the merge would
            leave a short shard anywhere but at the end (shard boundaries must stay multiples
            of shard_rows: resume and byte-identity rely on it).
    """
    dest = Path(dest)
    paths = [Path(s.path if isinstance(s, FeatureStore) else s) for s in sources]
    if dest.exists() and not dest.is_dir():
        raise StoreError(f"{dest} exists and is not a directory")
    # Everything is checked before dest is created or changed: a refused merge leaves no trace.
    lock = acquire_lock(dest) if dest.is_dir() else None
    placed: list[Path] = []
    try:
        m = None
        if (dest / MANIFEST).exists():
            m = read_manifest(dest)
            check_shards(dest, m)
        todo = []  # (source path, shard record)
        for src in paths:
            if src.resolve() == dest.resolve():
                raise StoreError(f"cannot merge store {src} into itself")
            src_m = read_manifest(src)
            check_shards(src, src_m)
            release_lock(acquire_lock(src))  # refuse a source that a writer is still appending to
            if m is None:
                m = {key: src_m[key] for key in ("k", "dtype", "shard_rows", "meta")}
                m.update(format_version=1, created_by=created_by(), n_rows=0, shards=[])
                m["versions"] = library_versions()
                m["spec_sha256"] = spec_sha256(m)
            diff = next(
                (
                    (field, m[field], src_m[field])
                    for field in ("k", "dtype", "shard_rows")
                    if m[field] != src_m[field]
                ),
                None,
            ) or first_difference(m["meta"], src_m["meta"], "meta")
            if diff:
                err = SpecMismatch(dest, *diff)
                err.args = (f"cannot merge {src}: {err}",)
                raise err
            if not is_complete(src_m):  # a killed rank's rows would pass for a whole store
                raise StoreError(f"cannot merge {src}: {describe_rows(src_m)}, it is incomplete")
            todo.extend((src, rec) for rec in src_m["shards"])
        if m is None:
            raise StoreError(f"nothing to merge into {dest}: no sources and no store there")
        rows = [rec["rows"] for rec in m["shards"]] + [rec["rows"] for _, rec in todo]
        for i, n in enumerate(rows[:-1]):
            if n != m["shard_rows"]:
                where = dest if i < len(m["shards"]) else todo[i - len(m["shards"])][0]
                raise StoreError(
                    f"cannot merge: {where} has a short shard ({n} of {m['shard_rows']} rows) "
                    "that would not be the last one of the merged store"
                )
        if lock is None:
            dest.mkdir(parents=True, exist_ok=True)
            lock = acquire_lock(dest)
            if (dest / MANIFEST).exists():
                raise StoreError(f"a store appeared at {dest} during the merge; run it again")
        shards, n_rows = list(m["shards"]), m["n_rows"]
        for src, rec in todo:
            file = dest / f"shard-{len(shards):05d}.safetensors"
            _place(shard_file(src, rec["file"]), file)
            placed.append(file)
            if check and (
                file.stat().st_size != rec["bytes"] or sha256_file(file) != rec["sha256"]
            ):
                raise StoreError(f"{src / rec['file']}: sha256 mismatch, the shard is corrupt")
            shards.append(dict(rec, file=file.name, first_row=n_rows))
            n_rows += rec["rows"]
        fsync_dir(dest)  # every link is durable before the manifest lists it
        merged = dict(m, shards=shards, n_rows=n_rows, complete=True)
        if expected_rows is not None:
            if n_rows > expected_rows:
                raise StoreError(f"cannot merge: {n_rows} rows, more than {expected_rows}")
            merged.update(expected_rows=expected_rows, complete=n_rows == expected_rows)
        merged = with_version(merged)
        placed.clear()  # from here on the files may be listed: stray files are harmless, gaps not
        atomic_write(dest / MANIFEST, manifest_bytes(merged))
    finally:
        for file in placed:  # a failed merge leaves none of the files it placed
            file.unlink(missing_ok=True)
        if lock is not None:
            release_lock(lock)
    return FeatureStore.open(dest)


def _place(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link, or a durable copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
    os.replace(tmp, dst)
