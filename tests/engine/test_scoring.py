"""Scoring: streamed Gram, damping, preconditioned queries, against dense float64 algebra."""

from __future__ import annotations

import pytest
import torch
from helpers import write_store

from ctrak_fast.engine.gram import gram
from ctrak_fast.engine.scoring import Preconditioner, damping, score_dense
from ctrak_fast.engine.store import FeatureStore

K = 32


def _phi(n: int = 300, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Uneven column scales make G ill-conditioned enough for the damping to matter.
    return torch.randn(n, k, generator=g) * torch.logspace(0, 1.5, k)


def _store(tmp_path, phi: torch.Tensor, dtype="float32", shard_rows=64) -> FeatureStore:
    return write_store(tmp_path / "s", phi, torch.arange(phi.shape[0]), shard_rows, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gram_streams_over_shards(tmp_path, dtype):
    phi = _phi()
    store = _store(tmp_path, phi, dtype=dtype)  # 300 rows: 4 full shards and one of 44
    stored = phi.to(store.torch_dtype).double()
    want = stored.T @ stored
    for got in (
        gram(store),
        gram(store, chunk_rows=7),  # chunks that straddle nothing in particular
        gram(store.iter_shards()),
        gram(store.read_all()),  # one (features, ids) pair
        gram(stored.float() if dtype == "float32" else stored),
    ):
        assert got.dtype == torch.float64 and torch.equal(got, got.T)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_gram_of_an_empty_store_is_zero(tmp_path):
    store = FeatureStore.create(tmp_path / "s", k=5)
    assert torch.equal(gram(store), torch.zeros(5, 5, dtype=torch.float64))


def test_damping_formula():
    g = gram(_phi())
    assert damping(g) == pytest.approx(0.1 * torch.trace(g).item() / K, rel=1e-15)
    assert damping(g, 2.5) == pytest.approx(2.5 * damping(g), rel=1e-15)
    assert Preconditioner(g, 0.3).lam == pytest.approx(damping(g, 0.3), rel=1e-15)


@pytest.mark.parametrize("lambda_r", [0.01, 1.0, 10.0])
def test_solve_matches_dense_float64(lambda_r):
    phi = _phi()
    g = gram(phi)
    pre = Preconditioner(g, lambda_r)
    q = torch.randn(5, K, dtype=torch.float64)
    a = g + pre.lam * torch.eye(K, dtype=torch.float64)
    want = torch.linalg.solve(a, q.T).T
    # cond(G + lam I) <= 1 + trace(G)/lam = 1 + 10k/lambda_r (<= 3.3e4 here), so a backward-stable
    # float64 solve is accurate to ~cond * 1e-16 << 1e-8 relative. The float32 output adds its
    # own rounding (~6e-8 relative).
    u64 = pre.solve(q, dtype=torch.float64)
    assert ((u64 - want).norm() / want.norm()).item() < 1e-8
    u32 = pre.solve(q)
    assert u32.dtype == torch.float32 and u32.shape == (5, K)
    torch.testing.assert_close(u32, want.float(), rtol=1e-6, atol=1e-6 * want.abs().max().item())
    # A single query as [k] keeps its shape.
    torch.testing.assert_close(pre.solve(q[0], dtype=torch.float64), want[0], rtol=1e-10, atol=0)


def test_lambda_sweep_reuses_one_gram():
    g = gram(_phi())
    base = Preconditioner(g)
    q = torch.randn(3, K, dtype=torch.float64)
    for lambda_r in (0.1, 1.0, 10.0):
        pre = base.with_lambda(lambda_r)
        assert pre.gram.data_ptr() == base.gram.data_ptr()  # the same G: no pass, no copy
        assert pre.lam == pytest.approx(lambda_r * base.lam, rel=1e-14)
        direct = Preconditioner(g, lambda_r).solve(q, dtype=torch.float64)
        assert torch.equal(pre.solve(q, dtype=torch.float64), direct)


def test_scores_are_the_trak_formula(tmp_path):
    phi = _phi(120)
    store = _store(tmp_path, phi, shard_rows=50)
    pre = Preconditioner(gram(store), lambda_r=0.5)
    q = torch.randn(4, K)
    got = score_dense(store, pre.solve(q, dtype=torch.float64))
    p64 = phi.double()
    want = q.double() @ torch.linalg.inv(p64.T @ p64 + pre.lam * torch.eye(K).double()) @ p64.T
    assert got.shape == (120, 4)
    torch.testing.assert_close(got, want.T, rtol=1e-9, atol=1e-12)


def test_sign_convention_a_sample_supports_itself():
    # Positive score = supports the query: a query equal to a training feature scores that sample
    # positively (phi_j A^-1 phi_j > 0 for positive definite A), and usually highest.
    phi = _phi(200)
    pre = Preconditioner(gram(phi))
    scores = score_dense(phi, pre.solve(phi[:50]))  # [200, 50]
    self_scores = scores[torch.arange(50), torch.arange(50)]
    assert (self_scores > 0).all()
    assert (scores.argmax(0) == torch.arange(50)).float().mean() > 0.9


def test_singular_gram_is_refused_with_a_clear_message():
    g = gram(_phi(10))  # rank 10 < k = 32
    with pytest.raises(ValueError, match="not positive definite.*lambda_r=0"):
        Preconditioner(g, lambda_r=0.0)
    Preconditioner(g, lambda_r=1e-3)  # any damping fixes it
    with pytest.raises(ValueError, match="not positive definite"):
        Preconditioner(torch.zeros(4, 4), lambda_r=1.0)  # all-zero features: lam = 0
    with pytest.raises(ValueError, match="non-finite"):
        Preconditioner(torch.full((4, 4), float("nan")))


def test_shape_errors():
    pre = Preconditioner(gram(_phi()))
    with pytest.raises(ValueError, match=r"\[m, 32\]"):
        pre.solve(torch.randn(2, K + 1))
    with pytest.raises(ValueError, match=r"\[k, k\]"):
        Preconditioner(torch.randn(3, 4))


def test_engine_example_end_to_end(tmp_path):
    from ctrak_fast.bench.engine_example import run_engine_example

    res = run_engine_example(tmp_path, k=64, progress=False)
    assert res["n_train"] == 2000 and len(res["tests"]) == 8
    assert res["top5_same_class"] >= 0.8  # chance is 0.25
    assert (tmp_path / "result.json").exists()
    assert FeatureStore.open(tmp_path / "store").verify() == []
    # A rerun resumes the complete store and appends nothing.
    again = run_engine_example(tmp_path, k=64, progress=False)
    assert again["tests"] == res["tests"]
