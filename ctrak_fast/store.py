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
- Integrity: ``open`` checks every shard's size and header (cheap); reading checks each shard's
  sha256 by default (one hash per shard read, small next to any computation on the features);
  :meth:`FeatureStore.verify` re-hashes everything and names each bad shard.
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

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

FORMAT_VERSION = 2  # the newest manifest format this build reads and writes (see the docstring)
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")
_MAX_HEADER = 1 << 20  # our headers are ~200 bytes; anything larger is corruption
_REQUIRED = ("format_version", "k", "dtype", "shard_rows", "meta", "n_rows", "shards")


class StoreError(Exception):
    """A store cannot be opened, read or written as asked; the message names the file."""


class SpecMismatch(StoreError):
    """A spec (k, dtype, meta field, ...) differs from the store's. ``field`` names it."""

    def __init__(self, path: Path | str, field: str, stored, given) -> None:
        self.field, self.stored, self.given = field, stored, given
        super().__init__(
            f"spec mismatch in {field!r}: store {path} has {_short(stored)}, got {_short(given)}"
        )


_MISSING = object()  # a key absent on one side of a comparison


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if v is not _MISSING else "<missing>"
    return s if len(s) <= 200 else s[:197] + "..."


def _created_by() -> str:
    from ._version import __version__

    return f"ctrak_fast {__version__}"


# ---- fingerprints -------------------------------------------------------------------------


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


def meta_fingerprint(meta: Mapping) -> str:
    """sha256 hex digest of the canonical JSON of ``meta`` (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical_json(meta).encode()).hexdigest()


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _normalize_meta(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise StoreError(f"meta must be a JSON object (dict), got {type(meta).__name__}")
    try:
        return json.loads(_canonical_json(meta))  # tuples -> lists: compare as stored
    except (TypeError, ValueError) as e:
        raise StoreError(f"meta must be JSON-serialisable with finite numbers: {e}") from e


def _first_difference(stored, given, field: str):
    """Dotted path of the first difference between two JSON values, or None."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in sorted(set(stored) | set(given)):
            sub = _first_difference(
                stored.get(key, _MISSING), given.get(key, _MISSING), f"{field}.{key}"
            )
            if sub:
                return sub
        return None
    if type(stored) is not type(given) or stored != given:
        return field, stored, given
    return None


# ---- file helpers -------------------------------------------------------------------------


def _sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # make the rename itself durable


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise StoreError(f"{path} is not a feature store (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{mpath}: unreadable manifest: {e}") from e
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
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise StoreError(f"{mpath}: manifest lacks {missing}")
    if manifest["dtype"] not in DTYPES:
        raise StoreError(f"{mpath}: unknown dtype {manifest['dtype']!r}")
    return manifest


def _shard_file(path: Path, name) -> Path:
    """The shard's path; refuses names that could point outside the store directory."""
    ok = (
        isinstance(name, str)
        and _SHARD_RE.fullmatch(name) is not None
        and (path / name).resolve().parent == path.resolve()
    )
    if not ok:
        raise StoreError(
            f"manifest of {path} names a shard file {name!r} outside the store directory "
            "(or not a shard name); refusing to open it"
        )
    return path / name


def _read_header(file: Path, size: int) -> tuple[dict, int]:
    """(parsed safetensors header, its length in bytes); reads only the header."""
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise StoreError(f"{file}: bad safetensors header length")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"{file}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise StoreError(f"{file}: unreadable safetensors header: not a JSON object")
    return header, n


def _check_header(file: Path, rows: int, k: int, dtype: str, size: int) -> None:
    header, header_len = _read_header(file, size)
    want = {"features": (_ST_DTYPES[dtype], [rows, k]), "ids": ("I64", [rows])}
    end = 0
    for name, (st_dtype, shape) in want.items():
        info = header.get(name)
        if not isinstance(info, dict):
            raise StoreError(f"{file}: header has no tensor {name!r}")
        got = (info.get("dtype"), info.get("shape"))
        if got != (st_dtype, shape):
            raise StoreError(f"{file}: tensor {name!r} is {got}, manifest says {(st_dtype, shape)}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and all(isinstance(o, int) for o in offsets)):
            raise StoreError(f"{file}: bad data_offsets for {name!r}")
        end = max(end, *offsets)
    if 8 + header_len + end != size:
        raise StoreError(f"{file}: {size} bytes, its header describes {8 + header_len + end}")


# ---- the store ----------------------------------------------------------------------------


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
        self._m = manifest

    # -- construction --

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        k: int,
        dtype: str = "float16",
        meta: Mapping | None = None,
        shard_rows: int = 1024,
    ) -> FeatureStore:
        """Make a new, empty store in ``path`` (created, or an empty directory).

        Args:
            k: feature dimension. dtype: "float16" | "bfloat16" | "float32" (storage dtype).
            meta: JSON-serialisable spec of how the features were made.
            shard_rows: rows per shard (the last shard may be shorter).
        """
        path = Path(path)
        _check_spec(k, dtype, shard_rows)
        meta = _normalize_meta(meta)
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"{path} exists and is not a directory")
            content = sorted(p.name for p in path.iterdir() if not _is_debris(p.name))
            if content:
                raise StoreError(
                    f"{path} is not empty (found {content[:3]}); use FeatureStore.open_or_create "
                    "to resume a store, or choose a new directory"
                )
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": 1,
            "created_by": _created_by(),
            "k": k,
            "dtype": dtype,
            "shard_rows": shard_rows,
            "meta": meta,
            "n_rows": 0,
            "complete": False,
            "shards": [],
        }
        _atomic_write(path / MANIFEST, _manifest_bytes(manifest))
        return cls(path, manifest)

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        """Open an existing store: checks the format version, and every shard's presence, size
        and header (reads headers only, so it is fast whatever the store's size)."""
        path = Path(path)
        manifest = _read_manifest(path)
        _check_shards(path, manifest)
        return cls(path, manifest)

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        k: int,
        dtype: str = "float16",
        meta: Mapping | None = None,
        shard_rows: int = 1024,
    ) -> FeatureStore:
        """Open ``path`` to resume it if it holds a store, else :meth:`create` it.

        Raises:
            SpecMismatch: the existing store's k, dtype, shard_rows or a meta field differs.
        """
        path = Path(path)
        if not (path / MANIFEST).exists():
            return cls.create(path, k, dtype=dtype, meta=meta, shard_rows=shard_rows)
        store = cls.open(path)
        _check_spec(k, dtype, shard_rows)
        for field, given in (("k", k), ("dtype", dtype), ("shard_rows", shard_rows)):
            if store._m[field] != given:
                raise SpecMismatch(path, field, store._m[field], given)
        diff = _first_difference(store._m["meta"], _normalize_meta(meta), "meta")
        if diff:
            raise SpecMismatch(path, *diff)
        return store

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
        """True when the last writer closed cleanly (all its rows are on disk)."""
        return bool(self._m.get("complete", False))

    @property
    def manifest(self) -> dict:
        return copy.deepcopy(self._m)

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
        given = _normalize_meta(meta)
        stored = self._m["meta"]
        for key in sorted(given):
            diff = _first_difference(stored.get(key, _MISSING), given[key], f"meta.{key}")
            if diff:
                raise SpecMismatch(self.path, *diff)

    # -- reading --

    def read_shard(self, index: int, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard ``index`` as (features [rows, k] in the store dtype, ids [rows] int64).

        With ``check`` the file's sha256 is compared with the manifest first (StoreError naming
        the shard on mismatch); without it the tensors are read lazily through ``safe_open``.
        """
        rec = self._m["shards"][index]
        file = _shard_file(self.path, rec["file"])
        try:
            if check:
                data = file.read_bytes()
                if len(data) != rec["bytes"]:
                    raise StoreError(
                        f"{file}: {len(data)} bytes, manifest says {rec['bytes']} (truncated?)"
                    )
                if _sha256_bytes(data) != rec["sha256"]:
                    raise StoreError(f"{file}: sha256 mismatch, the shard is corrupt")
                tensors = safetensors.torch.load(data)
                feats, ids = tensors["features"], tensors["ids"]
            else:
                with safe_open(file, framework="pt") as f:
                    feats, ids = f.get_tensor("features"), f.get_tensor("ids")
        except FileNotFoundError as e:
            raise StoreError(f"{file}: shard file is missing") from e
        except (safetensors.SafetensorError, KeyError) as e:
            raise StoreError(f"{file}: unreadable shard: {e}") from e
        if feats.shape != (rec["rows"], self.k) or feats.dtype != self.torch_dtype:
            raise StoreError(f"{file}: features {tuple(feats.shape)} {feats.dtype} do not match")
        return feats, ids

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
            file = _shard_file(self.path, rec["file"])
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
        """Re-hash every shard; return one line per problem (empty list: the store is intact).

        Finds missing, truncated or extended files, bad headers and any changed byte.
        """
        problems = []
        total = 0
        for rec in self._m["shards"]:
            try:
                file = _shard_file(self.path, rec["file"])
            except StoreError as e:
                problems.append(str(e))
                continue
            name = rec["file"]
            if rec.get("first_row") != total:
                problems.append(f"{name}: first_row {rec.get('first_row')} != expected {total}")
            total += rec["rows"]
            if not file.is_file():
                problems.append(f"{name}: missing")
                continue
            size = file.stat().st_size
            if size != rec["bytes"]:
                problems.append(f"{name}: {size} bytes, manifest says {rec['bytes']} (truncated?)")
                continue
            if _sha256_file(file) != rec["sha256"]:
                problems.append(f"{name}: sha256 mismatch (corrupt bytes)")
                continue
            try:
                _check_header(file, rec["rows"], self.k, self.dtype, size)
            except StoreError as e:
                problems.append(f"{name}: {e}")
                continue
            if rec.get("zeroed_ids"):
                tensors = safetensors.torch.load(file.read_bytes())
                zeroed = torch.isin(tensors["ids"], torch.tensor(rec["zeroed_ids"]))
                if int(zeroed.sum()) != len(rec["zeroed_ids"]) or tensors["features"][zeroed].any():
                    problems.append(f"{name}: zeroed_ids do not match the shard's ids and rows")
        if total != self.n_rows:
            problems.append(f"{MANIFEST}: n_rows {self.n_rows} != sum of shard rows {total}")
        return problems

    # -- writing --

    def writer(self) -> StoreWriter:
        """The exclusive writer (a context manager); a second one raises :class:`StoreError`."""
        return StoreWriter(self)


def _check_spec(k, dtype, shard_rows) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise StoreError(f"k must be a positive int, got {k!r}")
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise StoreError(f"shard_rows must be a positive int, got {shard_rows!r}")


def _is_debris(name: str) -> bool:
    return name.endswith(".tmp") or name == LOCK_FILE


def _check_shards(path: Path, manifest: dict) -> None:
    total = 0
    for rec in manifest["shards"]:
        file = _shard_file(path, rec.get("file"))
        rows = rec.get("rows")
        zeroed = rec.get("zeroed_ids", [])
        bad_zeroed = not isinstance(zeroed, list) or not all(type(i) is int for i in zeroed)
        if rec.get("first_row") != total or not isinstance(rows, int) or rows < 1 or bad_zeroed:
            raise StoreError(f"{path / MANIFEST}: bad record for {rec.get('file')}")
        total += rows
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{file}: shard file is missing") from None
        if size != rec.get("bytes"):
            raise StoreError(f"{file}: {size} bytes, manifest says {rec.get('bytes')} (truncated?)")
        _check_header(file, rows, manifest["k"], manifest["dtype"], size)
    if total != manifest["n_rows"]:
        raise StoreError(f"{path / MANIFEST}: n_rows {manifest['n_rows']} != shard rows {total}")


class StoreWriter:
    """Appends rows to a store; holds the store's lock until closed.

    Rows are buffered and written as one shard each time ``shard_rows`` are full; ``close()`` (or
    leaving the ``with`` block normally) writes the last, partial shard and marks the store
    complete. Leaving on an exception writes nothing more: the buffered rows are recomputed on
    resume.
    """

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._lock_fd = _acquire_lock(store.path)
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # feats, ids, zeroed
        self._buffered = 0
        try:
            # Re-read under the lock: the manifest may have changed since the store was opened.
            store._m = _read_manifest(store.path)
            _check_shards(store.path, store._m)
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
            raise StoreError(f"writer of {self.store.path} is closed")
        k, dt = self.store.k, self.store.torch_dtype
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
                f"(after the cast to {self.store.dtype})"
            )
        ids = ids.detach().to(device="cpu", dtype=torch.int64, copy=True)
        self._buf.append((feats, ids, zeroed.clone()))
        self._buffered += feats.shape[0]
        while self._buffered >= self.store.shard_rows:
            self._write_shard(self.store.shard_rows)

    def close(self) -> None:
        """Write the partial last shard, mark the store complete and release the lock."""
        if self.closed:
            return
        try:
            if self._buffered:
                self._write_shard(self._buffered)
            if not self.store.complete:
                self._commit(dict(self.store._m, complete=True))
        finally:
            self._release()

    # -- internals --

    def _write_shard(self, rows: int) -> None:
        feats, ids, zeroed = (torch.cat(parts) for parts in zip(*self._buf, strict=True))
        rest = self._buffered - rows
        self._buf = [(feats[rows:], ids[rows:], zeroed[rows:])] if rest else []
        self._buffered = rest
        feats, ids = feats[:rows].contiguous(), ids[:rows].contiguous()
        m = self.store._m
        name = f"shard-{len(m['shards']):05d}.safetensors"
        data = safetensors.torch.save({"features": feats, "ids": ids})
        _atomic_write(self.store.path / name, data)
        record = {
            "file": name,
            "first_row": m["n_rows"],
            "rows": rows,
            "bytes": len(data),
            "sha256": _sha256_bytes(data),
            "ids_sha256": _sha256_bytes(ids.numpy().tobytes()),
        }
        if zeroed[:rows].any():  # absent otherwise: stores without zeroed rows stay version 1
            record["zeroed_ids"] = ids[zeroed[:rows]].tolist()
        self._commit(
            dict(m, shards=[*m["shards"], record], n_rows=m["n_rows"] + rows, complete=False)
        )

    def _commit(self, manifest: dict) -> None:
        manifest = _with_version(manifest)
        _atomic_write(self.store.path / MANIFEST, _manifest_bytes(manifest))
        self.store._m = manifest

    def _remove_debris(self) -> None:
        listed = {rec["file"] for rec in self.store._m["shards"]}
        for p in self.store.path.iterdir():
            stray_shard = _SHARD_RE.fullmatch(p.name) and p.name not in listed
            if p.name.endswith(".tmp") or stray_shard:
                p.unlink()

    def _reopen_partial_tail(self) -> None:
        # A clean close left a short last shard: take its rows back into the buffer so shard
        # boundaries depend only on the sequence of rows. Drop it from the manifest first, then
        # delete the file: a crash in between leaves only a stray file, removed next time.
        m = self.store._m
        if not m["shards"] or m["shards"][-1]["rows"] >= m["shard_rows"]:
            return
        tail = m["shards"][-1]
        feats, ids = self.store.read_shard(len(m["shards"]) - 1, check=True)
        self._commit(
            dict(m, shards=m["shards"][:-1], n_rows=m["n_rows"] - tail["rows"], complete=False)
        )
        (self.store.path / tail["file"]).unlink()
        zeroed = torch.isin(ids, torch.tensor(tail.get("zeroed_ids", []), dtype=torch.int64))
        self._buf = [(feats, ids, zeroed)]
        self._buffered = feats.shape[0]

    def _release(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            _release_lock(fd)


def merge_stores(
    dest: str | os.PathLike,
    sources: Sequence[str | os.PathLike | FeatureStore],
    *,
    check: bool = True,
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
    lock = _acquire_lock(dest) if dest.is_dir() else None
    placed: list[Path] = []
    try:
        m = None
        if (dest / MANIFEST).exists():
            m = _read_manifest(dest)
            _check_shards(dest, m)
        todo = []  # (source path, shard record)
        for src in paths:
            if src.resolve() == dest.resolve():
                raise StoreError(f"cannot merge store {src} into itself")
            src_m = _read_manifest(src)
            _check_shards(src, src_m)
            _release_lock(_acquire_lock(src))  # refuse a source that a writer is still appending to
            if m is None:
                m = {key: src_m[key] for key in ("k", "dtype", "shard_rows", "meta")}
                m.update(format_version=1, created_by=_created_by(), n_rows=0, shards=[])
            diff = next(
                (
                    (field, m[field], src_m[field])
                    for field in ("k", "dtype", "shard_rows")
                    if m[field] != src_m[field]
                ),
                None,
            ) or _first_difference(m["meta"], src_m["meta"], "meta")
            if diff:
                err = SpecMismatch(dest, *diff)
                err.args = (f"cannot merge {src}: {err}",)
                raise err
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
            lock = _acquire_lock(dest)
            if (dest / MANIFEST).exists():
                raise StoreError(f"a store appeared at {dest} during the merge; run it again")
        shards, n_rows = list(m["shards"]), m["n_rows"]
        for src, rec in todo:
            file = dest / f"shard-{len(shards):05d}.safetensors"
            _place(_shard_file(src, rec["file"]), file)
            placed.append(file)
            if check and (
                file.stat().st_size != rec["bytes"] or _sha256_file(file) != rec["sha256"]
            ):
                raise StoreError(f"{src / rec['file']}: sha256 mismatch, the shard is corrupt")
            shards.append(dict(rec, file=file.name, first_row=n_rows))
            n_rows += rec["rows"]
        _fsync_dir(dest)  # every link is durable before the manifest lists it
        merged = _with_version(dict(m, shards=shards, n_rows=n_rows, complete=True))
        placed.clear()  # from here on the files may be listed: stray files are harmless, gaps not
        _atomic_write(dest / MANIFEST, _manifest_bytes(merged))
    finally:
        for file in placed:  # a failed merge leaves none of the files it placed
            file.unlink(missing_ok=True)
        if lock is not None:
            _release_lock(lock)
    return FeatureStore.open(dest)


def _place(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link, or a durable copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, dst)


def _with_version(manifest: dict) -> dict:
    """The manifest with the oldest format version that describes it (see the module docstring)."""
    zeroed = any(rec.get("zeroed_ids") for rec in manifest["shards"])
    return dict(manifest, format_version=2 if zeroed else 1)


def _acquire_lock(path: Path) -> int:
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


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor drops the flock


def iter_features(source) -> Iterable[torch.Tensor]:
    """Feature blocks [n_i, k] from a FeatureStore, a [N, k] tensor, one (features, ids) pair, or
    an iterable of tensors or (features, ids) pairs (the inputs search.topk accepts too)."""
    if isinstance(source, FeatureStore):
        return (f for f, _ in source.iter_shards())
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], torch.Tensor):
        source = source[0]
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise ValueError(f"features must be [N, k], got {list(source.shape)}")
        return (source,)
    return (item[0] if isinstance(item, tuple) else item for item in source)
