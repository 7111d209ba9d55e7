"""A dataset's training features into a FeatureStore (METHOD.md §4, §6): resumable, whole
batches per shard (a resumed run writes the bytes of an uninterrupted one), the DAS rows beside
them, and the policy for non-finite features. The features themselves: featurize.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from ctrak_fast.engine.store import MANIFEST, FeatureStore, remove_empty_store
from ctrak_fast.engine.store.sources import SOURCES, sources_meta, write_sources
from ctrak_fast.method.featurize import Featurizer
from ctrak_fast.method.rows import read_rows
from ctrak_fast.progress import progress as show_progress


def featurize_dataset(
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
    sources: dict[str, Any] | None = None,
    sources_file: bool = True,
) -> FeatureStore:
    """Write features of images [N,C,H,W] / conds [N,F] / ids [N] into a FeatureStore at `path`.
    images: a tensor, or a row source read a batch at a time (method/rows.py: a set larger than
    memory, O(batch) images resident); the store's bytes are the same either way.

    Resumes: samples already in the store are skipped; shards hold whole batches so a resumed run
    writes the same bytes as an uninterrupted one. With `das_path`, a second store receives the DAS
    rows (features scaled by the summed DSM loss; only for fixed-noise specs).

    nan_policy: what to do with a sample whose features are not finite in the store dtype (a
    NaN/Inf per-sample gradient, or a value that overflows float16). "fail" (default) raises
    NonFiniteFeatures naming every such sample id of the batch; nothing of that batch is written,
    so the run resumes once the data or model is fixed. "zero" stores zeros for those rows and
    lists their ids in the shard records (`FeatureStore.zeroed_ids()`): the sample keeps its row,
    so ids and shard boundaries stay those of a clean run, and scores 0 against every query.

    sources: the record of where each row came from (engine/store/sources.py); its checksum goes
    into the manifest's meta and, with `sources_file`, the record is written as each store's
    sources.json before its first row: a store that a kill leaves complete has it (a torchrun
    unit, part of a larger store, leaves it to the merge).
    """
    from ctrak_fast.engine.validation import check_positive, check_training_data

    if nan_policy not in ("fail", "zero"):
        raise ValueError(f"nan_policy must be 'fail' or 'zero', got {nan_policy!r}")
    check_positive("batch_size", batch_size)
    check_positive("shard_rows", shard_rows)
    # Whole batches per shard: a resumed run, or a rank's slice, then sees the same batches as an
    # uninterrupted run (batch composition changes the low bits of per-sample gradients).
    if shard_rows % batch_size:
        raise ValueError(
            f"shard_rows ({shard_rows}) must be a multiple of batch_size ({batch_size})"
        )
    check_training_data(images, conds, ids)
    meta = with_sources(featurizer.meta(), sources)
    k = featurizer.k
    targets = [(path, meta)]
    if das_path is not None:
        if featurizer.spec.inversion:
            raise ValueError("DAS weights need fixed-noise features (inversion off)")
        das_meta = {**meta, "das": "d-trak rows scaled by the DSM loss summed over timesteps"}
        targets.append((das_path, das_meta))
    # Stores this call creates: removed again if it fails before their first row (no trace).
    fresh = [
        (Path(p), not Path(p).exists()) for p, _ in targets if not (Path(p) / MANIFEST).exists()
    ]
    stores = [
        FeatureStore.open_or_create(
            p, k=k, dtype=dtype, meta=m, shard_rows=shard_rows, expected_rows=len(ids)
        )
        for p, m in targets
    ]
    present = []
    for store in stores:
        done = store.done_ids()
        if len(done) > len(ids) or not torch.equal(done, ids[: len(done)].to(done.dtype)):
            raise ValueError(
                f"store {store.path} holds other samples than this dataset's first {len(done)}"
            )
        present.append(len(done))
    if sources is not None and sources_file:  # after the spec check: never another run's record
        for store in stores:
            write_sources(store.path, sources)
    start = min(present)
    # A run killed after its last shard but before the closing manifest update left the store
    # marked incomplete: open the writers anyway so that it ends as an uninterrupted run does.
    if start == len(images) and all(s.complete for s in stores):
        return stores[0]
    try:
        _write_rows(
            featurizer, images, conds, ids, stores, present, batch_size, nan_policy, progress
        )
    except BaseException:
        for p, new_dir in fresh:
            if remove_empty_store(p):  # the manifest first: a kill here leaves no store
                (p / SOURCES).unlink(missing_ok=True)
                if new_dir:
                    with contextlib.suppress(OSError):  # not empty: not ours to remove
                        p.rmdir()
        raise
    return stores[0]


def with_sources(meta: dict[str, Any], sources: dict[str, Any] | None) -> dict[str, Any]:
    """A store's meta with the checksum of its sources record (when there is one)."""
    return meta if sources is None else {**meta, "sources": sources_meta(sources)}


def _write_rows(featurizer, images, conds, ids, stores, present, batch_size, nan_policy, progress):
    """Featurize from the first row some store lacks, appending to every store's writer."""
    from ctrak_fast.engine.validation import NonFiniteFeatures

    start, dtype = min(present), stores[0].dtype
    store_dtype = stores[0].torch_dtype
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(s.writer(expected_rows=len(ids))) for s in stores]
        bar = show_progress(
            range(start, len(images), batch_size),
            desc=f"featurize {featurizer.spec.loss}",
            enabled=progress,
            unit="batch",
        )
        for i in bar:
            sl = slice(i, min(i + batch_size, len(images)))
            phi, dsm = featurizer(read_rows(images, sl, ids), conds[sl])
            outputs = [phi] if len(stores) == 1 else [phi, phi * dsm[:, None]]
            nonfinite = torch.stack([~torch.isfinite(o).all(1) for o in outputs]).any(0).cpu()
            overflow = torch.stack([~torch.isfinite(o.to(store_dtype)).all(1) for o in outputs])
            overflow = overflow.any(0).cpu() & ~nonfinite
            zeroed = nonfinite | overflow
            if zeroed.any():
                if nan_policy == "fail":
                    why, bad = "NaN/Inf per-sample gradients", nonfinite
                    if not nonfinite.any():
                        why, bad = f"features that overflow {dtype}", overflow
                    hint = "fix the data or model, or pass --nan-policy zero to store zero rows"
                    raise NonFiniteFeatures(ids[sl][bad].tolist(), why, hint)
                outputs = [torch.where(zeroed[:, None].to(o.device), 0.0, o) for o in outputs]
            for w, rows, have in zip(writers, outputs, present, strict=True):
                skip = max(0, have - i)  # rows this store already holds
                if skip < len(rows):
                    w.append(rows[skip:], ids[sl][skip:], zeroed=zeroed[skip:])
