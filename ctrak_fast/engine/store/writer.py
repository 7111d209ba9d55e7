"""The one writer of a FeatureStore: buffers rows into whole shards, commits each with the
manifest, and holds the store's lock (flock on ``.lock``, which records the writer's pid).

The writer works on the store's directory and its own copy of the manifest; every commit returns
the new manifest (:attr:`StoreWriter.manifest`), which the FeatureStore that made the writer
adopts. Nothing here imports or calls the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import safetensors.torch
import torch

from ctrak_fast.engine.atomic import atomic_write, sha256_bytes
from ctrak_fast.engine.checksum import shard_checksum
from ctrak_fast.engine.store.manifest import (
    DTYPES,
    LOCK_FILE,
    MANIFEST,
    StoreError,
    is_complete,
    manifest_bytes,
    read_manifest,
    with_version,
)
from ctrak_fast.engine.store.shards import SHARD_RE, check_shards, read_shard


class StoreWriter:
    """Appends rows to a store; holds the store's lock until closed.

    Rows are buffered and written as one shard each time ``shard_rows`` are full; ``close()`` (or
    leaving the ``with`` block normally) writes the last, partial shard and marks the store
    complete. Leaving on an exception writes nothing more: the buffered rows are recomputed on
    resume.

    ``expected_rows`` (optional): how many rows the store must hold when done; recorded in the
    manifest with every commit, so a reader of a killed run's store can say "96 of 875 rows",
    and ``close()`` marks the store complete only once that many rows are on disk.
    """

    def __init__(self, path: str | os.PathLike, expected_rows: int | None = None) -> None:
        if expected_rows is not None and (type(expected_rows) is not int or expected_rows < 0):
            raise StoreError(f"expected_rows must be an integer >= 0, got {expected_rows!r}")
        self.path = Path(path)
        self._expected = expected_rows
        self._lock_fd = acquire_lock(self.path)
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # feats, ids, zeroed
        self._buffered = 0
        try:
            # Read under the lock: the manifest may have changed since the store was opened.
            self._manifest = read_manifest(self.path)
            check_shards(self.path, self._manifest)
            self._remove_debris()
            self._reopen_partial_tail()
        except BaseException:
            self._release()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    @property
    def manifest(self) -> dict:
        """The manifest of the latest commit (on disk): for the store to adopt, not to edit."""
        return self._manifest

    def append(
        self, features: torch.Tensor, ids: torch.Tensor, zeroed: torch.Tensor | None = None
    ) -> None:
        """Add rows.

        Args:
            features: [n, k] floating tensor on any device (cast to the store dtype; must be finite
                after the cast).
            ids: [n] integer sample ids (stored as int64).
            zeroed: optional bool [n]: rows that the caller replaced by zeros because their
                features were not finite; they must be zero, and their ids are listed in the
                shard's record (``FeatureStore.zeroed_ids``).
        """
        if self.closed:
            raise StoreError(f"writer of {self.path} is closed")
        k, dt = self._manifest["k"], DTYPES[self._manifest["dtype"]]
        if features.dim() != 2 or features.shape[1] != k or not features.is_floating_point():
            raise StoreError(
                f"features must be floating [n, {k}], got {list(features.shape)} {features.dtype}"
            )
        ids = torch.as_tensor(ids)
        if ids.shape != (features.shape[0],) or ids.is_floating_point() or ids.is_complex():
            raise StoreError(f"ids must be integer [{features.shape[0]}], got {list(ids.shape)}")
        zeroed = torch.zeros(len(ids), dtype=torch.bool) if zeroed is None else zeroed.cpu()
        if zeroed.shape != ids.shape or zeroed.dtype != torch.bool:
            raise StoreError(f"zeroed must be bool [{len(ids)}], got {list(zeroed.shape)}")
        if features.shape[0] == 0:
            return
        feats = features.detach().to(device="cpu", dtype=dt, copy=True).contiguous()
        if feats[zeroed].any():
            raise StoreError("rows marked as zeroed must hold zeros")
        if not torch.isfinite(feats).all():
            bad = (~torch.isfinite(feats)).any(1).nonzero()[:5, 0].tolist()
            raise StoreError(
                f"non-finite features at rows {bad} of this batch "
                f"(after the cast to {self._manifest['dtype']})"
            )
        ids = ids.detach().to(device="cpu", dtype=torch.int64, copy=True)
        self._buf.append((feats, ids, zeroed.clone()))
        self._buffered += feats.shape[0]
        while self._buffered >= self._manifest["shard_rows"]:
            self._write_shard(self._manifest["shard_rows"])

    def close(self) -> None:
        """Write the partial last shard, mark the store complete and release the lock."""
        if self.closed:
            return
        try:
            if self._buffered:
                self._write_shard(self._buffered)
            m = self._manifest
            done = self._expected is None or m["n_rows"] == self._expected
            if done and not is_complete(m):
                self._commit(dict(m, complete=True))
        finally:
            self._release()

    # -- internals --

    def _write_shard(self, rows: int) -> None:
        feats, ids, zeroed = (torch.cat(parts) for parts in zip(*self._buf, strict=True))
        rest = self._buffered - rows
        self._buf = [(feats[rows:], ids[rows:], zeroed[rows:])] if rest else []
        self._buffered = rest
        feats, ids = feats[:rows].contiguous(), ids[:rows].contiguous()
        m = self._manifest
        name = f"shard-{len(m['shards']):05d}.safetensors"
        data = safetensors.torch.save({"features": feats, "ids": ids})
        atomic_write(self.path / name, data)
        record = {
            "file": name,
            "first_row": m["n_rows"],
            "rows": rows,
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "ids_sha256": sha256_bytes(ids.numpy().tobytes()),
            "crc32c": shard_checksum(data),  # the whole file, checked as the search streams it
        }
        if zeroed[:rows].any():  # absent otherwise: stores without zeroed rows stay version 1
            record["zeroed_ids"] = ids[zeroed[:rows]].tolist()
        self._commit(
            dict(m, shards=[*m["shards"], record], n_rows=m["n_rows"] + rows, complete=False)
        )

    def _commit(self, manifest: dict) -> dict:
        """Write ``manifest`` (the commit point) and return it as the writer's new manifest."""
        if self._expected is not None:
            if manifest["n_rows"] > self._expected:
                raise StoreError(
                    f"store {self.path}: {manifest['n_rows']} rows, more than the "
                    f"{self._expected} expected"
                )
            manifest["expected_rows"] = self._expected
        manifest = with_version(manifest)
        atomic_write(self.path / MANIFEST, manifest_bytes(manifest))
        self._manifest = manifest
        return manifest

    def _remove_debris(self) -> None:
        listed = {rec["file"] for rec in self._manifest["shards"]}
        for p in self.path.iterdir():
            stray_shard = SHARD_RE.fullmatch(p.name) and p.name not in listed
            if p.name.endswith(".tmp") or stray_shard:
                p.unlink()

    def _reopen_partial_tail(self) -> None:
        # A clean close left a short last shard: take its rows back into the buffer so shard
        # boundaries depend only on the sequence of rows. Drop it from the manifest first, then
        # delete the file: a crash in between leaves only a stray file, removed next time.
        m = self._manifest
        if not m["shards"] or m["shards"][-1]["rows"] >= m["shard_rows"]:
            return
        tail = m["shards"][-1]
        feats, ids = read_shard(self.path, m, len(m["shards"]) - 1, check=True)
        self._commit(
            dict(m, shards=m["shards"][:-1], n_rows=m["n_rows"] - tail["rows"], complete=False)
        )
        (self.path / tail["file"]).unlink()
        zeroed = torch.isin(ids, torch.tensor(tail.get("zeroed_ids", []), dtype=torch.int64))
        self._buf = [(feats, ids, zeroed)]
        self._buffered = feats.shape[0]

    def _release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            release_lock(fd)


def acquire_lock(path: Path) -> int:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"store {path} is locked by another writer (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor drops the flock


def remove_empty_store(path: str | os.PathLike, rmdir: bool = False) -> bool:
    """Remove the store at ``path`` if it holds no rows and no writer holds it (a failed run's
    leftover): its manifest and lock, and with ``rmdir`` the directory if that leaves it empty.
    True if removed."""
    path = Path(path)
    try:
        lock = acquire_lock(path)
    except StoreError:  # a live writer: not a leftover
        return False
    try:
        m = read_manifest(path)
        if m["n_rows"] or m["shards"]:
            return False
        (path / MANIFEST).unlink()
        (path / LOCK_FILE).unlink(missing_ok=True)  # flock'ed still, by the unlinked inode
    finally:
        release_lock(lock)
    if rmdir:
        with contextlib.suppress(OSError):  # not empty: other files are not ours to remove
            path.rmdir()
    return True
