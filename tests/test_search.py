"""Top-k search: the native engines against the float64 reference (ctrak_fast.search).

Policy (see the search module docstring): returned values equal the exact scores of the
returned ids within fp32_error_bound; the j-th returned exact score is within twice the bound of
the reference's j-th; ids equal the reference's except among scores tied within twice the bound,
and exactly where scores are exactly representable (integer data) or rows are duplicated.
"""

from __future__ import annotations

import pytest
import torch

from ctrak_fast import _native
from ctrak_fast.search import TopK, fp32_error_bound, topk, topk_reference

C = _native.load()
ISAS = C.cpu_isas()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class FakeStore:
    """The FeatureStore contract topk relies on: iter_shards(), n_rows, k, shards."""

    def __init__(self, features: torch.Tensor, ids: torch.Tensor, sizes: list[int]):
        assert sum(sizes) == features.shape[0]
        self._parts = list(zip(features.split(sizes), ids.split(sizes), strict=True))
        self.n_rows, self.k = features.shape
        self.shards = [{"rows": s} for s in sizes]

    def iter_shards(self):
        yield from self._parts


def make_data(n, dim, m, dtype, kind="random", seed=0):
    """-> features [n, dim] dtype, ids int64 [n] (distinct, shuffled, sparse), u [m, dim]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        feats = torch.randn(n, dim, generator=g)
        u = torch.randn(m, dim, generator=g)
    elif kind == "duplicates":  # many identical rows: exact ties whatever the arithmetic
        base = torch.randn(23, dim, generator=g)
        feats = base[torch.randint(0, 23, (n,), generator=g)]
        u = torch.randn(m, dim, generator=g)
    elif kind == "integers":  # small integers: every score exact in fp32, ties across rows
        feats = torch.randint(-2, 3, (n, dim), generator=g).float()
        u = torch.randint(-2, 3, (m, dim), generator=g).float()
    else:
        raise ValueError(kind)
    ids = torch.randperm(3 * n, generator=g)[:n].to(torch.int64) + 10**6
    return feats.to(dtype), ids, u


def check(res: TopK, feats, ids, u, k, tails="both", exact_ids=False):
    """Assert the tolerance policy of the module docstring for every requested tail."""
    ref = topk_reference(feats, ids, u, k, tails)
    exact = (feats.double() @ u.double().T).T  # [m, n]
    bound = fp32_error_bound(feats, u)[:, None] + 1e-12  # [m, 1]
    order = torch.argsort(ids)
    for tail in ("top", "bottom"):
        values = getattr(res, f"{tail}_values")
        got = getattr(res, f"{tail}_ids")
        if tails not in (tail, "both"):
            assert values is None and got is None
            continue
        want = getattr(ref, f"{tail}_ids")
        assert values.shape == got.shape == (u.shape[0], k)
        assert values.dtype == torch.float32 and got.dtype == torch.int64
        assert not torch.isnan(values).any()
        # every id is a real row, once per query
        pos = order[torch.searchsorted(ids[order], got)]
        assert torch.equal(ids[pos], got)
        assert (got.sort(dim=1).values.diff(dim=1) != 0).all(), "duplicate ids"
        ex = exact.gather(1, pos)  # exact scores of the returned ids
        assert ((values.double() - ex).abs() <= bound).all(), "value off its exact score"
        ex_ref = exact.gather(1, order[torch.searchsorted(ids[order], want)])
        assert ((ex - ex_ref).abs() <= 2 * bound).all(), "rank-wise score differs"
        # ordered best first; equal values by ascending id
        step = values.diff(dim=1) if tail == "bottom" else -values.diff(dim=1)
        assert (step >= 0).all()
        assert ((step > 0) | (got.diff(dim=1) > 0)).all(), "tie not broken by smaller id"
        if exact_ids:
            assert torch.equal(got, want)


def native_topk(feats, ids, u, k, tails="both", isa="auto", num_threads=0) -> TopK:
    """CPU engine through the binding directly, to pin the ISA variant."""
    q = u.float().contiguous().numpy()
    f = feats.contiguous()
    arr = f.view(torch.int16).numpy() if f.dtype == torch.bfloat16 else f.numpy()
    tv, ti, bv, bi = C.topk_cpu(arr, q, k, tails, ids=ids.numpy(), num_threads=num_threads, isa=isa)
    out = [None if a is None else torch.from_numpy(a) for a in (tv, ti, bv, bi)]
    return TopK(*out, tails)


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 2048, 3001])
def test_cpu_matches_reference(isa, dtype, k):
    # n, dim and m are multiples of no block size (rows 48, lanes 4/8/16, query blocks 8..64);
    # fewer queries at large k keep the float64 oracle quick.
    feats, ids, u = make_data(3001, 37, 70 if k <= 7 else 21, dtype)
    check(native_topk(feats, ids, u, k, isa=isa), feats, ids, u, k, exact_ids=k <= 7)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["duplicates", "integers"])
def test_ties_prefer_smaller_id(isa, kind):
    feats, ids, u = make_data(2000, 24, 9, torch.float16, kind)
    for k in (1, 50, 777):
        check(native_topk(feats, ids, u, k, isa=isa), feats, ids, u, k, exact_ids=True)


@pytest.mark.parametrize("m", [1, 16, 17, 64, 130])
def test_query_counts(m):
    feats, ids, u = make_data(1500, 64, m, torch.float16)
    check(topk((feats, ids), u, 10), feats, ids, u, 10, exact_ids=True)


def test_k_ten_thousand():
    feats, ids, u = make_data(12007, 40, 3, torch.float16, "integers")
    res = topk((feats, ids), u, 10_000)
    check(res, feats, ids, u, 10_000, exact_ids=True)


@pytest.mark.parametrize("tails", ["top", "bottom"])
def test_single_tail(tails):
    feats, ids, u = make_data(999, 33, 5, torch.bfloat16)
    res = topk((feats, ids), u, 12, tails=tails)
    assert res.tails == tails
    check(res, feats, ids, u, 12, tails=tails, exact_ids=True)


def test_large_dim_uses_k_blocks():
    # dim above every ISA's k block (128..512 floats): partial sums round-trip through memory.
    feats, ids, u = make_data(700, 1100, 67, torch.float16)
    check(topk((feats, ids), u, 9), feats, ids, u, 9, exact_ids=True)


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 1000, 7, 2992, 1], [4001], [1] * 5 + [3996]], ids=str)
def test_store_streaming_matches_one_shot(sizes):
    feats, ids, u = make_data(4001, 48, 11, torch.float16)
    store = FakeStore(feats, ids, sizes)
    res = topk(store, u, 100, progress=True)
    check(res, feats, ids, u, 100, exact_ids=True)
    one = topk((feats, ids), u, 100)
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(res, name), getattr(one, name)), name


def test_running_state_base_ids_and_threads():
    feats, ids, u = make_data(2500, 32, 6, torch.float32)
    q = u.numpy()
    results = []
    for threads in (1, 2):
        state = C.TopKState(q, 40, "both", num_threads=threads)
        for lo, hi in ((0, 1), (1, 1200), (1200, 2500)):
            state.add(feats[lo:hi].numpy(), base_id=lo)  # ids = row index
        assert state.rows_seen == 2500
        results.append(state.result())
    for a, b in zip(*results, strict=True):
        assert (a == b).all()
    res = TopK(*(torch.from_numpy(a) for a in results[0]), "both")
    check(res, feats, torch.arange(2500), u, 40, exact_ids=True)


def test_single_row():
    feats, ids, u = make_data(1, 8, 3, torch.float16)
    res = topk(FakeStore(feats, ids, [1]), u, 1)
    check(res, feats, ids, u, 1, exact_ids=True)


def test_nan_scores_never_selected():
    feats, ids, u = make_data(300, 16, 2, torch.float32)
    feats[5] = float("nan")
    res = topk((feats, ids), u, 10)
    assert ids[5] not in res.top_ids and ids[5] not in res.bottom_ids


def test_reference_backend_streams_like_reference():
    feats, ids, u = make_data(900, 20, 4, torch.bfloat16)
    res = topk(FakeStore(feats, ids, [100, 1, 799]), u, 30, backend="reference")
    ref = topk_reference(feats, ids, u, 30)
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(res, name), getattr(ref, name)), name


def test_features_tensor_source_uses_row_ids():
    feats, _, u = make_data(200, 16, 2, torch.float32)
    res = topk(feats, u, 5, tails="top")
    ref = topk_reference(feats, torch.arange(200), u, 5, "top")
    assert torch.equal(res.top_ids, ref.top_ids)


# --- errors ------------------------------------------------------------------------------------


def test_argument_errors():
    feats, ids, u = make_data(50, 8, 2, torch.float16)
    src = (feats, ids)
    with pytest.raises(ValueError, match="empty query batch"):
        topk(src, u[:0], 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk(src, u, 0)
    with pytest.raises(ValueError, match="larger than the number of feature rows"):
        topk(src, u, 51)
    with pytest.raises(ValueError, match="larger than the number of feature rows"):
        topk(FakeStore(feats, ids, [20, 30]), u, 51)
    with pytest.raises(ValueError, match="does not match"):
        topk(src, torch.randn(2, 9), 3)
    with pytest.raises(ValueError, match="tails"):
        topk(src, u, 3, tails="middle")
    with pytest.raises(ValueError, match="backend"):
        topk(src, u, 3, backend="gpu")
    with pytest.raises(ValueError, match=r"u must be \[m, dim\]"):
        topk(src, u[0], 3)
    with pytest.raises(ValueError, match="ids must be"):
        topk((feats, ids[:-1]), u, 3)
    with pytest.raises(TypeError, match="int64"):
        topk((feats, ids.int()), u, 3)
    with pytest.raises(TypeError, match="source"):
        topk("features.safetensors", u, 3)
    with pytest.raises(ValueError, match="empty query batch"):
        topk_reference(feats, ids, u[:0], 3)


def test_binding_argument_checks():
    q = torch.randn(2, 8).numpy()
    state = C.TopKState(q, 3)
    with pytest.raises(TypeError, match="float32, float16 or uint16"):
        state.add(torch.zeros(4, 8, dtype=torch.int32).numpy())
    with pytest.raises(ValueError, match=r"features must be \[n, 8\]"):
        state.add(torch.zeros(4, 9).numpy())
    with pytest.raises(ValueError, match="C-contiguous"):
        state.add(torch.zeros(8, 4).numpy().T)
    with pytest.raises(ValueError, match=r"ids must be \[4\]"):
        state.add(torch.zeros(4, 8).numpy(), ids=torch.arange(3).numpy())
    with pytest.raises(TypeError, match="ids must be int64"):
        state.add(torch.zeros(4, 8).numpy(), ids=torch.arange(4).int().numpy())
    with pytest.raises(ValueError, match="tails"):
        C.TopKState(q, 3, "sideways")
    with pytest.raises(ValueError, match="k_top"):
        C.TopKState(q, 0)
    with pytest.raises(ValueError, match=r"queries must be \[m >= 1"):
        C.TopKState(q[:0], 3)
    with pytest.raises(ValueError, match="not available"):
        C.TopKState(q, 3, isa="avx1024")
    state.add(torch.zeros(2, 8).numpy())
    with pytest.raises(ValueError, match="exceeds the 2 rows"):
        state.result()


# --- CUDA engine (runs where a GPU is present) -------------------------------------------------


def cuda_engine_or_fail():
    if not _native.has_cuda():
        pytest.fail("a CUDA device is present but ctrak_fast._C was built without CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 7, 2048, 3001])
def test_cuda_matches_reference(dtype, k):
    cuda_engine_or_fail()
    feats, ids, u = make_data(3001, 37, 70, dtype)
    res = topk((feats.cuda(), ids.cuda()), u.cuda(), k)
    check(res, feats, ids, u, k, exact_ids=k <= 7)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["duplicates", "integers"])
def test_cuda_ties_prefer_smaller_id(kind):
    cuda_engine_or_fail()
    feats, ids, u = make_data(20000, 24, 9, torch.float16, kind)
    for k in (1, 50, 3000):
        res = topk((feats.cuda(), ids.cuda()), u.cuda(), k)
        check(res, feats, ids, u, k, exact_ids=True)


@pytest.mark.cuda
def test_cuda_k_ten_thousand_streamed():
    cuda_engine_or_fail()
    feats, ids, u = make_data(300_007, 40, 3, torch.float16, "integers")
    store = FakeStore(feats, ids, [1, 150_000, 7, 149_999])
    res = topk(store, u.cuda(), 10_000)  # CPU shards, CUDA queries: shards are copied over
    check(res, feats, ids, u, 10_000, exact_ids=True)
    cpu = topk(store, u, 10_000)
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(res, name), getattr(cpu, name)), name


@pytest.mark.cuda
@pytest.mark.parametrize("tails", ["top", "bottom"])
def test_cuda_single_tail_and_nan(tails):
    cuda_engine_or_fail()
    feats, ids, u = make_data(5000, 64, 130, torch.bfloat16)
    feats[17] = float("nan")
    res = topk((feats.cuda(), ids.cuda()), u.cuda(), 25, tails=tails)
    assert ids[17] not in getattr(res, f"{tails}_ids")
    keep = torch.ones(5000, dtype=torch.bool)
    keep[17] = False
    check(res, feats[keep], ids[keep], u, 25, tails=tails, exact_ids=True)
