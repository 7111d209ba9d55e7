"""sweep_factor.sweep_solve (one Cholesky + shifted Krylov) and gram_factor.SharedGramFactor,
against one Cholesky per lambda (scoring.Preconditioner)."""

from __future__ import annotations

import pytest
import torch

import ctrak_fast.engine.sweep as sweep
from ctrak_fast.engine.gram_factor import MAX_K, SharedGramFactor
from ctrak_fast.engine.scoring import Preconditioner
from ctrak_fast.engine.sweep_factor import default_lambda_r0, sweep_solve

GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4]  # bench/protocol.py's LAMBDAS
K = 96


def _features(n: int, k: int, decay: float, seed: int) -> torch.Tensor:
    """[n, k] float64 whose Gram has eigenvalues ~ i^-decay (decay 0: Marchenko-Pastur)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, k + 1, dtype=torch.float64) ** (-decay / 2)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * scale


def _queries(m: int, k: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cholesky_scores(phi: torch.Tensor, q: torch.Tensor, lambda_r: float) -> torch.Tensor:
    pre = Preconditioner(phi.T @ phi, lambda_r)
    return phi @ pre.solve(q, dtype=torch.float64).T


def _assert_same_scores(got_u: torch.Tensor, phi: torch.Tensor, want: torch.Tensor, top: int):
    """Scores within 1e-4 of the score scale, and the same top ids of every query."""
    got = phi @ got_u.T
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-4, err
    for j in range(want.shape[1]):
        ids = set(got[:, j].topk(top).indices.tolist())
        assert ids == set(want[:, j].topk(top).indices.tolist())


@pytest.mark.parametrize(
    "decay", [0.0, 1.0, 2.0], ids=["marchenko-pastur", "power-1", "power-2-ill-conditioned"]
)
def test_every_lambda_equals_its_own_cholesky(decay):
    phi, q = _features(3 * K, K, decay, seed=1), _queries(5, K)
    res = sweep_solve(phi.T @ phi, q, GRID)
    assert res.u.shape == (len(GRID), 5, K) and res.u.dtype == torch.float64
    assert sorted(res.by_krylov + res.by_cholesky) == sorted(GRID)
    assert res.by_krylov, "the Krylov sequences solved nothing"
    for i, r in enumerate(GRID):
        _assert_same_scores(res.u[i], phi, _cholesky_scores(phi, q, r), top=20)


def test_tiny_lambda_on_a_near_singular_gram():
    # N = k rows with a steep spectrum: cond(G) ~ 1e10, lambda_r = 1e-6 barely damps it.
    phi, q = _features(K, K, 4.0, seed=2), _queries(3, K)
    grid = [1e-6, 1e-3, 1.0, 1e3]
    res = sweep_solve(phi.T @ phi, q, grid)
    assert res.by_krylov
    for i, r in enumerate(grid):
        _assert_same_scores(res.u[i], phi, _cholesky_scores(phi, q, r), top=10)


def test_no_convergence_falls_back_to_a_cholesky_per_lambda():
    phi, q = _features(3 * K, K, 2.0, seed=3), _queries(4, K)
    res = sweep_solve(phi.T @ phi, q, GRID, max_iter=2)
    assert res.iterations == 2
    assert len(res.by_cholesky) >= 3 and 1e-4 in res.by_cholesky
    for i, r in enumerate(GRID):
        _assert_same_scores(res.u[i], phi, _cholesky_scores(phi, q, r), top=20)


def test_a_recurrence_that_lies_is_caught_by_the_residual_check(monkeypatch):
    # Corrupt the solutions the recurrence hands over: the recomputed residual must reject them.
    import ctrak_fast.engine.sweep_factor as sf

    real_step = sf.ShiftedLanczos.step

    def lying_step(self):
        real_step(self)
        self.x += 1e-3 * self.x.abs().max()

    monkeypatch.setattr(sf.ShiftedLanczos, "step", lying_step)
    phi, q = _features(3 * K, K, 1.0, seed=4), _queries(3, K)
    res = sweep_solve(phi.T @ phi, q, GRID)
    assert sorted(res.by_cholesky) == sorted(GRID)
    for i, r in enumerate(GRID):
        _assert_same_scores(res.u[i], phi, _cholesky_scores(phi, q, r), top=20)


def test_deterministic_and_in_place():
    phi, q = _features(3 * K, K, 1.0, seed=5), _queries(4, K)
    g = phi.T @ phi
    a = sweep_solve(g, q, GRID)
    buf = g.clone()
    b = sweep_solve(buf, q, GRID, inplace=True)
    assert torch.equal(a.u, b.u) and a.iterations == b.iterations
    # In place: the buffer kept G's strict upper triangle and holds a factor below it.
    assert torch.equal(buf.triu(1), g.triu(1))
    assert not torch.equal(buf.tril(), g.tril())


def test_a_singular_gram_at_lambda_zero_is_refused():
    phi = _features(K // 2, K, 0.0, seed=6)  # N < k: G is singular
    with pytest.raises(ValueError, match="not positive definite for lambda_r=0"):
        sweep_solve(phi.T @ phi, _queries(2, K), [0.0, 1.0, 10.0])


def test_default_lambda_r0_sits_below_the_middle_of_the_grid():
    assert default_lambda_r0(GRID) == 0.1
    assert default_lambda_r0([0.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="lambda_r > 0"):
        default_lambda_r0([0.0])


def test_shared_buffer_products_solves_and_refactor():
    phi = _features(200, 70, 1.0, seed=8)
    g = phi.T @ phi
    x = _queries(3, 70).T.contiguous()
    eye = torch.eye(70, dtype=torch.float64)
    f = SharedGramFactor(g, lam=0.3)
    torch.testing.assert_close(f.gram_matmul(x), g @ x)
    a = g + 0.3 * eye
    torch.testing.assert_close(f.mul_lower(f.mul_upper(x)), a @ x)
    torch.testing.assert_close(a @ f.solve_upper(f.solve_lower(x)), x)
    assert f.refactor(5.0) and f.lam == 5.0
    torch.testing.assert_close((g + 5.0 * eye) @ f.solve_upper(f.solve_lower(x)), x)
    assert not f.refactor(-1e9) and not f.factored  # not PD: reported, no factor kept
    assert f.refactor(0.3)  # G's triangle survived the failed attempt
    torch.testing.assert_close(a @ f.solve_upper(f.solve_lower(x)), x)
    with pytest.raises(ValueError, match="non-finite"):
        SharedGramFactor(torch.full((3, 3), float("nan")), 1.0)


def test_shared_buffer_blocks_cover_a_k_beyond_one_block(monkeypatch):
    import ctrak_fast.engine.gram_factor as gf

    monkeypatch.setattr(gf, "BLOCK", 16)  # 70 = 4 blocks + a remainder
    phi = _features(150, 70, 0.5, seed=9)
    g = phi.T @ phi
    x = _queries(2, 70).T.contiguous()
    f = gf.SharedGramFactor(g, lam=1.0)
    torch.testing.assert_close(f.gram_matmul(x), g @ x)
    assert f.refactor(2.0)
    eye = torch.eye(70, dtype=torch.float64)
    torch.testing.assert_close((g + 2.0 * eye) @ f.solve_upper(f.solve_lower(x)), x)


def test_solve_queries_takes_the_krylov_sweep_above_the_eigh_limit(monkeypatch):
    phi, q = _features(3 * K, K, 1.0, seed=10), _queries(4, K).float()
    lambdas = [1e-3, 1.0, 1e3]
    by_eigh = sweep.solve_queries(phi.float(), q, lambdas, path="primal")
    calls = []
    real = sweep.sweep_solve
    monkeypatch.setattr(sweep, "sweep_solve", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(sweep, "EIGH_MAX_K", K - 1)
    by_krylov = sweep.solve_queries(phi.float(), q, lambdas, path="primal")
    assert calls == [1]
    scale = by_eigh.abs().amax(dim=(1, 2), keepdim=True)
    assert float(((by_krylov - by_eigh).abs() / scale).max()) <= 1e-4


def test_solve_queries_factors_per_lambda_above_the_krylov_limit(monkeypatch):
    # scipy's dpotrf crashes at k = 16000 on the build machine: there the sweep must not call it
    phi, q = _features(3 * K, K, 1.0, seed=11), _queries(4, K).float()
    lambdas = [1e-3, 1.0, 1e3]
    by_eigh = sweep.solve_queries(phi.float(), q, lambdas, path="primal")
    monkeypatch.setattr(sweep, "EIGH_MAX_K", K - 1)
    monkeypatch.setattr(sweep, "KRYLOV_MAX_K", K - 1)
    monkeypatch.setattr(sweep, "sweep_solve", lambda *a, **kw: pytest.fail("Krylov sweep taken"))
    per_lambda = sweep.solve_queries(phi.float(), q, lambdas, path="primal")
    scale = by_eigh.abs().amax(dim=(1, 2), keepdim=True)
    assert float(((per_lambda - by_eigh).abs() / scale).max()) <= 1e-4
    with pytest.raises(ValueError, match="dpotrf crashes"):
        big = torch.ones(1, 1, dtype=torch.float64).expand(MAX_K + 1, MAX_K + 1)
        SharedGramFactor(big, lam=1.0)  # the shape is refused before any memory is touched
