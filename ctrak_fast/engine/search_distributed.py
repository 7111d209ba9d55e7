"""Top-k over a FeatureStore searched by several ranks with torch.distributed, merged exactly.

Every rank opens the same store (a shared file system) and scores a contiguous block of its
shards, chosen from the manifest alone (:func:`rank_shards`, balanced by rows); the per-query
top-k lists of both tails are all-gathered and every rank merges them with the tie rule of
:func:`.search.topk` (score, then smaller id). A row's score does not depend on which
rank computes it (one float32 fma chain per score in every ISA variant but the portable
fallback), so the merged lists are the single-process result, bit for bit.

Collectives: gloo with CPU tensors, nccl with CUDA tensors (the group's backend decides). Under
``torchrun`` :func:`distributed_session` creates the process group from the environment.

Examples:
    >>> # torchrun --nproc-per-node 2 script.py, where script.py does:
    >>> # with distributed_session() as (rank, world):
    >>> #     res = topk_distributed(FeatureStore.open("store"), u, k=1000)  # same on every rank
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from ctrak_fast.engine.search import merge_topk, topk
from ctrak_fast.engine.search_inputs import TopK, check_k, check_queries, check_tails
from ctrak_fast.engine.store import FeatureStore, StoreError, iter_store_shards
from ctrak_fast.engine.store.shards import Verify


def rank_shards(rows: list[int], world: int, rank: int) -> list[int]:
    """Shard indices of one rank: contiguous blocks, balanced by rows.

    Shard i goes to the rank whose equal share of the rows holds its middle row, so every shard
    goes to exactly one rank and a rank's rows differ from N / world by less than a shard.

    Args:
        rows: row count of every shard, in store order.
        world, rank: 0 <= rank < world.

    Examples:
        >>> rank_shards([100, 100, 100, 50], 2, 0), rank_shards([100, 100, 100, 50], 2, 1)
        ([0, 1], [2, 3])
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    total = sum(rows)
    out, start = [], 0
    for i, n in enumerate(rows):
        if (2 * start + n) * world // (2 * max(total, 1)) == rank:
            out.append(i)
        start += n
    return out


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


class RankFailed(RuntimeError):
    """Another rank's local step failed with an error of a class not re-raised as such."""


# Errors re-raised on every rank under their own class, so that the CLI reports them the same way
# on all of them (one line); anything else becomes RankFailed.
_RERAISED = {c.__name__: c for c in (StoreError, ValueError, TypeError, OSError, KeyError)}
_NAME_BYTES, _MSG_BYTES = 32, 480


@contextlib.contextmanager
def _all_or_none(group, what: str) -> Iterator[None]:
    """Run a rank's local step; if it fails on any rank, every rank raises (the failing one its
    own error, the others the first failing rank's message) instead of waiting in the next
    collective until the timeout. One all_gather of a fixed-size status per call:
    [failed, class name (32 bytes), utf-8 message (480 bytes)]."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # re-raised below, after the other ranks have been told
        error = e
    status = torch.zeros(1 + _NAME_BYTES + _MSG_BYTES, dtype=torch.uint8)
    if error is not None:
        status[0] = 1
        # The nearest re-raisable base class (FileNotFoundError -> OSError), else the class.
        mro = type(error).__mro__
        name = next((c.__name__ for c in mro if c in _RERAISED.values()), mro[0].__name__)
        name = name.encode()[:_NAME_BYTES]
        text = (str(error).splitlines() or [type(error).__name__])[0].encode()[:_MSG_BYTES]
        for off, raw in ((1, name), (1 + _NAME_BYTES, text)):
            status[off : off + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    status = status.to(_collective_device(group))
    every = [torch.empty_like(status) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, status, group=group)
    if error is not None:
        raise error
    for rank, st in enumerate(every):
        if st[0].item():
            raw = bytes(st[1:].cpu().tolist())
            name = raw[:_NAME_BYTES].rstrip(b"\0").decode(errors="replace")
            msg = raw[_NAME_BYTES:].rstrip(b"\0").decode(errors="replace")
            cls = _RERAISED.get(name)
            if cls is not None:
                raise cls(f"{what}: rank {rank}: {msg}")
            raise RankFailed(f"{what}: rank {rank} failed with {name}: {msg}")


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    with _all_or_none(group, "topk_distributed"):
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

    device = _collective_device(group)
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
    device = _collective_device(group)
    with _all_or_none(group, "gram_distributed"):
        if mine:
            g = gram(iter_store_shards(store, mine, verify, readahead))
        else:
            g = torch.zeros(store.k, store.k, dtype=torch.float64)
    g = g.to(device)
    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
    return g.cpu()


@contextlib.contextmanager
def distributed_session() -> Iterator[tuple[int, int]]:
    """(rank, world) of this process; under torchrun (WORLD_SIZE > 1) a process group is created
    from the environment (nccl when CUDA is available, else gloo) and destroyed on exit. An
    existing process group is used as is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if world <= 1:
        yield 0, 1
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


__all__ = [
    "RankFailed",
    "distributed_session",
    "gram_distributed",
    "rank_shards",
    "topk_distributed",
]
