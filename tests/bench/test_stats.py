"""Benchmark statistics: bootstrap intervals, calibration rows, the validation lambda rule."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from ctrak_fast.bench.metrics import ranking_metrics
from ctrak_fast.bench.stats import (
    bootstrap_ci,
    choose_lambda_on_validation,
    format_ci,
    lambda_rule_validation,
    oracle_best,
    paired_bootstrap_diff,
    random_oracle_p10,
    random_ranking_expected,
    random_scores,
)

LAMBDAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4]


def _relevant(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rel = torch.zeros(n, dtype=torch.bool)
    rel[torch.randperm(n, generator=g)[:r]] = True
    return rel


def _hypergeom_pmf(n: int, r: int, k: int) -> list[float]:
    """P(j relevant in a random top k), j = 0..k: the exact law the simulations must match."""
    return [math.comb(r, j) * math.comb(n - r, k - j) / math.comb(n, k) for j in range(k + 1)]


# --- bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_ci_of_a_bernoulli_mean_has_the_normal_width():
    p, n = 0.3, 400
    x = (np.random.default_rng(11).random(n) < p).astype(float)
    mean, lo, hi = bootstrap_ci(x, n_boot=4000, seed=3)
    assert mean == pytest.approx(x.mean(), abs=0)
    assert lo < p < hi
    want = 2 * 1.96 * math.sqrt(p * (1 - p) / n)  # 0.0898
    assert abs((hi - lo) - want) < 0.2 * want, (hi - lo, want)


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    p, n, reps = 0.3, 400, 120
    rng = np.random.default_rng(5)
    covered = 0
    for rep in range(reps):
        x = (rng.random(n) < p).astype(float)
        _, lo, hi = bootstrap_ci(x, n_boot=1000, seed=rep)
        covered += lo <= p <= hi
    # Binomial(120, ~0.945): sd ~ 2.5 points; [0.87, 0.99] is about 3 sd either side.
    assert 0.87 <= covered / reps <= 0.99, covered


def test_bootstrap_ci_of_a_constant_has_zero_width():
    assert bootstrap_ci(np.full(57, 0.625)) == (0.625, 0.625, 0.625)


def test_bootstrap_ci_ignores_nan_and_is_deterministic():
    x = np.random.default_rng(2).random(80)
    with_nan = np.insert(x, [0, 10, 80], np.nan)
    assert bootstrap_ci(with_nan, seed=4) == bootstrap_ci(x, seed=4)
    assert bootstrap_ci(torch.tensor(with_nan), seed=4) == bootstrap_ci(x, seed=4)
    assert bootstrap_ci(x, seed=4) != bootstrap_ci(x, seed=5)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))


def test_bootstrap_ci_level_orders_the_intervals():
    x = np.random.default_rng(8).random(200)
    _, lo90, hi90 = bootstrap_ci(x, level=0.90)
    _, lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 < lo90 < x.mean() < hi90 < hi99


def test_paired_diff_of_identical_vectors_is_exactly_zero():
    a = np.random.default_rng(9).random(300)
    assert paired_bootstrap_diff(a, a.copy()) == (0.0, 0.0, 0.0)


def test_paired_diff_is_narrower_than_unpaired_when_queries_share_variance():
    rng = np.random.default_rng(10)
    base = rng.random(200)  # query difficulty, shared by both methods
    a = base + 0.05 + 0.02 * rng.standard_normal(200)
    b = base
    d, lo, hi = paired_bootstrap_diff(a, b, seed=1)
    assert d == pytest.approx(np.mean(a - b), abs=1e-15)
    assert lo < 0.05 < hi and lo > 0  # covers the true shift, excludes 0
    _, alo, ahi = bootstrap_ci(a, seed=1)
    assert (hi - lo) < 0.25 * (ahi - alo)  # the shared variance cancels


def test_paired_diff_drops_a_query_nan_on_either_side():
    a = np.array([0.5, np.nan, 0.7, 0.2])
    b = np.array([0.1, 0.3, np.nan, 0.2])
    assert paired_bootstrap_diff(a, b, seed=2) == paired_bootstrap_diff(
        [0.5, 0.2], [0.1, 0.2], seed=2
    )
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_diff([0.1, 0.2], [0.1])


def test_bad_bootstrap_arguments_raise():
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([0.1, 0.2], n_boot=0)


# --- format ---------------------------------------------------------------------------------------


def test_format_ci():
    assert format_ci(0.4812, 0.41, 0.5549) == "0.48 [0.41, 0.55]"
    assert format_ci(1.0, 1.0, 1.0) == "1.00 [1.00, 1.00]"
    assert format_ci(-0.031, -0.1, 0.04) == "-0.03 [-0.10, 0.04]"
    assert format_ci(*bootstrap_ci([0.25] * 4)) == "0.25 [0.25, 0.25]"


# --- calibration rows ---------------------------------------------------------------------------


def test_random_ranking_expected_equals_the_measured_random_p10():
    n, r, draws = 200, 23, 3000
    rel = _relevant(n, r, seed=1)
    scores = random_scores(n, draws, seed=7)
    measured = np.mean([ranking_metrics(s, rel, ks=(10,))["p@10"] for s in scores])
    want = random_ranking_expected(r / n)
    assert want == random_ranking_expected(rel) == pytest.approx(r / n)
    # sd of one P@10 here is ~0.099, so the SE of the mean is ~0.0018: 0.008 is > 4 SE.
    assert abs(measured - want) < 0.008, (measured, want)


def test_random_scores_rank_uniformly():
    s = random_scores(4, 24000, seed=3)
    top = s.argmax(dim=1)
    freq = torch.bincount(top, minlength=4).double() / s.shape[0]
    assert torch.allclose(freq, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015)
    assert not torch.equal(s, random_scores(4, 24000, seed=4))


@pytest.mark.parametrize(("n", "r"), [(420, 30), (60, 5), (15, 3)])
def test_random_oracle_p10_matches_the_exact_law_and_beats_random(n, r):
    rel = _relevant(n, r, seed=n)
    k, n_lambda = min(10, n), 9
    pmf = _hypergeom_pmf(n, r, k)
    cdf = np.cumsum(pmf)
    # E[max of n_lambda i.i.d. counts] = sum_j P(max >= j) = sum_j (1 - F(j-1)^n_lambda).
    exact = sum(1 - cdf[j - 1] ** n_lambda for j in range(1, k + 1)) / k
    got = random_oracle_p10(rel, n_lambda=n_lambda, seed=2, n_sims=20000)
    assert abs(got - exact) < 0.006, (got, exact)  # SE <= 0.5 / sqrt(20000) = 0.0035
    single = random_oracle_p10(rel, n_lambda=1, seed=2, n_sims=20000)
    assert abs(single - random_ranking_expected(rel)) < 0.006
    assert got > random_ranking_expected(rel) + 0.05  # the oracle lifts pure noise


def test_random_oracle_p10_agrees_with_ranking_random_scores():
    n, r, n_lambda, sims = 300, 20, 9, 800
    rel = _relevant(n, r, seed=4)
    scores = random_scores(n, sims * n_lambda, seed=9).reshape(sims, n_lambda, n)
    p10 = rel[scores.topk(10, dim=-1).indices].double().mean(dim=-1)  # [sims, n_lambda]
    measured = p10.max(dim=1).values.mean().item()
    got = random_oracle_p10(rel, n_lambda=n_lambda, seed=0)
    assert abs(got - measured) < 0.015, (got, measured)  # measured SE ~0.0035


def test_random_oracle_p10_averages_queries():
    rels = torch.stack([_relevant(100, 5, seed=1), _relevant(100, 40, seed=2)])
    each = [random_oracle_p10(r, n_lambda=5, seed=3) for r in rels]
    assert random_oracle_p10(rels, n_lambda=5, seed=3) == pytest.approx(np.mean(each), abs=0.01)


def test_oracle_best_is_the_per_query_max():
    m = np.random.default_rng(3).random((9, 50))
    m[2, 7] = np.nan
    m[:, 11] = np.nan
    best = oracle_best(m)
    assert best.shape == (50,)
    assert np.isnan(best[11])
    keep = np.arange(50) != 11
    assert np.array_equal(best[keep], np.nanmax(m[:, keep], axis=0))
    assert (best[keep] >= np.nan_to_num(m[:, keep], nan=-1)).all()
    assert np.array_equal(oracle_best(torch.tensor(m)), best, equal_nan=True)


# --- lambda chosen on validation queries ---------------------------------------------------------


def test_choose_lambda_takes_only_validation_arrays():
    assert list(inspect.signature(choose_lambda_on_validation).parameters) == [
        "val_metric",
        "lambdas",
    ]


def test_choose_lambda_maximises_the_mean_and_breaks_ties_toward_one():
    rng = np.random.default_rng(4)
    val = rng.random((9, 30)) * 0.5
    val[6] += 0.3  # lambda_r = 100 is clearly best
    assert choose_lambda_on_validation(val, LAMBDAS) == 100.0
    # Row order does not matter.
    perm = rng.permutation(9)
    assert choose_lambda_on_validation(val[perm], np.array(LAMBDAS)[perm]) == 100.0
    # Ties: equal means at 1e-3, 1e-1, 1e2 -> 1e-1 (|log| smallest); equidistant -> smaller.
    tie = np.zeros((9, 4))
    tie[[1, 3, 6]] = [0.2, 0.4, 0.6, 0.8]
    tie[6] = tie[6][::-1]  # same mean, summed in another order
    assert choose_lambda_on_validation(tie, LAMBDAS) == 1e-1
    assert choose_lambda_on_validation(np.ones((2, 3)), [0.1, 10.0]) == 0.1
    # NaN queries are skipped, not propagated.
    val[4, :5] = np.nan
    val[4, 5:] = 1.0
    assert choose_lambda_on_validation(val, LAMBDAS) == 1.0


def test_validation_rule_cannot_see_test_labels():
    rng = np.random.default_rng(12)
    val = rng.random((9, 40))
    test = rng.random((9, 60))
    chosen, at = lambda_rule_validation(val, test, LAMBDAS)
    i = LAMBDAS.index(chosen)
    assert np.array_equal(at, test[i])
    for trial in range(50):
        corrupt = test.copy()
        if trial % 3 == 0:  # permute test queries and lambda rows of the test metric
            corrupt = corrupt[rng.permutation(9)][:, rng.permutation(60)]
        elif trial % 3 == 1:  # make every other lambda perfect on test
            corrupt = np.where(np.arange(9)[:, None] == i, 0.0, 1.0) * np.ones((9, 60))
        else:  # garbage, NaN included
            corrupt = rng.standard_normal((9, 60)) * 10
            corrupt[rng.random((9, 60)) < 0.2] = np.nan
        got, at = lambda_rule_validation(val, corrupt, LAMBDAS)
        assert got == chosen, trial
        assert np.array_equal(at, corrupt[i], equal_nan=True)
    # The validation metrics do drive the choice.
    moved = val.copy()
    j = (i + 4) % 9
    moved[j] += 1.0
    assert lambda_rule_validation(moved, test, LAMBDAS)[0] == LAMBDAS[j] != chosen


def test_validation_rule_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one lambda per"):
        choose_lambda_on_validation(np.zeros((3, 2)), [1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        choose_lambda_on_validation(np.zeros((2, 2)), [0.0, 1.0])
    with pytest.raises(ValueError, match="no finite"):
        choose_lambda_on_validation(np.full((2, 2), np.nan), [0.5, 1.0])
    with pytest.raises(ValueError, match="one lambda per"):
        lambda_rule_validation(np.zeros((2, 2)), np.zeros((3, 2)), [0.5, 1.0])
