"""Exact top-k inner-product search over feature shards, both tails.

For preconditioned queries ``u [m, k]`` and training features ``phi [N, k]`` the attribution
score of row i for query q is ``phi_i . u_q``; :func:`topk` returns, per query, the k largest
(most supporting) and k smallest (most opposing) scores with their ids, streaming a
:class:`~ctrak_fast.store.FeatureStore` shard by shard so memory stays at one shard plus the
result whatever N is.

Engines (``backend=``):
    ``"cpu"``        ``ctrak_fast._C.TopKState``: C++ blocked GEMM with the selection fused,
                     AVX-512 / AVX2 / portable variants picked at run time, its own thread
                     pool (workers sleep between calls; see csrc/thread_pool.h).
    ``"cuda"``       ``ctrak_fast._C.CudaTopKState``: fused score + threshold kernel with
                     block-level candidate lists and a per-query radix select, any k.
    ``"reference"``  :func:`topk_reference` in plain torch (float64 scores): the specification.
    ``"auto"``       CUDA queries or features -> ``"cuda"``, otherwise ``"cpu"``; without the
                     compiled extension it warns and uses ``"reference"``.

Reading a FeatureStore (:func:`iter_store_shards`): each shard file is memory-mapped (no copy
out of the page cache) and, with ``readahead``, a background thread maps and populates shard
i + 1 while the engine scores shard i, so the disk reads overlap the compute. Memory is the
mapped shards (at most three at a time, file-backed and reclaimable) plus the result, whatever N.

What "verified" means at scale (``verify=``). Hashing every byte costs as much as scoring it
(sha256 runs at ~1-2 GB/s per core; the CPU engine scores a k = 256 float16 shard at several
GB/s), so the default checks what the answer is made of and leaves the bulk to the file system:
    ``"ids"``   (default) FeatureStore.open has checked every shard's size and safetensors header
                against the manifest; each shard's ids tensor is hashed (sha256, 8 bytes per row:
                1/64 of a k = 256 float16 shard) and compared with the manifest before it is
                scored, so every id the search returns is one the writer wrote. Corrupted
                feature bytes are found by ``ctrak store verify`` / ``FeatureStore.verify``.
    ``"full"``  every shard file's sha256 is compared with the manifest before it is scored (in
                the read-ahead thread, off the compute path but not free).
    ``"none"``  size and header only.

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
    >>> from ctrak_fast.search import topk
    >>> feats = torch.randn(1000, 64).half()
    >>> ids = torch.arange(1000) + 10**6
    >>> u = torch.randn(3, 64)
    >>> res = topk((feats, ids), u, k=5)
    >>> res.top_ids.shape, res.bottom_values.shape
    (torch.Size([3, 5]), torch.Size([3, 5]))
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from . import _native
from .store import FeatureStore, StoreError, _shard_file

Tails = Literal["top", "bottom", "both"]
Backend = Literal["auto", "cpu", "cuda", "reference"]
Verify = Literal["ids", "full", "none"]

_TAILS = ("top", "bottom", "both")
_BACKENDS = ("auto", "cpu", "cuda", "reference")
_VERIFY = ("ids", "full", "none")
_NATIVE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


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
    _check_tails(tails)
    n, dim = _check_features(features, ids, "features")
    m = _check_queries(u, dim)
    _check_k(k, n)
    scores = (features.double() @ u.double().to(features.device).T).T  # [m, n]
    all_ids = ids.to(torch.int64).to(features.device).expand(m, n)
    out = {}
    for tail in ("top", "bottom"):
        if tails in (tail, "both"):
            v, i = _select(scores, all_ids, k, largest=tail == "top")
            out[tail] = (v.float(), i)
    return _make_topk(out, tails)


def topk(
    source,
    u: Tensor,
    k: int,
    tails: Tails = "both",
    backend: Backend = "auto",
    progress: bool = False,
    num_threads: int = 0,
    verify: Verify = "ids",
    readahead: bool = True,
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
        verify: FeatureStore sources only: "ids", "full" or "none" (module docstring).
        readahead: FeatureStore sources only: map and read shard i + 1 in a background thread
            while shard i is scored.
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
    _check_tails(tails)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if verify not in _VERIFY:
        raise ValueError(f"verify must be one of {_VERIFY}, got {verify!r}")
    shards, n_rows, dim, n_shards, device = _open_source(source, verify, readahead)
    m = _check_queries(u, dim)
    dim = int(u.shape[1])
    _check_k(k, n_rows)

    if backend == "auto":
        backend = "cuda" if u.is_cuda or (device is not None and device.type == "cuda") else "cpu"
        want_cuda = backend == "cuda"
        if not _native.available() or (want_cuda and not _native.has_cuda()):
            what = "with the CUDA engine " if want_cuda else ""
            warnings.warn(
                f"ctrak_fast._C {what}is not available; top-k falls back to the slow torch "
                f"reference. {_native.BUILD_HINT}",
                RuntimeWarning,
                stacklevel=2,
            )
            backend = "reference"

    if progress and (n_shards is None or n_shards > 1):
        from tqdm.auto import tqdm

        shards = tqdm(shards, total=n_shards, desc="top-k", unit="shard")
    shards = _validated(shards, dim)
    if backend == "reference":
        return _run_reference(shards, u, k, tails, m)
    if backend == "cpu":
        return _run_cpu(shards, u, k, tails, num_threads)
    return _run_cuda(shards, u, k, tails, device)


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
    _check_k(k, seen)
    return _make_topk({t: (v.float(), i) for t, (v, i) in best.items()}, tails)


def _run_cpu(shards, u: Tensor, k: int, tails, num_threads: int) -> TopK:
    C = _native.load()
    q = u.detach().to("cpu", torch.float32).contiguous().numpy()
    state = C.TopKState(q, k, tails, num_threads)
    for feats, ids in shards:
        feats = feats.detach().cpu()
        if feats.dtype not in _NATIVE_DTYPES:
            feats = feats.float()
        feats = feats.contiguous()
        # numpy has no bfloat16: hand over the raw bits, the engine decodes them.
        arr = feats.view(torch.int16).numpy() if feats.dtype == torch.bfloat16 else feats.numpy()
        state.add(arr, ids.detach().to("cpu", torch.int64).contiguous().numpy())
        del feats, ids, arr  # release a memory-mapped shard before the next one is mapped
    _check_k(k, state.rows_seen)
    return _make_topk(_as_tensors(state.result()), tails)


def _run_cuda(shards, u: Tensor, k: int, tails, device: torch.device | None) -> TopK:
    C = _native.load()
    if not C.has_cuda():
        raise RuntimeError(
            "backend 'cuda' needs ctrak_fast._C built with CUDA: install a CUDA build of torch and "
            "rebuild with `pip install --no-build-isolation -e .` (CTRAK_NO_CUDA unset)"
        )
    if u.is_cuda:
        device = u.device
    elif device is None or device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        q = u.detach().to(device, torch.float32).contiguous()
        state = C.CudaTopKState(
            q.data_ptr(), q.shape[0], q.shape[1], k, tails, device.index, stream.cuda_stream
        )
        for feats, ids in shards:
            if not feats.is_cuda:
                # Host shards (memory-mapped store shards): the engine streams them through its
                # pinned double buffers, copying chunk c + 1 while chunk c is scored.
                f = feats.detach()
                if f.dtype not in _NATIVE_DTYPES:
                    f = f.float()
                f = f.contiguous()
                arr = f.view(torch.int16).numpy() if f.dtype == torch.bfloat16 else f.numpy()
                state.add_host(
                    arr, ids.detach().to(torch.int64).contiguous().numpy(), 0, stream.cuda_stream
                )
                continue
            # Temporaries are allocated on `stream`, so the caching allocator reuses them only
            # after the kernels queued here: no explicit synchronisation per shard.
            f = feats.detach().to(device, non_blocking=True)
            if f.dtype not in _NATIVE_DTYPES:
                f = f.float()
            f = f.contiguous()
            i = ids.detach().to(device, torch.int64, non_blocking=True).contiguous()
            state.add(
                f.data_ptr(),
                f.shape[0],
                _NATIVE_DTYPES[f.dtype],
                i.data_ptr(),
                0,
                stream.cuda_stream,
            )
        _check_k(k, state.rows_seen)
        return _make_topk(_as_tensors(state.result(stream.cuda_stream)), tails)


# --- FeatureStore shards ------------------------------------------------------------------------

_NP_DTYPES = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}
_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _as_tensor(a: np.ndarray) -> Tensor:
    # Views of a read-only mapping: torch warns that it cannot write to them; nothing does.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _map_shard(store: FeatureStore, rec: dict, verify: str, populate: bool):
    """Memory-map one shard and check it: -> (features [rows, k] Tensor, ids [rows] Tensor).

    The tensors are read-only views of the mapping, which stays alive as long as they do.
    """
    file = _shard_file(store.path, rec["file"])
    C = _native.load()
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
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"{file}: unreadable safetensors header: {e}") from e
    rows, k, dtype = rec["rows"], store.k, store.dtype
    want = {"features": (_ST_DTYPES[dtype], [rows, k]), "ids": ("I64", [rows])}
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
    if verify == "ids" and hashlib.sha256(views["ids"]).hexdigest() != rec["ids_sha256"]:
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
    store: FeatureStore,
    shards: Sequence[int] | None = None,
    verify: Verify = "ids",
    readahead: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (features [rows_i, k], ids [rows_i] int64) of a store's shards, memory-mapped.

    Args:
        store: an open FeatureStore.
        shards: indices of the shards to read, in that order (default: all).
        verify: "ids", "full" or "none" (see the module docstring).
        readahead: a background thread maps, reads and checks shard i + 1 (MAP_POPULATE) while
            the caller works on shard i; without it pages are faulted in as the engine reads
            them (kernel read-ahead of the sequential mapping only).
    Yields:
        Read-only tensors backed by the page cache (features in the store dtype); a shard's
        mapping is released when the caller drops its tensors.

    Examples:
        >>> # for feats, ids in iter_store_shards(store, shards=[0, 2]): ...
    """
    if verify not in _VERIFY:
        raise ValueError(f"verify must be one of {_VERIFY}, got {verify!r}")
    records = store.manifest["shards"]
    order = range(len(records)) if shards is None else list(shards)
    if not readahead:
        for i in order:
            yield _map_shard(store, records[i], verify, populate=False)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrak-readahead")
    try:
        pending = None
        for i in order:
            pending = pending or pool.submit(_map_shard, store, records[i], verify, True)
            shard = pending.result()
            pending = None
            nxt = _next(order, i)
            if nxt is not None:
                pending = pool.submit(_map_shard, store, records[nxt], verify, True)
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
    _check_k(k, None)
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
    return _make_topk(out, tails)


# --- helpers -----------------------------------------------------------------------------------


def _as_tensors(result) -> dict[str, tuple[Tensor, Tensor]]:
    tv, ti, bv, bi = result
    out = {}
    if tv is not None:
        out["top"] = (torch.from_numpy(tv), torch.from_numpy(ti))
    if bv is not None:
        out["bottom"] = (torch.from_numpy(bv), torch.from_numpy(bi))
    return out


def _make_topk(out: dict[str, tuple[Tensor, Tensor]], tails: str) -> TopK:
    top = out.get("top", (None, None))
    bottom = out.get("bottom", (None, None))
    return TopK(top[0], top[1], bottom[0], bottom[1], tails)


def _check_tails(tails) -> None:
    if tails not in _TAILS:
        raise ValueError(f"tails must be one of {_TAILS}, got {tails!r}")


def _check_k(k, n: int | None) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n is not None and k > n:
        raise ValueError(f"k={k} is larger than the number of feature rows ({n})")


def _check_queries(u, dim: int | None) -> int:
    if not isinstance(u, Tensor) or not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {type(u).__name__}")
    if u.dim() != 2:
        raise ValueError(f"u must be [m, dim], got shape {list(u.shape)}")
    if u.shape[0] == 0:
        raise ValueError("empty query batch: u has 0 rows")
    if dim is not None and u.shape[1] != dim:
        raise ValueError(f"feature dimension {dim} does not match the queries' {u.shape[1]}")
    return int(u.shape[0])


def _check_features(features, ids, name: str) -> tuple[int, int]:
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


def _open_source(source, verify: str = "ids", readahead: bool = True):
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
        n, dim = _check_features(features, ids, "features")
        return [(features, ids)], n, dim, 1, features.device
    raise TypeError(
        "source must be a FeatureStore (with iter_shards()), a (features, ids) tuple or a "
        f"features tensor, got {type(source).__name__}"
    )


def _validated(shards, dim: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for i, (feats, ids) in enumerate(shards):
        n, d = _check_features(feats, ids, f"shard {i} features")
        if dim is not None and d != dim:
            raise ValueError(f"shard {i} has feature dimension {d}, expected {dim}")
        yield feats, ids


__all__ = [
    "TopK",
    "fp32_error_bound",
    "iter_store_shards",
    "merge_topk",
    "topk",
    "topk_reference",
]
