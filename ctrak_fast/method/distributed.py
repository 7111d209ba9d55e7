"""Featurization over several processes (torchrun), resumable after a crash of any of them.

The unit of work is one shard of the final store: unit ``j`` holds dataset rows
``[j * shard_rows, (j + 1) * shard_rows)``. While a run is in progress, each unit is written as its
own one-shard FeatureStore::

    DIR/manifest.json, DIR/shard-*.safetensors   rows merged so far (absent at first)
    DIR/parts/part-00012/                         unit 12 (a FeatureStore: manifest, shard, lock)

1. Plan (rank 0, broadcast to all): every rank must have been started with the same spec and
   dataset; the units neither merged into ``DIR`` nor complete under ``DIR/parts`` are split into
   contiguous, equal runs, one per rank. So a rerun after a crash, with any number of ranks,
   redoes only the missing units.
2. Featurize: each rank writes its units with :func:`featurize_dataset`. A unit starts on a batch
   boundary (``batch_size`` divides ``shard_rows``), so every sample is computed in the same
   batch as in a single-process run, and its bytes do not depend on the number of ranks.
3. Merge (rank 0, once every rank has finished): :func:`merge_stores` hard-links the unit shards
   into ``DIR`` in row order and writes ``DIR/manifest.json`` once; then ``DIR/parts`` is removed.
   ``DIR`` then holds exactly the files a single-process ``featurize_dataset`` writes, byte for
   byte (given the same kernels: bits depend on the device type and on the intra-op thread count,
   which torchrun sets to 1 per process).

A single-process run with no ``DIR/parts`` writes into ``DIR`` directly, and a store it leaves
after a crash (whole shards only) is a valid start for a distributed rerun, and the other way
round. A rank that fails reports its error to all the others, so every rank exits with the same
message instead of waiting forever for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrak_fast.engine.dist import DistContext, RankFailed
from ctrak_fast.engine.store import (
    MANIFEST,
    FeatureStore,
    SpecMismatch,
    StoreError,
    merge_stores,
    remove_empty_store,
)
from ctrak_fast.engine.store.sources import write_sources
from ctrak_fast.engine.validation import InputError, check_positive, check_training_data
from ctrak_fast.method.dataset_features import featurize_dataset, with_sources
from ctrak_fast.method.featurize import Featurizer
from ctrak_fast.method.rows import rows_of
from ctrak_fast.progress import progress as show_progress

__all__ = [
    "DistContext",
    "RankFailed",
    "Plan",
    "PARTS",
    "part_path",
    "plan_units",
    "featurize_units",
    "merge_units",
    "featurize_distributed",
]

PARTS = "parts"
# Ranks wait for the slowest one at the end of a run (up to one unit plus the spread in speed of
# their devices): far beyond torch's 30-minute default on a run of GPU-days. A dead rank is seen at
# once (closed connection; torchrun also stops the group), so this only bounds a hung rank.


# ---- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a run does. ``merged[t]``: units already in target ``t``'s store (a prefix);
    ``missing``: units to featurize (sorted)."""

    n_rows: int
    shard_rows: int
    targets: tuple[str, ...]
    merged: tuple[int, ...]
    missing: tuple[int, ...]

    @property
    def n_units(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def rows(self, unit: int) -> slice:
        return slice(unit * self.shard_rows, min((unit + 1) * self.shard_rows, self.n_rows))

    def assignment(self, rank: int, world_size: int) -> list[int]:
        """Rank ``rank``'s units: a contiguous run of the missing ones, sizes within one."""
        n = len(self.missing)
        return list(self.missing[rank * n // world_size : (rank + 1) * n // world_size])


def part_path(store_path, unit: int) -> Path:
    return Path(store_path) / PARTS / f"part-{unit:05d}"


def _open_checked(path: Path, meta: dict, k: int, dtype: str, shard_rows: int):
    """The store at ``path`` (None if there is none) after checking that it has this spec."""
    if not (path / MANIFEST).exists():
        return None
    store = FeatureStore.open(path)
    try:
        for field, given in (("k", k), ("dtype", dtype), ("shard_rows", shard_rows)):
            if getattr(store, field) != given:
                raise SpecMismatch(path, field, getattr(store, field), given)
        store.check_compatible(meta)  # a DAS store has one more key ("das"): checked at merge
    except SpecMismatch:
        if store.n_rows or not remove_empty_store(path):  # a failed run's empty leftover: gone
            raise
        return None
    return store


def _rows_present(store, ids: torch.Tensor) -> int:
    if store is None:
        return 0
    done = store.done_ids()
    if len(done) > len(ids) or not torch.equal(done, ids[: len(done)]):
        raise StoreError(
            f"store {store.path} holds other samples than this dataset's rows there; "
            "was it made from another dataset?"
        )
    return len(done)


def plan_units(
    targets, meta: dict, ids: torch.Tensor, *, k: int, dtype: str, shard_rows: int
) -> Plan:
    """Inspect the stores at ``targets`` (main, optional DAS) and their parts; see the module
    docstring. Raises SpecMismatch / StoreError for anything that does not belong to this run."""
    ids = ids.to(torch.int64)
    targets = [Path(t) for t in targets]
    n_units = -(-len(ids) // shard_rows)
    merged = []
    for target in targets:
        store = _open_checked(target, meta, k, dtype, shard_rows)
        rows = _rows_present(store, ids)
        if rows != len(ids) and rows % shard_rows:  # the next unit could not be appended
            raise StoreError(
                f"store {target} ends with a short shard ({rows % shard_rows} rows) before the "
                f"end of the data ({rows} of {len(ids)} rows): append to it with a single process "
                "(ctrak featurize without torchrun), or use a new directory"
            )
        merged.append(n_units if rows == len(ids) else rows // shard_rows)
    missing = []
    for unit in range(min(merged), n_units):
        sl = slice(unit * shard_rows, min((unit + 1) * shard_rows, len(ids)))
        for target, done in zip(targets, merged, strict=True):
            if unit < done:
                continue
            part = _open_checked(part_path(target, unit), meta, k, dtype, shard_rows)
            # A part killed before its closing update is redone (the rerun only marks it complete)
            if (
                part is None
                or not part.complete
                or _rows_present(part, ids[sl]) < sl.stop - sl.start
            ):
                missing.append(unit)
                break
    return Plan(len(ids), shard_rows, tuple(map(str, targets)), tuple(merged), tuple(missing))


def featurize_units(
    featurizer: Featurizer,
    images: Any,
    conds: torch.Tensor,
    ids: torch.Tensor,
    plan: Plan,
    units,
    *,
    batch_size: int,
    dtype: str,
    nan_policy: str = "fail",
    progress: bool = False,
    sources: dict[str, Any] | None = None,
) -> None:
    """Write ``units`` (normally ``plan.assignment(rank, world_size)``) under the targets' parts.

    Each unit is a store of its own: a finished unit survives any later crash, and an unfinished
    one (its rows were still buffered, a unit being one shard) is recomputed by the next run.
    """
    main, das = plan.targets[0], (plan.targets[1] if len(plan.targets) > 1 else None)
    for unit in show_progress(units, desc="featurize units", unit="unit", enabled=progress):
        sl = plan.rows(unit)
        featurize_dataset(
            featurizer,
            rows_of(images, sl),  # a row source stays unread until its batches come up
            conds[sl],
            ids[sl],
            part_path(main, unit),
            batch_size=batch_size,
            shard_rows=plan.shard_rows,
            dtype=dtype,
            das_path=None if das is None else part_path(das, unit),
            nan_policy=nan_policy,
            progress=False,
            sources=sources,  # each unit has the run's meta, so the merge keeps it
            sources_file=False,  # a unit holds a slice of the rows: the target gets the file
        )


def merge_units(
    plan: Plan, ids: torch.Tensor, record: dict[str, Any] | None = None
) -> FeatureStore:
    """Append every unit not yet merged to its target store, check the result holds exactly
    ``ids`` in order, then remove the parts. Rerunning it after a crash is safe. ``record``, the
    run's sources record, is written into each target first: the merge that marks a store
    complete finds it there."""
    for target, done in zip(plan.targets, plan.merged, strict=True):
        if record is not None:
            write_sources(target, record)
        # Even with nothing to append: the merge marks a store complete that a killed single
        # process left with all its rows but without its closing manifest update.
        sources = [part_path(target, unit) for unit in range(done, plan.n_units)]
        store = merge_stores(target, sources, expected_rows=len(ids))
        if not torch.equal(store.done_ids(), ids.to(torch.int64)):
            raise StoreError(f"merged store {target} does not hold this dataset's ids in order")
    for target in plan.targets:  # only once every target is merged: the parts are the only copy
        shutil.rmtree(Path(target) / PARTS, ignore_errors=True)
    return FeatureStore.open(plan.targets[0])


# ---- the whole run ----------------------------------------------------------------------------


def featurize_distributed(
    featurizer: Featurizer,
    images: Any,
    conds: torch.Tensor,
    ids: torch.Tensor,
    path,
    *,
    batch_size: int = 32,
    shard_rows: int = 1024,
    dtype: str = "float32",
    das_path=None,
    nan_policy: str = "fail",
    progress: bool = True,
    dist_ctx: DistContext | None = None,
    sources: dict[str, Any] | None = None,
) -> FeatureStore:
    """:func:`featurize_dataset` over the ranks of ``dist_ctx`` (every rank calls it with the
    same arguments); returns the finished store on every rank. See the module docstring.

    Examples:
        >>> # torchrun --nproc_per_node=4 my_script.py, where my_script.py does:
        >>> with DistContext.from_env() as ctx:  # doctest: +SKIP
        ...     store = featurize_distributed(fz, images, conds, ids, "out/store", dist_ctx=ctx)
    """
    ctx = dist_ctx or DistContext()
    targets = [Path(path)] + ([Path(das_path)] if das_path is not None else [])
    kw: dict[str, Any] = dict(batch_size=batch_size, dtype=dtype, nan_policy=nan_policy)
    if ctx.world_size == 1 and not any((t / PARTS).exists() for t in targets):
        rest: dict[str, Any] = dict(
            shard_rows=shard_rows, das_path=das_path, progress=progress, sources=sources
        )
        return featurize_dataset(featurizer, images, conds, ids, path, **kw, **rest)
    meta = with_sources(featurizer.meta(), sources)
    k = featurizer.k

    def check_inputs():
        check_positive("batch_size", batch_size)
        check_positive("shard_rows", shard_rows)
        if shard_rows % batch_size:
            raise InputError(
                f"shard_rows ({shard_rows}) must be a multiple of batch_size ({batch_size})"
            )
        if nan_policy not in ("fail", "zero"):
            raise InputError(f"nan_policy must be 'fail' or 'zero', got {nan_policy!r}")
        if das_path is not None and featurizer.spec.inversion:
            raise InputError("DAS weights need fixed-noise features (inversion off)")
        check_training_data(images, conds, ids)

    ctx.run_everywhere(check_inputs)
    out = [str(t) for t in targets]
    _check_same_run(ctx, meta, images, ids, k=k, shard_rows=shard_rows, out=out, **kw)

    def make_plan():
        plan = plan_units(targets, meta, ids, k=k, dtype=dtype, shard_rows=shard_rows)
        for target in targets:
            (target / PARTS).mkdir(parents=True, exist_ok=True)
        token = (targets[0] / PARTS / f".run-{os.urandom(8).hex()}") if ctx.world_size > 1 else None
        if token is not None:
            token.touch()
        return plan, None if token is None else str(token)

    plan, token = ctx.on_rank0(make_plan)
    if token is not None:
        ctx.run_everywhere(lambda: _check_visible(Path(token), targets[0]))
        if ctx.rank == 0:
            Path(token).unlink()
    mine = plan.assignment(ctx.rank, ctx.world_size)
    ctx.run_everywhere(
        lambda: featurize_units(
            featurizer,
            images,
            conds,
            ids,
            plan,
            mine,
            progress=progress and ctx.rank == 0,
            sources=sources,
            **kw,
        )
    )

    def merge():
        merge_units(plan, ids, sources)  # nothing to broadcast: every rank reopens the store

    ctx.on_rank0(merge)
    return FeatureStore.open(path)


def _check_visible(token: Path, target: Path) -> None:
    if not token.exists():
        raise InputError(
            f"{target} is not shared by all ranks (a file rank 0 wrote there is not visible): "
            "--out must be on a filesystem every node mounts at the same path"
        )


def _check_same_run(ctx: DistContext, meta: dict, images, ids, **settings) -> None:
    """Refuse ranks started with different arguments, naming the field and both values."""
    mine = {f"meta.{key}": json.dumps(value, sort_keys=True) for key, value in meta.items()}
    mine["images"] = str(list(images.shape))
    mine["ids"] = "sha256:" + hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    mine.update({key: str(value) for key, value in settings.items()})
    every = ctx.all_gather(mine)
    for rank, theirs in enumerate(every):
        for field in sorted(set(mine) | set(theirs)):
            if theirs.get(field) != every[0].get(field):
                raise InputError(
                    f"rank {rank} was started with another {field}: {_short(theirs.get(field))} "
                    f"(rank 0: {_short(every[0].get(field))}); start every rank with the same "
                    "arguments"
                )


def _short(text) -> str:
    text = str(text)
    return text if len(text) <= 120 else text[:117] + "..."
