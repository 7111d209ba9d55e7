"""FeatureStore: projected training features on disk, as safetensors shards plus a JSON manifest.

Layout of a store directory::

    manifest.json            format version, k, dtype, shard_rows, caller's meta, shard records
    shard-00000.safetensors  "features": [rows, k] float16 | bfloat16 | float32; "ids": [rows] int64
    shard-00001.safetensors  ...
    .lock                    flock'ed by the one writer; holds its pid

Guarantees:

- Atomic, durable writes: a shard goes to ``<name>.tmp``, is fsync'ed and renamed; only then is the
  manifest (same procedure) updated to list it. A reader never sees a half-written shard, and a file
  that a reader has memory-mapped is never overwritten in place.
- Resume: a killed writer loses at most the rows it had buffered. ``open_or_create`` + ``writer()``
  continue after the last shard in the manifest; stray ``*.tmp`` files and shard files not in the
  manifest are removed when a writer starts. Shard boundaries depend only on the sequence of rows
  appended (a final partial shard left by a clean close is taken back into the buffer), so a resumed
  run ends byte-identical to an uninterrupted one. Nothing on disk holds a timestamp.
- Self-description: the manifest records the caller's ``meta`` (model fingerprint, projection spec,
  loss, timesteps, ...); resuming or querying with a different spec raises :class:`SpecMismatch`
  naming the field.
- Integrity: ``open`` checks every manifest field's type, the spec checksum (``spec_sha256`` over
  k, dtype, shard_rows and meta) and every shard's size and header (cheap); the search checks each
  shard's block CRC-32C (``crc32c``, engine/checksum.py) as it streams it; :meth:`read_shard`
  checks the file's sha256; :meth:`FeatureStore.verify` re-reads everything (sha256, CRC-32C, the
  ids' sha256, ids repeated across shards) and names each bad shard.
- Completeness: the manifest records ``complete`` (true once the last writer closed cleanly
  with all its ``expected_rows`` on disk, false while a writer runs or after it was killed);
  ``check_complete`` names the rows present and expected; ``ctrak attribute`` refuses an
  incomplete store unless ``--allow-partial``. A featurize that fails before its first row
  removes the store it created; a 0-row store of another spec is replaced, never blocking.
- Zeroed rows: a writer may store a row as zeros in place of a non-finite feature
  (``append(..., zeroed=mask)``); the shard's record lists those ids (``zeroed_ids``), so the
  substitution is never silent.
- Format versions: a manifest records the oldest format that describes it: 1, or 2 once a shard
  has zeroed rows (a version-1 reader would take those zeros for features; it refuses the store
  instead). Stores of a newer version than this build's ``FORMAT_VERSION`` are refused; older ones
  are read as they are (version 2 only added ``zeroed_ids``), so no migration step is needed.
- Merge: :func:`merge_stores` appends whole stores (e.g. written by several ranks) by linking
  their shard files; the result has the bytes one writer appending the same rows would produce.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from ctrak_fast.engine.atomic import atomic_write
from ctrak_fast.engine.store.manifest import (
    DTYPES,
    MANIFEST,
    MISSING,
    SpecMismatch,
    StoreError,
    check_spec,
    created_by,
    describe_rows,
    first_difference,
    is_complete,
    is_debris,
    library_versions,
    manifest_bytes,
    normalize_meta,
    read_manifest,
    spec_sha256,
)
from ctrak_fast.engine.store.shards import (
    check_shards,
    iter_store_shards,
    read_shard,
    shard_file,
)
from ctrak_fast.engine.store.verify import verify_store
from ctrak_fast.engine.store.writer import StoreWriter, remove_empty_store


class FeatureStore:
    """A directory of feature shards; see the module docstring for the guarantees.

    Create with :meth:`create`, :meth:`open` or :meth:`open_or_create`; write through
    :meth:`writer`.

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> store = FeatureStore.create(d + "/s", k=4, dtype="float32", shard_rows=2)
        >>> with store.writer() as w:
        ...     w.append(torch.ones(3, 4), torch.arange(3))
        >>> [f.shape[0] for f, ids in FeatureStore.open(d + "/s").iter_shards()]
        [2, 1]
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = Path(path)
        self._adopted = manifest
        self._writer: StoreWriter | None = None

    # -- construction --

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        k: int,
        dtype: str = "float16",
        meta: Mapping | None = None,
        shard_rows: int = 1024,
        expected_rows: int | None = None,
    ) -> FeatureStore:
        """Make a new, empty store in ``path`` (created, or an empty directory).

        Args:
            k: feature dimension. dtype: "float16" | "bfloat16" | "float32" (storage dtype).
            meta: JSON-serialisable spec of how the features were made.
            shard_rows: rows per shard (the last shard may be shorter).
            expected_rows: the rows the store will hold when complete, if known (recorded so
                that an unfinished store can say how far it got; see :meth:`writer`).
        """
        path = Path(path)
        check_spec(k, dtype, shard_rows)
        meta = normalize_meta(meta)
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"{path} exists and is not a directory")
            content = sorted(p.name for p in path.iterdir() if not is_debris(p.name))
            if content:
                raise StoreError(
                    f"{path} is not empty (found {content[:3]}); use FeatureStore.open_or_create "
                    "to resume a store, or choose a new directory"
                )
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": 1,
            "created_by": created_by(),
            "versions": library_versions(),
            "k": k,
            "dtype": dtype,
            "shard_rows": shard_rows,
            "meta": meta,
            "n_rows": 0,
            "complete": False,
            "shards": [],
        }
        if expected_rows is not None:
            manifest["expected_rows"] = expected_rows
        manifest["spec_sha256"] = spec_sha256(manifest)
        atomic_write(path / MANIFEST, manifest_bytes(manifest))
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open an existing store: checks the format version, and every shard's presence, size
        and header (reads headers only, so it is fast whatever the store's size)."""
        path = Path(path)
        manifest = read_manifest(path)
        check_shards(path, manifest)
        return cls(path, manifest)

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        k: int,
        dtype: str = "float16",
        meta: Mapping | None = None,
        shard_rows: int = 1024,
        expected_rows: int | None = None,
    ) -> FeatureStore:
        """Open ``path`` to resume it if it holds a store, else :meth:`create` it.

        Raises:
            SpecMismatch: the existing store's k, dtype, shard_rows or a meta field differs.
        """
        path = Path(path)
        if not (path / MANIFEST).exists():
            return cls.create(
                path, k, dtype=dtype, meta=meta, shard_rows=shard_rows, expected_rows=expected_rows
            )
        store = cls.open(path)
        check_spec(k, dtype, shard_rows)
        try:
            store.check_spec(k, dtype, shard_rows, meta)
        except SpecMismatch:
            # A run that failed before its first shard (e.g. NaN weights) left a store of no
            # rows: it must not block the right command, and holds nothing to lose.
            if store.n_rows or not remove_empty_store(path):
                raise
            return cls.create(
                path, k, dtype=dtype, meta=meta, shard_rows=shard_rows, expected_rows=expected_rows
            )
        return store

    def check_spec(self, k: int, dtype: str, shard_rows: int, meta: Mapping | None) -> None:
        """Raise SpecMismatch naming the first of k, dtype, shard_rows, meta.* that differs."""
        for field, given in (("k", k), ("dtype", dtype), ("shard_rows", shard_rows)):
            if self._m[field] != given:
                raise SpecMismatch(self.path, field, self._m[field], given)
        diff = first_difference(self._m["meta"], normalize_meta(meta), "meta")
        if diff:
            raise SpecMismatch(self.path, *diff)

    # -- description --

    @property
    def k(self) -> int:
        return self._m["k"]

    @property
    def dtype(self) -> str:
        """Storage dtype name: "float16" | "bfloat16" | "float32"."""
        return self._m["dtype"]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shard_rows(self) -> int:
        return self._m["shard_rows"]

    @property
    def meta(self) -> dict:
        return copy.deepcopy(self._m["meta"])

    @property
    def n_rows(self) -> int:
        return self._m["n_rows"]

    @property
    def shards(self) -> list[dict]:
        """Shard records: file, first_row, rows, bytes, sha256, ids_sha256."""
        return copy.deepcopy(self._m["shards"])

    @property
    def complete(self) -> bool:
        """True when the last writer closed cleanly with all its rows on disk (all
        ``expected_rows`` of them, where the manifest records that number)."""
        return is_complete(self._m)

    @property
    def expected_rows(self) -> int | None:
        """The rows the store holds when complete, if its writer was told (else None)."""
        return self._m.get("expected_rows")

    def check_complete(self, hint: str = "") -> None:
        """Raise StoreError naming the rows present and expected unless the store is complete;
        ``hint``: another way out, appended to the message."""
        if not self.complete:
            raise StoreError(
                f"store {self.path} is incomplete: {describe_rows(self._m)}; its writer was "
                f"killed or is still running: rerun the command that wrote it (it resumes){hint}"
            )

    @property
    def manifest(self) -> dict:
        return copy.deepcopy(self._m)

    @property
    def _m(self) -> dict:
        # The store adopts the manifest its writer returned from its latest commit (already on
        # disk); the writer knows nothing of the store.
        if self._writer is not None:
            self._adopted = self._writer.manifest
            if self._writer.closed:
                self._writer = None
        return self._adopted

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, n_rows={self.n_rows}, k={self.k}, "
            f"dtype={self.dtype!r}, shards={len(self._m['shards'])})"
        )

    def check_compatible(self, meta: Mapping) -> None:
        """Refuse a query (or other consumer) made with another spec.

        Every top-level key of ``meta`` must be present in the store's meta with an equal value
        (compared recursively); keys the caller does not give (e.g. training-only settings) are
        not checked.

        Raises:
            SpecMismatch: names the first differing field, e.g. ``meta.projection.seed``.
        """
        given = normalize_meta(meta)
        stored = self._m["meta"]
        for key in sorted(given):
            diff = first_difference(stored.get(key, MISSING), given[key], f"meta.{key}")
            if diff:
                raise SpecMismatch(self.path, *diff)

    # -- reading --

    def read_shard(self, index: int, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard ``index`` as (features [rows, k] in the store dtype, ids [rows] int64).

        With ``check`` the file's sha256 is compared with the manifest first (StoreError naming
        the shard on mismatch); without it the tensors are read lazily through ``safe_open``.
        """
        return read_shard(self.path, self._m, index, check)

    def iter_shards(self, check: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (features [rows_i, k] in the store dtype, ids [rows_i] int64) shard by shard.

        Memory stays bounded by one shard whatever the store's size.

        Examples:
            >>> # for feats, ids in store.iter_shards(): scores = feats.float() @ u.T
        """
        for i in range(len(self._m["shards"])):
            yield self.read_shard(i, check=check)

    def read_all(self, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, k], ids [N]) concatenated: for small stores and tests only."""
        parts = list(self.iter_shards(check=check))
        if not parts:
            return torch.empty(0, self.k, dtype=self.torch_dtype), torch.empty(0, dtype=torch.int64)
        return torch.cat([f for f, _ in parts]), torch.cat([i for _, i in parts])

    def done_ids(self) -> torch.Tensor:
        """int64 [N] ids of the rows on disk, in row order (reads only the small ids tensors)."""
        out = [torch.empty(0, dtype=torch.int64)]
        for rec in self._m["shards"]:
            file = shard_file(self.path, rec["file"])
            try:
                with safe_open(file, framework="pt") as f:
                    out.append(f.get_tensor("ids"))
            except (FileNotFoundError, safetensors.SafetensorError) as e:
                raise StoreError(f"{file}: cannot read ids: {e}") from e
        return torch.cat(out)

    def zeroed_ids(self) -> list[int]:
        """Ids of the rows stored as zeros because their features were not finite, in row order."""
        return [i for rec in self._m["shards"] for i in rec.get("zeroed_ids", [])]

    def verify(self) -> list[str]:
        """Re-read every shard; return one line per problem (empty list: the store is intact).

        Checks at least everything a reader checks, and more: missing, truncated or extended
        files, bad headers, any changed byte (sha256, and crc32c where recorded), the ids' own
        sha256, ids repeated within or across shards, and zeroed rows. The manifest's fields and
        its spec checksum were checked when the store was opened (see verify.py).
        """
        return verify_store(self.path, self._m)

    # -- writing --

    def writer(self, expected_rows: int | None = None) -> StoreWriter:
        """The exclusive writer (a context manager); a second one raises :class:`StoreError`.
        ``expected_rows``: the rows the store holds when done (see :class:`StoreWriter`)."""
        self._writer = StoreWriter(self.path, expected_rows)
        return self._writer


def iter_features(source) -> Iterable[torch.Tensor]:
    """Feature blocks [n_i, k] from a FeatureStore, a [N, k] tensor, one (features, ids) pair, or
    an iterable of tensors or (features, ids) pairs (the inputs search.topk accepts too). A
    store's shards are memory-mapped with read-ahead and checked as the search checks them
    (iter_store_shards, block CRC-32C); the blocks are read-only views."""
    if isinstance(source, FeatureStore):
        return (f for f, _ in iter_store_shards(source))
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.Tensor):
        source = source[0]
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"features must be [N, k], got {list(source.shape)}")
        return (source,)
    return (item[0] if isinstance(item, tuple) else item for item in source)
