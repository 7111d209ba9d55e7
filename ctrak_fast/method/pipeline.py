"""The one attribution pipeline: featurize -> score -> top-k, single process or one rank of a
torchrun job. The Attributor, every CLI command and the benchmarks go through it.

- `featurize`: training features of a data set into a FeatureStore (resumable; DAS rows beside
  it; under torchrun every rank writes its own units, merged at the end).
- `solve`: the preconditioned queries u = (ΦᵀΦ + λI)⁻¹q for one or many λ (the Gram built
  across ranks on the primal path).
- `search`: exact two-tailed top-k of φ_i·u (each rank its block of shards, lists merged).
- `scored_store` / `das_row_scale`: DAS, the one place it is defined: D-TRAK's u scored against
  rows scaled by each sample's summed DSM loss (a second store, `das_store_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from ctrak_fast.engine.dist import distributed_session
from ctrak_fast.engine.scoring import DualPreconditioner, Preconditioner, precondition
from ctrak_fast.engine.search import topk
from ctrak_fast.engine.search_distributed import gram_distributed, topk_distributed
from ctrak_fast.engine.search_inputs import TopK
from ctrak_fast.engine.store import FeatureStore, StoreError, iter_store_shards
from ctrak_fast.engine.store.shards import Verify
from ctrak_fast.engine.sweep import solve_queries
from ctrak_fast.method.distributed import DistContext, featurize_distributed
from ctrak_fast.method.featurize import Featurizer

__all__ = [
    "PreconditionerCache",
    "das_row_scale",
    "das_store_path",
    "featurize",
    "scored_store",
    "score_topk",
    "search",
    "solve",
]


def das_store_path(store: str | os.PathLike[str]) -> Path:
    """Where method "das" keeps its DAS rows next to the D-TRAK store `store`: `<store>.das`.

    Examples:
        >>> das_store_path("out/store").name
        'store.das'
    """
    p = Path(store)
    return p.with_name(p.name + ".das")


def featurize(
    featurizer: Featurizer,
    x0: Any,
    conds: Tensor,
    ids: Tensor,
    store: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    shard_rows: int | None = None,
    dtype: str = "float32",
    das_path: str | os.PathLike[str] | None = None,
    nan_policy: str = "fail",
    progress: bool = False,
    dist_ctx: DistContext | None = None,
    sources: dict[str, Any] | None = None,
) -> FeatureStore:
    """Features of x0 [N,...] / conds [N,...] / ids [N] into the FeatureStore `store` (resumed
    when present); with `das_path`, the DAS rows into a second store. Single process, or every
    rank of `dist_ctx` (the same call on each). shard_rows: default 16 batches.

    sources: where each row came from (image files and captions, or the data's generator: see
    engine/store/sources.py and ctrak_fast.data.sources); recorded in the manifest's meta and
    written as its sources.json before the store can be complete (by rank 0)."""
    return featurize_distributed(
        featurizer,
        x0,
        conds,
        ids,
        store,
        batch_size=batch_size,
        shard_rows=shard_rows or batch_size * 16,
        dtype=dtype,
        das_path=das_path,
        nan_policy=nan_policy,
        progress=progress,
        dist_ctx=dist_ctx,
        sources=sources,
    )


def solve(
    store: FeatureStore,
    q: Tensor,
    lambdas: Sequence[float],
    *,
    path: str = "primal",
    precision: str = "float64",
    device: str | None = None,
    verify: Verify = "crc",
    world: int = 1,
) -> Tensor:
    """Preconditioned queries [n_lambda * m, k], lambda-major (the m queries at lambdas[0],
    then ...). In a job of `world` > 1 ranks the primal Gram is summed over the ranks' shards;
    the dual path reads the (small, N < k) store on every rank."""
    if world > 1 and path == "primal":
        u = solve_queries(store, q, lambdas, gram_matrix=gram_distributed(store, verify=verify))
    else:
        shards = iter_store_shards(store, verify=verify)
        u = solve_queries(shards, q, lambdas, path=path, precision=precision, device=device)
    return u.reshape(-1, store.k)


def search(
    store: FeatureStore,
    u: Tensor,
    k: int,
    *,
    tails: Literal["top", "bottom", "both"] = "both",
    backend: Literal["auto", "cpu", "cuda", "reference"] = "auto",
    verify: Verify | None = None,
    world: int = 1,
) -> TopK:
    """Exact top-k of the scores φ_i·u_j over the store, both tails by default; in a job of
    `world` > 1 ranks each searches its block of shards and the lists are merged exactly."""
    kw: dict[str, Any] = {} if verify is None else {"verify": verify}
    if world > 1:
        return topk_distributed(store, u, k, tails=tails, **kw)
    return topk(store, u, k, tails=tails, backend=backend, **kw)


class PreconditionerCache:
    """(G + λI)'s factor of the last store scored, by the cheaper path (the N x N kernel when
    N < k). Its Gram is kept up to k = `keep_gram_max_k` (a λ change or repeated queries then pay
    no pass over the store); above it, G is factored in place and a new λ reads the store again."""

    def __init__(self, keep_gram_max_k: int) -> None:
        self.keep_gram_max_k = keep_gram_max_k
        self._pre: tuple[tuple[str, ...], Preconditioner | DualPreconditioner] | None = None

    def get(self, st: FeatureStore, lambda_r: float) -> Preconditioner | DualPreconditioner:
        """The preconditioner of `st` at `lambda_r` (cached by the store's path and shards)."""
        key = (str(st.path.resolve()), *(s["sha256"] for s in st.shards))
        keep = st.k <= self.keep_gram_max_k
        if self._pre is None or self._pre[0] != key:
            self._pre = key, precondition(st, lambda_r, keep_gram=keep)
        elif self._pre[1].lambda_r != float(lambda_r):
            pre = self._pre[1]
            can = isinstance(pre, DualPreconditioner) or pre.gram is not None
            self._pre = key, pre.with_lambda(lambda_r) if can else precondition(st, lambda_r)
        return self._pre[1]


def score_topk(
    store: FeatureStore,
    q: Tensor,
    k: int,
    lambdas: Sequence[float] = (1.0,),
    *,
    das: bool = False,
    path: str = "primal",
    precision: str = "float64",
    device: str | None = None,
    verify: Verify = "crc",
) -> tuple[TopK, Tensor, int]:
    """solve then search, as one process or one rank of a torchrun job: (the top-k of both
    tails, u [n_lambda * m, k], this process's rank: only rank 0 should report)."""
    with distributed_session() as (rank, world):
        u = solve(
            store,
            q,
            lambdas,
            path=path,
            precision=precision,
            device=device,
            verify=verify,
            world=world,
        )
        res = search(scored_store(store, das), u, k, verify=verify, world=world)
    return res, u, rank


def scored_store(store: FeatureStore, das: bool) -> FeatureStore:
    """The store whose rows are scored: `store` itself, or for DAS its DAS rows (scored with the
    u of `store`'s preconditioner)."""
    if not das:
        return store
    rows = FeatureStore.open(das_store_path(store.path))
    if "das" not in rows.meta:
        raise StoreError(f"{rows.path} holds no DAS rows (made with another method?)")
    return rows


def das_row_scale(phi: Tensor, das: Tensor) -> Tensor:
    """Each sample's DAS weight [N] (its summed DSM loss) from its D-TRAK row phi [N, k] and DAS
    row das [N, k] = weight * phi: dense DAS scores are D-TRAK scores times it."""
    return ((das * phi).sum(1) / (phi * phi).sum(1).clamp_min(1e-30)).float()
