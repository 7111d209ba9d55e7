"""The result type (TopK), argument checks and feature sources of the top-k search (search.py)
and of the engines built on it (search_native.py, search_distributed.py, export.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrak_fast.engine.store import FeatureStore, iter_store_shards

TAILS = ("top", "bottom", "both")


@dataclass
class TopK:
    """Per-query top-k of both tails; a tail not requested is None.

    Attributes:
        top_values: [m, k] float32, largest scores first.
        top_ids: [m, k] int64, their ids.
        bottom_values: [m, k] float32, smallest scores first.
        bottom_ids: [m, k] int64, their ids.
        tails: "top", "bottom" or "both": which of the above are set.

    Examples:
        >>> from ctrak_fast.engine.search import topk
        >>> res = topk(torch.eye(3), torch.tensor([[0.0, 2.0, 1.0]]), k=2, backend="reference")
        >>> res.top_ids.tolist(), res.bottom_ids.tolist(), res.m, res.k
        ([[1, 2]], [[0, 2]], 1, 2)
    """

    top_values: Tensor | None
    top_ids: Tensor | None
    bottom_values: Tensor | None
    bottom_ids: Tensor | None
    tails: str = "both"

    @property
    def k(self) -> int:
        v = self.top_values if self.top_values is not None else self.bottom_values
        return int(v.shape[1])

    @property
    def m(self) -> int:
        v = self.top_values if self.top_values is not None else self.bottom_values
        return int(v.shape[0])

    @classmethod
    def from_tails(cls, out: dict[str, tuple[Tensor, Tensor]], tails: str) -> TopK:
        """From {"top": (values, ids), "bottom": (values, ids)}, either may be absent."""
        top = out.get("top", (None, None))
        bottom = out.get("bottom", (None, None))
        return cls(top[0], top[1], bottom[0], bottom[1], tails)


def check_tails(tails) -> None:
    if tails not in TAILS:
        raise ValueError(f"tails must be one of {TAILS}, got {tails!r}")


def check_k(k, n: int | None) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n is not None and k > n:
        raise ValueError(f"k={k} is larger than the number of feature rows ({n})")


def check_queries(u, dim: int | None) -> int:
    if not isinstance(u, Tensor) or not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {type(u).__name__}")
    if u.dim() != 2:
        raise ValueError(f"u must be [m, dim], got shape {list(u.shape)}")
    if u.shape[0] == 0:
        raise ValueError("empty query batch: u has 0 rows")
    if dim is not None and u.shape[1] != dim:
        raise ValueError(f"feature dimension {dim} does not match the queries' {u.shape[1]}")
    return int(u.shape[0])


def check_features(features, ids, name: str) -> tuple[int, int]:
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if features.dim() != 2:
        raise ValueError(f"{name} must be [n, dim], got shape {list(features.shape)}")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.shape[0] != features.shape[0]:
        shape = list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a [{features.shape[0]}] tensor, got {shape}")
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    return int(features.shape[0]), int(features.shape[1])


def open_source(source, verify: str = "crc", readahead: bool = True):
    """-> (iterable of (features, ids), n_rows or None, dim or None, n_shards or None, device)."""
    if isinstance(source, FeatureStore):
        shards = iter_store_shards(source, verify=verify, readahead=readahead)
        return shards, source.n_rows, source.k, len(source.manifest["shards"]), None
    if hasattr(source, "iter_shards"):
        shards = source.iter_shards()
        n_shards = len(source.shards) if hasattr(source, "shards") else None
        return shards, getattr(source, "n_rows", None), getattr(source, "k", None), n_shards, None
    if isinstance(source, Tensor):
        source = (source, torch.arange(source.shape[0] if source.dim() else 0))
    if isinstance(source, tuple | list) and len(source) == 2:
        features, ids = source
        n, dim = check_features(features, ids, "features")
        return [(features, ids)], n, dim, 1, features.device
    raise TypeError(
        "source must be a FeatureStore (with iter_shards()), a (features, ids) tuple or a "
        f"features tensor, got {type(source).__name__}"
    )


def validated_shards(shards, dim: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for i, (feats, ids) in enumerate(shards):
        n, d = check_features(feats, ids, f"shard {i} features")
        if dim is not None and d != dim:
            raise ValueError(f"shard {i} has feature dimension {d}, expected {dim}")
        yield feats, ids
