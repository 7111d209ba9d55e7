"""`FeatureStore.verify`: every byte of every shard re-read and checked against the manifest."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from ctrak_fast.engine.atomic import sha256_bytes
from ctrak_fast.engine.checksum import shard_checksum
from ctrak_fast.engine.store.manifest import MANIFEST, StoreError
from ctrak_fast.engine.store.shards import check_header, shard_file
from ctrak_fast.engine.store.sources import SOURCES, sources_problems


def verify_store(path: Path, m: dict) -> list[str]:
    """One line per problem of the store at ``path`` with manifest ``m`` (empty: intact)."""
    problems = []
    total = 0
    all_ids: list[torch.Tensor] = []
    for rec in m["shards"]:
        name = rec["file"]
        try:
            file = shard_file(path, name)
            problems.extend(f"{name}: {p}" for p in _verify_shard(file, rec, m, all_ids))
        except StoreError as e:
            problems.append(str(e))
        if rec["first_row"] != total:
            problems.append(f"{name}: first_row {rec['first_row']} != expected {total}")
        total += rec["rows"]
    if total != m["n_rows"]:
        problems.append(f"{MANIFEST}: n_rows {m['n_rows']} != sum of shard rows {total}")
    if all_ids:
        ids = torch.cat(all_ids)
        uniq, counts = torch.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            repeated = uniq[counts > 1][:3].tolist()
            problems.append(f"{int((counts > 1).sum())} ids appear more than once {repeated}")
    # The record of the rows' images is written before a store's first row (before a merge):
    # checked in a complete store, or wherever it is already there.
    complete = m.get("complete") is True
    if complete or (path / SOURCES).exists():
        on_disk = torch.cat(all_ids).tolist() if all_ids and complete else None
        problems.extend(sources_problems(path, m["meta"], on_disk))
    return problems


def _verify_shard(file: Path, rec: dict, m: dict, all_ids: list) -> list[str]:
    if not file.is_file():
        return ["missing"]
    data = file.read_bytes()
    if len(data) != rec["bytes"]:
        return [f"{len(data)} bytes, manifest says {rec['bytes']} (truncated?)"]
    if sha256_bytes(data) != rec["sha256"]:
        return ["sha256 mismatch (corrupt bytes)"]
    if "crc32c" in rec and shard_checksum(data) != rec["crc32c"]:
        return ["crc32c mismatch (the manifest's checksum was edited?)"]
    try:
        check_header(file, rec["rows"], m["k"], m["dtype"], len(data))
    except StoreError as e:
        return [str(e)]
    tensors = safetensors.torch.load(data)
    ids = tensors["ids"]
    all_ids.append(ids)
    if sha256_bytes(ids.numpy().tobytes()) != rec["ids_sha256"]:
        return ["ids_sha256 does not match the shard's ids (edited manifest?)"]
    if rec.get("zeroed_ids"):
        zeroed = torch.isin(ids, torch.tensor(rec["zeroed_ids"]))
        if int(zeroed.sum()) != len(rec["zeroed_ids"]) or tensors["features"][zeroed].any():
            return ["zeroed_ids do not match the shard's ids and rows"]
    return []
