"""Shard files of a FeatureStore: the one safetensors-header parser, checks against the
manifest, and memory-mapped reading (with read-ahead) for the search engines.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from ctrak_fast.engine import native
from ctrak_fast.engine.atomic import sha256_bytes
from ctrak_fast.engine.checksum import shard_checksum
from ctrak_fast.engine.store.manifest import DTYPES, MANIFEST, StoreError


class ShardSource(Protocol):
    """What the shard readers need of a store (a FeatureStore is one): its directory, and the
    k, dtype and shard records of its manifest."""

    path: Path

    @property
    def k(self) -> int: ...

    @property
    def dtype(self) -> str: ...

    @property
    def manifest(self) -> dict: ...


ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}

SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")

MAX_HEADER = 1 << 20  # our headers are ~200 bytes; anything larger is corruption


def shard_file(path: Path, name) -> Path:
    """The shard's path; refuses names that could point outside the store directory."""
    ok = (
        isinstance(name, str)
        and SHARD_RE.fullmatch(name) is not None
        and (path / name).resolve().parent == path.resolve()
    )
    if not ok:
        raise StoreError(
            f"manifest of {path} names a shard file {name!r} outside the store directory "
            "(or not a shard name); refusing to open it"
        )
    return path / name


def read_header(file: Path, size: int) -> tuple[dict, int]:
    """(parsed safetensors header, its length in bytes); reads only the header."""
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise StoreError(f"{file}: bad safetensors header length")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested too deeply too
            raise StoreError(f"{file}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise StoreError(f"{file}: unreadable safetensors header: not a JSON object")
    return header, n


def check_header(file: Path, rows: int, k: int, dtype: str, size: int) -> None:
    header, header_len = read_header(file, size)
    want = {"features": (ST_DTYPES[dtype], [rows, k]), "ids": ("I64", [rows])}
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


def check_shards(path: Path, manifest: dict) -> None:
    total = 0
    for rec in manifest["shards"]:
        file = shard_file(path, rec.get("file"))
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
        check_header(file, rows, manifest["k"], manifest["dtype"], size)
    if total != manifest["n_rows"]:
        raise StoreError(f"{path / MANIFEST}: n_rows {manifest['n_rows']} != shard rows {total}")


# How much of each shard a reader checks as it maps it: the ids' sha256, the block CRC-32C of
# every byte (checksum.py; stores written before it was recorded: the ids), the whole file's
# sha256, or nothing.
VERIFY = ("ids", "crc", "full", "none")
Verify = Literal["ids", "crc", "full", "none"]

_NP_DTYPES = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}


def _as_tensor(a: np.ndarray) -> Tensor:
    # Views of a read-only mapping: torch warns that it cannot write to them; nothing does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def read_shard(
    path: Path, manifest: dict, index: int, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard ``index`` of the store at ``path`` as (features [rows, k] in the store dtype, ids
    [rows] int64).

    With ``check`` the file's sha256 is compared with the manifest first (StoreError naming
    the shard on mismatch); without it the tensors are read lazily through ``safe_open``.
    """
    rec = manifest["shards"][index]
    file = shard_file(path, rec["file"])
    try:
        if check:
            data = file.read_bytes()
            if len(data) != rec["bytes"]:
                raise StoreError(
                    f"{file}: {len(data)} bytes, manifest says {rec['bytes']} (truncated?)"
                )
            if sha256_bytes(data) != rec["sha256"]:
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
    dtype = DTYPES[manifest["dtype"]]
    if feats.shape != (rec["rows"], manifest["k"]) or feats.dtype != dtype:
        raise StoreError(f"{file}: features {tuple(feats.shape)} {feats.dtype} do not match")
    return feats, ids


def map_shard(store: ShardSource, rec: dict, verify: str, populate: bool):
    """Memory-map one shard and check it: -> (features [rows, k] Tensor, ids [rows] Tensor).

    The tensors are read-only views of the mapping, which stays alive as long as they do.
    """
    file = shard_file(store.path, rec["file"])
    C = native.load()
    try:
        mf = C.MappedFile(str(file), populate=populate)
    except FileNotFoundError as e:
        raise StoreError(f"{file}: shard file is missing") from e
    buf = np.frombuffer(mf, dtype=np.uint8)
    if buf.size != rec["bytes"]:
        raise StoreError(f"{file}: {buf.size} bytes, manifest says {rec['bytes']} (truncated?)")
    n_head = int.from_bytes(buf[:8].tobytes(), "little")
    if not 0 < n_head <= buf.size - 8:
        raise StoreError(f"{file}: bad safetensors header length")
    try:
        header = json.loads(buf[8 : 8 + n_head].tobytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested too deeply too
        raise StoreError(f"{file}: unreadable safetensors header: {e}") from None
    rows, k, dtype = rec["rows"], store.k, store.dtype
    want = {"features": (ST_DTYPES[dtype], [rows, k]), "ids": ("I64", [rows])}
    views = {}
    for name, (st_dtype, shape) in want.items():
        info = header.get(name) if isinstance(header, dict) else None
        if not isinstance(info, dict) or (info.get("dtype"), info.get("shape")) != (
            st_dtype,
            shape,
        ):
            raise StoreError(f"{file}: tensor {name!r} does not match the manifest")
        lo, hi = info["data_offsets"]
        views[name] = buf[8 + n_head + lo : 8 + n_head + hi]
    if verify == "full" and hashlib.sha256(buf).hexdigest() != rec["sha256"]:
        raise StoreError(f"{file}: sha256 mismatch, the shard is corrupt")
    if verify == "crc" and "crc32c" in rec:
        if shard_checksum(mf) != rec["crc32c"]:
            raise StoreError(f"{file}: crc32c mismatch, the shard is corrupt")
    elif verify in ("ids", "crc") and hashlib.sha256(views["ids"]).hexdigest() != rec["ids_sha256"]:
        raise StoreError(f"{file}: sha256 of the ids mismatch, the shard is corrupt")
    feats = views["features"]
    ids = views["ids"]
    # safetensors aligns tensor data to 8 bytes; a foreign writer might not: copy then.
    if feats.ctypes.data % feats.dtype.itemsize or ids.ctypes.data % 8:
        feats, ids = feats.copy(), ids.copy()
    feats = feats.view(_NP_DTYPES[dtype]).reshape(rows, k)
    f = _as_tensor(feats)
    if dtype == "bfloat16":
        f = f.view(torch.bfloat16)
    return f, _as_tensor(ids.view(np.int64))


def iter_store_shards(
    store: ShardSource,
    shards: Sequence[int] | None = None,
    verify: Verify = "crc",
    readahead: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (features [rows_i, k], ids [rows_i] int64) of a store's shards, memory-mapped.

    Args:
        store: an open FeatureStore (or anything with its path, k, dtype and manifest).
        shards: indices of the shards to read, in that order (default: all).
        verify: "ids", "crc", "full" or "none" (VERIFY, above).
        readahead: a background thread maps, reads and checks shard i + 1 (MAP_POPULATE) while
            the caller works on shard i; without it pages are faulted in as the engine reads
            them (kernel read-ahead of the sequential mapping only).
    Yields:
        Read-only tensors backed by the page cache (features in the store dtype); a shard's
        mapping is released when the caller drops its tensors.

    Examples:
        >>> # for feats, ids in iter_store_shards(store, shards=[0, 2]): ...
    """
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    records = store.manifest["shards"]
    order = range(len(records)) if shards is None else list(shards)
    if not readahead:
        for i in order:
            yield map_shard(store, records[i], verify, populate=False)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrak-readahead")
    try:
        pending = None
        for i in order:
            pending = pending or pool.submit(map_shard, store, records[i], verify, True)
            shard = pending.result()
            pending = None
            nxt = _next(order, i)
            if nxt is not None:
                pending = pool.submit(map_shard, store, records[nxt], verify, True)
            yield shard
            del shard
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _next(order, i):
    """The index after i in order (order is a range or a list without repeats of i)."""
    if isinstance(order, range):
        return i + 1 if i + 1 < order.stop else None
    pos = order.index(i)
    return order[pos + 1] if pos + 1 < len(order) else None
