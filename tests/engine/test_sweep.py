"""LambdaSweep: one eigendecomposition against a Cholesky per lambda (primal and dual paths)."""

from __future__ import annotations

import pytest
import torch

from ctrak_fast.engine.gram import gram
from ctrak_fast.engine.scoring import Preconditioner, damping, score_dense
from ctrak_fast.engine.store import FeatureStore
from ctrak_fast.engine.sweep import LambdaSweep

LAMBDA_RS = [1e-3, 1e-1, 1.0, 10.0, 1e3]
K = 48


def _phi(n: int, k: int = K, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Uneven column scales: G is ill-conditioned, so small lambda_r is a real test of precision.
    return torch.randn(n, k, generator=g) * torch.logspace(0, 1.5, k)


def _q(m: int = 5, k: int = K, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def _reference(phi: torch.Tensor, q: torch.Tensor, lambda_r: float) -> torch.Tensor:
    """[N, m] phi @ (G + lam I)^-1 q^T by a dense float64 solve."""
    p = phi.double()
    g = p.T @ p
    lam = lambda_r * 0.1 * float(torch.trace(g)) / g.shape[0]
    return p @ torch.linalg.solve(
        g + lam * torch.eye(g.shape[0], dtype=torch.float64), q.double().T
    )


def _assert_scores_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal to rtol of the score scale (max |score| of that lambda)."""
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("n", [20, 300])  # N < k and N > k
def test_primal_dual_and_cholesky_agree(n):
    phi, q = _phi(n), _q()
    primal = LambdaSweep(phi, path="primal").scores(q, LAMBDA_RS)
    dual = LambdaSweep(phi, path="dual").scores(q, LAMBDA_RS)
    auto = LambdaSweep(phi)
    assert auto.path == ("dual" if n < K else "primal")
    assert primal.shape == dual.shape == (len(LAMBDA_RS), n, q.shape[0])
    assert primal.dtype == dual.dtype == torch.float32
    g = gram(phi)
    for i, r in enumerate(LAMBDA_RS):
        want = _reference(phi, q, r)
        _assert_scores_close(primal[i], want)
        _assert_scores_close(dual[i], want)
        # The production path: one Cholesky per lambda, u in float64, dense scores.
        chol = score_dense(phi, Preconditioner(g, r).solve(q, dtype=torch.float64))
        _assert_scores_close(chol, want, rtol=1e-8)
        _assert_scores_close(primal[i], chol)
    assert torch.equal(auto.scores(q, LAMBDA_RS), dual if n < K else primal)


def test_the_sweep_is_not_the_same_score_at_every_lambda():
    # Guards the agreement test against a degenerate pass (e.g. lambda ignored).
    s = LambdaSweep(_phi(300)).scores(_q(), [1e-3, 1e3])
    low, high = s[0].double(), s[1].double()
    assert (low / low.norm() - high / high.norm()).norm() > 0.05


def test_scores_match_a_store_and_the_float32_cholesky_path(tmp_path):
    phi, q = _phi(200, seed=3), _q(3, seed=4)
    store = FeatureStore.create(tmp_path / "s", k=K, dtype="float32", shard_rows=64)
    with store.writer() as w:
        w.append(phi, torch.arange(200))
    sweep = LambdaSweep(store.read_all()[0], gram=gram(store))
    got = sweep.scores(q, LAMBDA_RS)
    pre = Preconditioner(gram(store), 1.0)
    for i, r in enumerate(LAMBDA_RS):
        # Preconditioner.solve's default float32 u: the engine's search precision.
        _assert_scores_close(got[i], score_dense(store, pre.with_lambda(r).solve(q)), rtol=1e-5)


def test_a_single_query_vector_and_float16_features():
    phi = _phi(30).half()
    q = _q(1)[0]
    s = LambdaSweep(phi).scores(q, [1.0])
    assert s.shape == (1, 30, 1)
    _assert_scores_close(s[0], _reference(phi.double(), q[None], 1.0))


def test_damping_matches_scoring_damping():
    for n in (20, 300):
        phi = _phi(n)
        g = gram(phi)
        for path in ("primal", "dual"):
            sweep = LambdaSweep(phi, path=path)
            for r in [0.0, *LAMBDA_RS]:
                assert sweep.damping(r) == pytest.approx(damping(g, r), rel=1e-12, abs=0)


def test_built_from_a_gram_alone_solves_like_the_preconditioner():
    phi, q = _phi(300), _q()
    g = gram(phi)
    sweep = LambdaSweep(gram=g)
    assert sweep.path == "primal" and sweep.n is None
    u = sweep.solve(q, LAMBDA_RS)
    assert u.shape == (len(LAMBDA_RS), q.shape[0], K) and u.dtype == torch.float64
    for i, r in enumerate(LAMBDA_RS):
        want = Preconditioner(g, r).solve(q, dtype=torch.float64)
        torch.testing.assert_close(u[i], want, rtol=1e-6, atol=1e-9 * want.abs().max().item())
    with pytest.raises(ValueError, match="needs phi"):
        sweep.scores(q, [1.0])


def test_precomputed_kernel_gives_the_dual_scores():
    phi, q = _phi(20), _q()
    p = phi.double()
    a = LambdaSweep(phi, kernel=p @ p.T).scores(q, LAMBDA_RS)
    torch.testing.assert_close(a, LambdaSweep(phi).scores(q, LAMBDA_RS), rtol=1e-6, atol=0)


def test_lambda_zero_is_allowed_only_when_g_is_positive_definite():
    phi, q = _phi(300), _q()
    s = LambdaSweep(phi).scores(q, [0.0])[0]  # N > k: G is PD
    _assert_scores_close(s, _reference(phi, q, 0.0))
    with pytest.raises(ValueError, match="not positive definite"):
        LambdaSweep(_phi(20)).scores(q, [1.0, 0.0])  # N < k: G is singular
    with pytest.raises(ValueError, match="not positive definite"):
        LambdaSweep(_phi(20), path="primal").scores(q, [0.0])


def test_bad_inputs_raise_clear_errors():
    phi, q = _phi(20), _q()
    sweep = LambdaSweep(phi)
    with pytest.raises(ValueError, match=r"lambda_r must be finite and >= 0, got \[-1.0\]"):
        sweep.scores(q, [1.0, -1.0])
    with pytest.raises(ValueError, match="finite"):
        sweep.scores(q, [float("nan")])
    with pytest.raises(ValueError, match="empty"):
        sweep.scores(q, [])
    with pytest.raises(ValueError, match=rf"q must be \[m, {K}\]"):
        sweep.scores(torch.randn(2, K + 1), [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        LambdaSweep(torch.empty(0, K))
    with pytest.raises(ValueError, match="non-empty"):
        LambdaSweep(torch.empty(5, 0))
    with pytest.raises(ValueError, match="non-empty"):
        LambdaSweep(torch.randn(K))
    with pytest.raises(ValueError, match="all features are zero"):
        LambdaSweep(torch.zeros(4, K))
    with pytest.raises(ValueError, match="non-finite"):
        LambdaSweep(torch.full((4, K), float("inf")))
    with pytest.raises(ValueError, match="path must be"):
        LambdaSweep(phi, path="cholesky")
    with pytest.raises(ValueError, match="give phi"):
        LambdaSweep()
    with pytest.raises(ValueError, match="dual path needs phi"):
        LambdaSweep(gram=gram(phi), path="dual")
    with pytest.raises(ValueError, match=rf"gram must be \[{K}, {K}\]"):
        LambdaSweep(phi, gram=torch.eye(K + 1, dtype=torch.float64), path="primal")
    with pytest.raises(ValueError, match="not positive definite for lambda_r=\\[0.0\\]"):
        sweep.solve(q, [0.0])  # N < k: G is singular
