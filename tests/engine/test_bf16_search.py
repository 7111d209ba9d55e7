"""The exact bfloat16 search (csrc/bf16_search.cpp, engine/search_bf16.py): the same ids and
values as the float32 engine on random rows and on adversarial near-ties, the forced fallback,
the torch reference against the C++ path, and a bfloat16 store through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from forkserver import tiny_assets
from helpers import run

from ctrak_fast.engine import native
from ctrak_fast.engine.search import topk
from ctrak_fast.engine.search_bf16 import (
    fma_chain_scores,
    score_error_bound,
    split_query,
    topk_bf16_reference,
)
from ctrak_fast.engine.store import FeatureStore

C = native.load()
BF16_PATH = "avx512bf16" if C.has_avx512bf16() else "float32"


def bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy()


def engines(feats, u, k, tails="both", ids=None, shards=1, path="auto"):
    """(float32 engine result, bfloat16 state result, the bfloat16 state) over the same rows."""
    q = u.float().contiguous().numpy()
    ref, fast = C.TopKState(q, k, tails, 2), C.Bf16TopKState(q, k, tails, 2, path=path)
    n = feats.shape[0]
    ids = np.arange(n, dtype=np.int64) * 7 + 3 if ids is None else ids
    for part in np.array_split(np.arange(n), shards):
        lo, hi = int(part[0]), int(part[-1]) + 1
        arr = bits(feats[lo:hi]) if feats.dtype == torch.bfloat16 else feats[lo:hi].numpy()
        ref.add(arr, ids[lo:hi])
        fast.add(arr, ids[lo:hi])
    return ref.result(), fast.result(), fast


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)  # NaN == NaN here; ids and values exactly


@pytest.mark.parametrize(
    "n,dim,m,k,tails,shards",
    [
        (4000, 64, 3, 10, "both", 1),
        (5000, 512, 20, 100, "both", 3),
        (3001, 33, 70, 7, "top", 2),  # odd dim, m past one query block
        (997, 17, 5, 1, "bottom", 1),
        (200, 8, 2, 200, "both", 4),  # k = n
    ],
    ids=["small", "dim512-3shards", "odd-dim-m70", "k1-bottom", "k-eq-n"],
)
def test_random_rows_match_the_float32_engine(n, dim, m, k, tails, shards):
    g = torch.Generator().manual_seed(n + dim)
    feats = torch.randn(n, dim, generator=g).bfloat16()
    u = torch.randn(m, dim, generator=g)
    ref, fast, state = engines(feats, u, k, tails, shards=shards)
    assert state.path == BF16_PATH
    assert_same(ref, fast)
    if state.path == "avx512bf16" and k < n // 10:  # the filter re-scores a minority of rows
        assert state.rescored < m * n / 2


def near_tie_rows(n_tie: int, dim: int, g: torch.Generator):
    """Rows one bfloat16 ulp apart in a single coordinate where |u| is tiny: their float32
    scores differ by an ulp or so, and the k-th falls inside the cluster."""
    u = torch.randn(1, dim, generator=g)
    u[0, : dim // 2] *= 2.0**-12
    # The large half of u meets a row aligned with it: the cluster's scores far above the rest.
    base = (u[0].sign() * (torch.rand(dim, generator=g) + 0.5)).bfloat16()
    rows = base.repeat(n_tie, 1)
    coord = torch.randint(0, dim // 2, (n_tie,), generator=g)
    raw = rows.view(torch.int16)
    raw[torch.arange(n_tie), coord] += torch.randint(-2, 3, (n_tie,), generator=g).to(torch.int16)
    return rows, u


def test_near_ties_one_ulp_apart_match_the_float32_engine():
    g = torch.Generator().manual_seed(1)
    tie, u = near_tie_rows(600, 128, g)
    background = (0.1 * torch.randn(3000, 128, generator=g)).bfloat16()
    feats = torch.cat([background, tie, -tie])[torch.randperm(4200, generator=g)]
    ref, fast, state = engines(feats, u, k=50, shards=3)
    assert_same(ref, fast)
    top = torch.from_numpy(ref[0][0])
    gaps = (top[:-1] - top[1:]).abs()
    ulp = torch.finfo(torch.float32).eps * top[0].abs()
    assert bool((gaps <= 2 * ulp).all()) and gaps.min() == 0  # the k best are ulps apart, ties too


def test_duplicated_rows_tie_by_id():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(40, 32, generator=g).bfloat16()
    feats = rows.repeat(25, 1)  # every score 25 times
    ids = np.random.default_rng(0).permutation(1000).astype(np.int64)
    ref, fast, _ = engines(feats, torch.randn(4, 32, generator=g), 60, ids=ids, shards=2)
    assert_same(ref, fast)


def test_large_norm_rows_with_tiny_scores():
    g = torch.Generator().manual_seed(3)
    dim = 64
    u = torch.randn(2, dim, generator=g)
    basis = torch.linalg.qr(torch.cat([u.T, torch.randn(dim, dim - 2, generator=g)], 1)).Q
    ortho = basis[:, 2:]  # orthogonal to both queries
    big = 1e4 * torch.randn(300, dim - 2, generator=g) @ ortho.T  # norm ~1e5, score ~ rounding
    small = 1e-2 * torch.randn(3000, dim, generator=g)
    feats = torch.cat([big, small]).bfloat16()
    ref, fast, state = engines(feats, u, 40, shards=2)
    assert_same(ref, fast)


def test_non_finite_and_huge_rows_are_re_scored_exactly():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1000, 24, generator=g)
    feats[5, 3], feats[17, 0], feats[400] = float("inf"), float("nan"), 3e37
    feats[401, :2] = torch.tensor([float("inf"), float("-inf")])
    ref, fast, _ = engines(feats.bfloat16(), torch.randn(3, 24, generator=g), 20)
    assert_same(ref, fast)


def test_rows_in_the_subnormal_range_match_the_float32_engine():
    # vdpbf16ps reads subnormals as zero and flushes subnormal sums; the float32 chain does not.
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(2000, 32, generator=g) * 1e-38
    feats[:1000] *= torch.logspace(0, 3, 32)  # some rows normal, most of their terms subnormal
    ref, fast, _ = engines(feats.bfloat16(), torch.randn(3, 32, generator=g), 25)
    assert_same(ref, fast)


def test_float32_and_float16_shards_join_a_bfloat16_search():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(3, 40, generator=g)
    parts = [torch.randn(700, 40, generator=g).bfloat16(), torch.randn(500, 40, generator=g)]
    parts.append(torch.randn(600, 40, generator=g).half())
    q = u.numpy()
    ref, fast = C.TopKState(q, 30, "both", 2), C.Bf16TopKState(q, 30, "both", 2)
    for i, p in enumerate(parts):
        arr = bits(p) if p.dtype == torch.bfloat16 else p.numpy()
        ref.add(arr, None, 10_000 * i)
        fast.add(arr, None, 10_000 * i)
    assert_same(ref.result(), fast.result())


def test_forced_fallback_gives_identical_results(monkeypatch):
    g = torch.Generator().manual_seed(6)
    feats, u = torch.randn(3000, 96, generator=g).bfloat16(), torch.randn(5, 96, generator=g)
    ref, fast, state = engines(feats, u, 25)
    _, forced, by_arg = engines(feats, u, 25, path="float32")
    monkeypatch.setenv("CTRAK_BF16_SEARCH", "0")
    _, by_env, env_state = engines(feats, u, 25)
    assert (state.path, by_arg.path, env_state.path) == (BF16_PATH, "float32", "float32")
    assert by_arg.rescored == 0
    for other in (fast, forced, by_env):
        assert_same(ref, other)


def test_path_bf16_is_refused_without_the_cpu_and_bad_paths_are_named():
    q = np.ones((1, 8), np.float32)
    if not C.has_avx512bf16():
        with pytest.raises(ValueError, match="AVX512-BF16"):
            C.Bf16TopKState(q, 1, path="bf16")
    with pytest.raises(ValueError, match="path must be"):
        C.Bf16TopKState(q, 1, path="fp8")


def test_queries_outside_the_bound_run_the_float32_engine():
    q = np.ones((2, 8), np.float32)
    q[1, 0] = np.inf
    assert C.Bf16TopKState(q, 1).path == "float32"
    assert C.Bf16TopKState(np.full((1, 8), 1e36, np.float32), 1).path == "float32"


def test_fma_chain_scores_are_the_engines_bits():
    g = torch.Generator().manual_seed(7)
    rows = (torch.randn(300, 37, generator=g) * torch.logspace(-6, 6, 37)).bfloat16()
    u = torch.randn(4, 37, generator=g) * torch.logspace(3, -3, 37)
    engine = torch.from_numpy(C.score_cpu(bits(rows), u.numpy()))  # [4, 300]
    for q in range(4):
        mine = fma_chain_scores(rows, u[q].expand(300, 37))
        assert torch.equal(mine.view(torch.int32), engine[q].view(torch.int32))


def test_the_bound_covers_the_float32_engine_and_the_query_split():
    g = torch.Generator().manual_seed(8)
    feats = (torch.randn(2000, 64, generator=g) * torch.rand(2000, 1, generator=g) * 50).bfloat16()
    u = torch.randn(3, 64, generator=g)
    hi, lo = split_query(u)
    assert torch.equal(hi.double() + lo, u.double())
    exact = feats.double() @ u.double().T
    engine = torch.from_numpy(C.score_cpu(bits(feats), u.numpy())).double().T
    approx = feats.double() @ hi.double().T
    bound = score_error_bound(feats, u)
    err = (approx - engine).abs()
    assert bool((err <= bound).all())
    assert bool(((engine - exact).abs() + (exact - approx).abs() <= bound).all())
    assert float((err / bound).max()) > 1e-3  # a bound, not a multiple of it


@pytest.mark.parametrize("tails", ["both", "top"])
def test_torch_reference_agrees_with_the_cpp_path(tails):
    g = torch.Generator().manual_seed(9)
    tie, u = near_tie_rows(200, 20, g)
    feats = torch.cat([torch.randn(600, 20, generator=g).bfloat16(), tie])
    ids = torch.randperm(800, generator=g)
    ref, cand = topk_bf16_reference(feats, ids, u, 30, tails)
    cpp = C.Bf16TopKState(u.numpy(), 30, tails, 2)
    cpp.add(bits(feats), ids.numpy().astype(np.int64))
    tv, ti, bv, bi = cpp.result()
    assert torch.equal(ref.top_ids, torch.from_numpy(ti))
    assert torch.equal(ref.top_values, torch.from_numpy(tv))
    if tails == "both":
        assert torch.equal(ref.bottom_ids, torch.from_numpy(bi))
        assert torch.equal(ref.bottom_values, torch.from_numpy(bv))
    assert 30 <= int(cand.max()) < 800 * (2 if tails == "both" else 1)


def test_topk_takes_the_bfloat16_path_for_bfloat16_stores(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(10)
    store = FeatureStore.create(tmp_path / "s", k=48, dtype="bfloat16", shard_rows=700)
    with store.writer(expected_rows=2000) as w:
        w.append(torch.randn(2000, 48, generator=g), torch.arange(2000) + 5)
    store = FeatureStore.open(tmp_path / "s")
    made = []
    real = C.Bf16TopKState

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(C, "Bf16TopKState", spy)
    u = torch.randn(4, 48, generator=g)
    fast = topk(store, u, 15, backend="cpu")
    slow = topk(store, u, 15, backend="cpu", bf16_search=False)
    assert len(made) == 1 and made[0].path == BF16_PATH
    for name in ("top_values", "top_ids", "bottom_values", "bottom_ids"):
        assert torch.equal(getattr(fast, name), getattr(slow, name))


def test_cli_bfloat16_store_round_trips(tmp_path, monkeypatch):
    model, data = tiny_assets(tmp_path / "assets")
    store, query = tmp_path / "store", tmp_path / "q.safetensors"
    argv = ["featurize", "--model", model, "--data", data, "--method", "d-trak", "--k", "16"]
    rc, _, err = run([*argv, "--timesteps", "99", "--store-dtype", "bfloat16", "--out", store])
    assert rc == 0, err
    assert FeatureStore.open(store).torch_dtype == torch.bfloat16
    rc, _, err = run(["query", "--model", model, "--concept", "shape=circle", "--method",
                      "d-trak", "--k", "16", "--timesteps", "99", "--out", query])  # fmt: skip
    assert rc == 0, err
    results = []
    for env in ("1", "0"):
        monkeypatch.setenv("CTRAK_BF16_SEARCH", env)
        out = tmp_path / f"r{env}.json"
        rc, _, err = run(["attribute", "--store", store, "--query", query, "--k", "5",
                          "--out", out])  # fmt: skip
        assert rc == 0, err
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and len(results[0]["top"]) > 0
