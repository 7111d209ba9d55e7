"""FeatureStore: projected training features on disk, as safetensors shards plus a JSON manifest.

The rooms of the store: manifest.py (format, spec fields, errors, fingerprints), shards.py (the one
safetensors-header parser, shard checks, memory-mapped reading), store.py (FeatureStore: create,
open, read), verify.py (every byte re-read), writer.py (the one writer and its lock), merge.py
(merging stores by linking shard files). Layout and guarantees: store.py's docstring.
"""

from ctrak_fast.engine.store.manifest import (
    DTYPES,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    SpecMismatch,
    StoreError,
    model_fingerprint,
)
from ctrak_fast.engine.store.merge import merge_stores
from ctrak_fast.engine.store.shards import iter_store_shards
from ctrak_fast.engine.store.store import FeatureStore, iter_features
from ctrak_fast.engine.store.writer import StoreWriter, remove_empty_store

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "MANIFEST",
    "FeatureStore",
    "SpecMismatch",
    "StoreError",
    "StoreWriter",
    "iter_features",
    "iter_store_shards",
    "merge_stores",
    "model_fingerprint",
    "remove_empty_store",
]
