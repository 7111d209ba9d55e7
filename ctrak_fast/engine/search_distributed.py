"""Top-k over a FeatureStore searched by several ranks with torch.distributed, merged exactly.

Every rank opens the same store (a shared file system) and scores a contiguous block of its
shards, chosen from the manifest alone (:func:`rank_shards`, balanced by rows); the per-query
top-k lists of both tails are all-gathered and every rank merges them with the tie rule of
:func:`.search.topk` (score, then smaller id). A row's score does not depend on which
rank computes it (one float32 fma chain per score in every ISA variant but the portable
fallback), so the merged lists are the single-process result, bit for bit.

Collectives: gloo with CPU tensors, nccl with CUDA tensors (the group's backend decides). Under
``torchrun`` :func:`.dist.distributed_session` creates the process group from the environment.

Examples:
    >>> # torchrun --nproc-per-node 2 script.py, where script.py does:
    >>> # with distributed_session() as (rank, world):
    >>> #     res = topk_distributed(FeatureStore.open("store"), u, k=1000)  # same on every rank
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from ctrak_fast.engine.dist import all_or_none, collective_device, rank_shards
from ctrak_fast.engine.search import merge_topk, topk
from ctrak_fast.engine.search_inputs import TopK, check_k, check_queries, check_tails
from ctrak_fast.engine.store import FeatureStore, iter_store_shards
from ctrak_fast.engine.store.shards import Verify


class _ShardSubset:
    """The topk source of one rank: some shards of a store."""

    def __init__(self, store: FeatureStore, shards: list[int], verify: str, readahead: bool):
        records = store.manifest["shards"]
        self.store, self.indices = store, shards
        self.verify, self.readahead = verify, readahead
        self.n_rows = sum(records[i]["rows"] for i in shards)
        self.k = store.k
        self.shards = [records[i] for i in shards]

    def iter_shards(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter_store_shards(self.store, self.indices, self.verify, self.readahead)


def topk_distributed(
    store: FeatureStore,
    u: Tensor,
    k: int,
    tails: str = "both",
    backend: str = "auto",
    group=None,
    num_threads: int = 0,
    verify: Verify = "crc",
    readahead: bool = True,
    progress: bool = False,
) -> TopK:
    """:func:`.search.topk` of a store, its shards split over the ranks of ``group``.

    Collective: every rank of the group calls it with the same store, queries, k and tails.

    Args:
        store: the FeatureStore every rank opened.
        u: [m, dim] queries (same on every rank; on this rank's GPU for the CUDA engine).
        k: 1 <= k <= store.n_rows; a rank holding fewer rows pads its list.
        tails, backend, num_threads, verify, readahead, progress: as in ``topk`` (per rank).
        group: a torch.distributed process group (default: the world).
    Returns:
        TopK [m, k] on the CPU, identical on every rank.
    """
    check_tails(tails)
    check_queries(u, store.k)
    check_k(k, store.n_rows)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = [rec["rows"] for rec in store.manifest["shards"]]
    local = _ShardSubset(store, rank_shards(rows, world, rank), verify, readahead)
    names = [t for t in ("top", "bottom") if tails in (t, "both")]
    m = int(u.shape[0])
    with all_or_none(group, "topk_distributed"):
        if local.n_rows:
            res = topk(
                local,
                u,
                min(k, local.n_rows),
                tails=tails,
                backend=backend,
                progress=progress,
                num_threads=num_threads,
            )
        else:  # more ranks than shards: this rank contributes padding only
            empty = (torch.empty(m, 0), torch.empty(m, 0, dtype=torch.int64))
            res = TopK.from_tails({t: empty for t in names}, tails)
    res = merge_topk([res], k)  # pads a short list to [m, k] with NaN / -1

    device = collective_device(group)
    values = torch.stack([getattr(res, f"{t}_values") for t in names]).to(device)
    ids = torch.stack([getattr(res, f"{t}_ids") for t in names]).to(device)
    all_v = [torch.empty_like(values) for _ in range(world)]
    all_i = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_v, values, group=group)
    dist.all_gather(all_i, ids, group=group)
    parts = [
        TopK.from_tails({t: (v[j].cpu(), i[j].cpu()) for j, t in enumerate(names)}, tails)
        for v, i in zip(all_v, all_i, strict=True)
    ]
    return merge_topk(parts, k)


def gram_distributed(
    store: FeatureStore, group=None, verify: Verify = "crc", readahead: bool = True
) -> Tensor:
    """G = Phi^T Phi of the whole store, each rank summing its shards, then all-reduced.

    Collective. Returns the same [k, k] float64 tensor (CPU) on every rank; it equals
    ``scoring.gram(store)`` up to the order of the float64 sums.
    """
    from ctrak_fast.engine.gram import gram

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = [rec["rows"] for rec in store.manifest["shards"]]
    mine = rank_shards(rows, world, rank)
    device = collective_device(group)
    with all_or_none(group, "gram_distributed"):
        if mine:
            g = gram(iter_store_shards(store, mine, verify, readahead))
        else:
            g = torch.zeros(store.k, store.k, dtype=torch.float64)
    g = g.to(device)
    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
    return g.cpu()


__all__ = ["gram_distributed", "topk_distributed"]
