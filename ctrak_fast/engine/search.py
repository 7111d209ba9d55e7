"""Exact top-k inner-product search over feature shards, both tails.

For preconditioned queries ``u [m, k]`` and training features ``phi [N, k]`` the attribution
score of row i for query q is ``phi_i . u_q``; :func:`topk` returns, per query, the k largest
(most supporting) and k smallest (most opposing) scores with their ids, streaming a
:class:`~ctrak_fast.engine.store.FeatureStore` shard by shard so memory stays at one shard plus the
result whatever N is.

Engines (``backend=``):
    ``"cpu"``        ``ctrak_fast._C.TopKState``: C++ blocked GEMM with the selection fused,
                     AVX-512 / AVX2 / portable variants picked at run time, its own thread
                     pool (workers sleep between calls; see csrc/thread_pool.h). bfloat16
                     features: ``Bf16TopKState`` (AVX512-BF16 scores, float32 re-scoring of
                     every row that can reach the k-th: the same result; search_bf16.py).
    ``"cuda"``       ``ctrak_fast._C.CudaTopKState``: fused score + threshold kernel with
                     block-level candidate lists and a per-query radix select, any k.
    ``"reference"``  :func:`topk_reference` in plain torch (float64 scores): the specification.
    ``"auto"``       CUDA queries or features -> ``"cuda"``, otherwise ``"cpu"``; without the
                     compiled extension it warns and uses ``"reference"``.

Reading a FeatureStore (:func:`iter_store_shards`): each shard file is memory-mapped (no copy
out of the page cache) and, with ``readahead``, a background thread maps and populates shard
i + 1 while the engine scores shard i, so the disk reads overlap the compute. Memory is the
mapped shards (at most three at a time, file-backed and reclaimable) plus the result, whatever N.

What "verified" means at scale (``verify=``). sha256 runs at ~1-2 GB/s per core, slower than
the search streams a store; the block CRC-32C of checksum.py runs at ~25 GB/s on one core, in the
read-ahead thread, so every byte can be checked on every search (benchmarks/bench_verify.py: within
noise of no check at all, k = 2048 float16, 16 queries):
    ``"crc"``   (default) every shard's block CRC-32C (manifest ``crc32c``) is compared before it
                is scored: any changed byte of features, ids or header is refused. Stores written
                before the field existed get the ``"ids"`` check.
    ``"ids"``   each shard's ids tensor is hashed (sha256) and compared with the manifest: every id
                returned is one the writer wrote; corrupted feature bytes go unseen.
    ``"full"``  every shard file's sha256 is compared with the manifest before it is scored (in
                the read-ahead thread, off the compute path but not free).
    ``"none"``  size and header only (FeatureStore.open checks those for every mode).

Semantics shared by all engines: per query and tail the result is the first k rows in the total
order (score descending for the top tail / ascending for the bottom tail, then id ascending),
so equal scores prefer the smaller id. Results are CPU tensors.

Tolerances (the policy the tests enforce). The reference scores in float64 from the features
as stored (fp16 / bf16 widen exactly). The native engines score in float32: each score is one
fused-multiply-add chain over the feature dimension, so by the standard bound for recursive
summation ``|s_fast - s_exact| <= gamma(k) * sum_d |phi_id * u_qd|`` with
``gamma(k) = k * 2**-24 / (1 - k * 2**-24)``; :func:`fp32_error_bound` returns that bound per
query (maximised over rows). Consequently returned values agree with the exact scores of the
returned ids within the bound, the j-th returned exact score is within twice the bound of the
reference's j-th, and returned ids equal the reference's except among scores tied within
twice the bound. Rows whose score is NaN are never selected by the native engines. The CUDA
engine's tensor-core path (float16 / bfloat16 features) forms the same products exactly but
accumulates inside the MMA units (truncation, order of the hardware): its bound is
``fp32_error_bound(..., engine="mma")``.

Examples:
    >>> import torch
    >>> from ctrak_fast.engine.search import topk
    >>> feats = torch.randn(1000, 64).half()
    >>> ids = torch.arange(1000) + 10**6
    >>> u = torch.randn(3, 64)
    >>> res = topk((feats, ids), u, k=5)
    >>> res.top_ids.shape, res.bottom_values.shape
    (torch.Size([3, 5]), torch.Size([3, 5]))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from ctrak_fast.engine import native
from ctrak_fast.engine.search_inputs import (
    TopK,
    check_features,
    check_k,
    check_queries,
    check_tails,
    open_source,
    validated_shards,
)
from ctrak_fast.engine.search_native import run_cpu, run_cuda
from ctrak_fast.engine.store import iter_store_shards
from ctrak_fast.engine.store.shards import VERIFY, Verify

Tails = Literal["top", "bottom", "both"]
Backend = Literal["auto", "cpu", "cuda", "reference"]

_BACKENDS = ("auto", "cpu", "cuda", "reference")


def fp32_error_bound(features: Tensor, u: Tensor, engine: Literal["fma", "mma"] = "fma") -> Tensor:
    """Worst-case error of a native engine's float32 score, per query.

    Args:
        features: [n, k] any float dtype.
        u: [m, k].
        engine: ``"fma"``: one float32 fma chain over d (CPU engine, CUDA float32 path):
            ``gamma(k) * max_i sum_d |features_id * u_qd|``. ``"mma"``: the CUDA tensor-core
            path (exact float16 / bfloat16 products, hi and lo query parts accumulated apart in
            the MMA units, which truncate): ``2 * gamma(k + 1)`` in place of ``gamma(k)``, plus
            the query split's residual ``2**-33 * max_d |u_qd| * max_i sum_d |features_id|``.
    Returns:
        [m] float64.
    """
    if engine not in ("fma", "mma"):
        raise ValueError(f"engine must be 'fma' or 'mma', got {engine!r}")
    k = features.shape[1]
    unit = 2.0**-24

    def gamma(n: int) -> float:
        return n * unit / (1 - n * unit)

    f, u64 = features.double().abs(), u.double().abs()
    abs_dot = (f @ u64.T).amax(dim=0)  # [m]
    if engine == "fma":
        return gamma(k) * abs_dot
    split = 2.0**-33 * u64.amax(dim=1) * f.sum(dim=1).amax()
    return 2 * gamma(k + 1) * abs_dot + split


def _select(values: Tensor, ids: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """values [m, c] float64, ids [m, c] int64 -> best k per row (value, then smaller id)."""
    order = torch.argsort(ids, dim=1, stable=True)
    values, ids = values.gather(1, order), ids.gather(1, order)
    idx = torch.sort(values, dim=1, descending=largest, stable=True).indices[:, :k]
    return values.gather(1, idx), ids.gather(1, idx)


def topk_reference(features: Tensor, ids: Tensor, u: Tensor, k: int, tails: Tails = "both") -> TopK:
    """The specification of :func:`topk`: exact scores in float64, full sort.

    Args:
        features: [n, dim] any float dtype (scored as float64).
        ids: [n] int64.
        u: [m, dim] queries.
        k: 1 <= k <= n.
        tails: "top", "bottom" or "both".
    Returns:
        TopK with float32 values (rounded from float64) and int64 ids, on features' device.

    Examples:
        >>> f, u = torch.randn(50, 8), torch.randn(2, 8)
        >>> topk_reference(f, torch.arange(50), u, 3).top_ids.shape
        torch.Size([2, 3])
    """
    check_tails(tails)
    n, dim = check_features(features, ids, "features")
    m = check_queries(u, dim)
    check_k(k, n)
    scores = (features.double() @ u.double().to(features.device).T).T  # [m, n]
    all_ids = ids.to(torch.int64).to(features.device).expand(m, n)
    out = {}
    for tail in ("top", "bottom"):
        if tails in (tail, "both"):
            v, i = _select(scores, all_ids, k, largest=tail == "top")
            out[tail] = (v.float(), i)
    return TopK.from_tails(out, tails)


def topk(
    source,
    u: Tensor,
    k: int,
    tails: Tails = "both",
    backend: Backend = "auto",
    progress: bool = False,
    num_threads: int = 0,
    verify: Verify = "crc",
    readahead: bool = True,
    bf16_search: bool = True,
) -> TopK:
    """Exact top-k inner products of queries against every feature row, both tails.

    Args:
        source: a FeatureStore (memory-mapped shard by shard, see :func:`iter_store_shards`),
            anything else with ``iter_shards()`` yielding (features [n_i, dim], ids [n_i] int64)
            (``n_rows``, ``k`` and ``shards`` are used when present), a (features [n, dim],
            ids [n] int64) tuple, or a features tensor (ids = row index). Features: float16,
            bfloat16 or float32 (other floats are converted to float32).
        u: [m, dim] queries, m >= 1 (float32; CUDA queries select the CUDA engine).
        k: results per query and tail, 1 <= k <= number of rows.
        tails: "top", "bottom" or "both".
        backend: "auto", "cpu", "cuda" or "reference" (see the module docstring).
        progress: tqdm bar over shards when the source has more than one.
        num_threads: CPU engine threads (0: $OMP_NUM_THREADS, else every CPU this process may use).
        verify: FeatureStore sources only: "crc", "ids", "full" or "none" (module docstring).
        readahead: FeatureStore sources only: map and read shard i + 1 in a background thread
            while shard i is scored.
        bf16_search: CPU engine, bfloat16 features: score with AVX512-BF16 and re-score the
            rows that can reach the k-th in float32 (the same ids and values as the float32
            engine, faster); False runs the float32 engine. Ignored without AVX512-BF16.
    Returns:
        TopK with [m, k] float32 values and int64 ids on the CPU.
    Raises:
        ValueError: empty query batch, k < 1, k larger than the number of rows, feature
            dimension different from the queries', bad tails, backend or verify.
        StoreError: a shard fails its check (names the file).

    Examples:
        >>> feats, u = torch.randn(500, 32), torch.randn(4, 32)
        >>> res = topk((feats, torch.arange(500)), u, k=10, tails="top")
        >>> res.top_values.shape, res.bottom_values is None
        (torch.Size([4, 10]), True)
    """
    check_tails(tails)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    shards, n_rows, dim, n_shards, device = open_source(source, verify, readahead)
    m = check_queries(u, dim)
    dim = int(u.shape[1])
    check_k(k, n_rows)

    if backend == "auto":
        backend = "cuda" if u.is_cuda or (device is not None and device.type == "cuda") else "cpu"
        want_cuda = backend == "cuda"
        if not native.available() or (want_cuda and not native.has_cuda()):
            what = "with the CUDA engine " if want_cuda else ""
            warnings.warn(
                f"ctrak_fast._C {what}is not available; top-k falls back to the slow torch "
                f"reference. {native.BUILD_HINT}",
                RuntimeWarning,
                stacklevel=2,
            )
            backend = "reference"

    if progress and (n_shards is None or n_shards > 1):
        from tqdm.auto import tqdm

        shards = tqdm(shards, total=n_shards, desc="top-k", unit="shard")
    shards = validated_shards(shards, dim)
    if backend == "reference":
        return _run_reference(shards, u, k, tails, m)
    if backend == "cpu":
        return run_cpu(shards, u, k, tails, num_threads, bf16_search)
    return run_cuda(shards, u, k, tails, device)


# --- engines -----------------------------------------------------------------------------------


def _run_reference(shards: Iterable[tuple[Tensor, Tensor]], u: Tensor, k: int, tails, m: int):
    best: dict[str, tuple[Tensor, Tensor]] = {}
    seen = 0
    u64 = u.detach().double()
    for feats, ids in shards:
        seen += feats.shape[0]
        scores = (feats.double() @ u64.to(feats.device).T).T.cpu()  # [m, n_i]
        ids = ids.to(torch.int64).cpu().expand(m, -1)
        for tail in ("top", "bottom"):
            if tails in (tail, "both"):
                if tail in best:
                    v, i = best[tail]
                    cand_v, cand_i = torch.cat([v, scores], 1), torch.cat([i, ids], 1)
                else:
                    cand_v, cand_i = scores, ids
                best[tail] = _select(cand_v, cand_i, k, largest=tail == "top")
    check_k(k, seen)
    return TopK.from_tails({t: (v.float(), i) for t, (v, i) in best.items()}, tails)


# --- FeatureStore shards ------------------------------------------------------------------------


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Exact top-k of the union of top-k lists of disjoint row sets, same tie rule.

    Args:
        parts: TopK results of the same queries and tails over disjoint rows, each [m, k_i];
            entries with id -1 (NaN value) are padding and are never selected.
        k: results per query and tail.
    Returns:
        TopK [m, k]; padded with NaN / -1 if the parts hold fewer than k valid entries.

    Examples:
        >>> f = torch.randn(10, 4)
        >>> u = torch.randn(2, 4)
        >>> a = topk_reference(f[:6], torch.arange(6), u, 3)
        >>> b = topk_reference(f[6:], torch.arange(6, 10), u, 3)
        >>> ref = topk_reference(f, torch.arange(10), u, 3)
        >>> torch.equal(merge_topk([a, b], 3).top_ids, ref.top_ids)
        True
    """
    if not parts:
        raise ValueError("merge_topk: no parts")
    check_k(k, None)
    tails = parts[0].tails
    out = {}
    for tail in ("top", "bottom"):
        if tails not in (tail, "both"):
            continue
        v = torch.cat([getattr(p, f"{tail}_values").float().cpu() for p in parts], 1)
        i = torch.cat([getattr(p, f"{tail}_ids").long().cpu() for p in parts], 1)
        if v.shape[1] < k:  # fewer candidates than k: pad, the padding sorts last
            v = torch.cat([v, v.new_full((v.shape[0], k - v.shape[1]), float("nan"))], 1)
            i = torch.cat([i, i.new_full((i.shape[0], k - i.shape[1]), -1)], 1)
        valid = (i >= 0) & ~torch.isnan(v)
        worst = float("-inf") if tail == "top" else float("inf")
        key = torch.where(valid, v, torch.full_like(v, worst))
        # Three stable sorts, least significant key first: id, value, validity.
        order = torch.sort(torch.where(valid, i, torch.iinfo(torch.int64).max), 1).indices
        o2 = torch.sort(key.gather(1, order), dim=1, descending=tail == "top", stable=True).indices
        order = order.gather(1, o2)
        o3 = torch.sort((~valid).gather(1, order).to(torch.uint8), dim=1, stable=True).indices
        order = order.gather(1, o3)[:, :k]
        keep = valid.gather(1, order)
        vals = torch.where(keep, v.gather(1, order), torch.full(order.shape, float("nan")))
        ids = torch.where(keep, i.gather(1, order), torch.full(order.shape, -1))
        out[tail] = (vals, ids)
    return TopK.from_tails(out, tails)


# --- helpers -----------------------------------------------------------------------------------


__all__ = [
    "TopK",
    "fp32_error_bound",
    "iter_store_shards",
    "merge_topk",
    "topk",
    "topk_reference",
]
