"""Uncertainty and calibration for the concept benchmark (BENCHMARKS.md §1).

Every reported metric is a mean over queries, so its uncertainty is a bootstrap over queries:
:func:`bootstrap_ci` for one method, :func:`paired_bootstrap_diff` for two methods on the same
queries (resampling queries jointly cancels the between-query variance both share).

Calibration rows put a number in context:

- random ranking: P@k of a uniformly random ranking is the relevant fraction
  (:func:`random_ranking_expected`), or measured with :func:`random_scores`;
- random oracle: the paper picks lambda per query with the test labels (:func:`oracle_best`).
  Applied to n_lambda random rankings, that protocol alone lifts P@10 well above chance
  (:func:`random_oracle_p10`), which is the bar an "oracle" number has to clear;
- validation rule: lambda chosen on held-out validation queries only
  (:func:`choose_lambda_on_validation`, :func:`lambda_rule_validation`), the honest protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_BOOT_CHUNK = 1 << 22  # resampled entries per block: bounds the index array at ~32 MiB


def _as_1d(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per query), got shape {v.shape}")
    return v


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _boot_means(v: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot] means of v resampled with replacement; v: [n] finite."""
    rng = np.random.default_rng(seed)
    n = v.shape[0]
    rows = max(1, _BOOT_CHUNK // n)
    out = np.empty(n_boot)
    for lo in range(0, n_boot, rows):
        hi = min(n_boot, lo + rows)
        out[lo:hi] = v[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    return out


def _percentile_ci(mean: float, boot: np.ndarray, level: float) -> tuple[float, float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(mean), float(lo), float(hi)


def bootstrap_ci(
    values, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over queries with a percentile-bootstrap confidence interval.

    Args:
        values: [n_queries] per-query metric (array-like or tensor). NaN entries (AP of a query
            with no relevant item) are dropped before resampling.
        n_boot: bootstrap resamples. level: coverage of the interval. seed: resampling seed (the
            result is a deterministic function of the inputs).

    Returns:
        (mean, lo, hi); all NaN when no finite value is left.

    Examples:
        >>> bootstrap_ci([0.5, 0.5, 0.5])
        (0.5, 0.5, 0.5)
        >>> m, lo, hi = bootstrap_ci(np.arange(100) / 100)
        >>> lo < m < hi
        True
    """
    _check_level(level, n_boot)
    v = _as_1d(values, "values")
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    return _percentile_ci(v.mean(), _boot_means(v, n_boot, seed), level)


def paired_bootstrap_diff(
    a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """mean(a) - mean(b) over the same queries, with a paired bootstrap interval.

    Query indices are resampled jointly, so a and b always see the same queries.

    Args:
        a, b: [n_queries] per-query metrics of two methods on the same queries. A query where
            either is NaN is dropped from both.
        n_boot, level, seed: as for :func:`bootstrap_ci`.

    Returns:
        (mean_diff, lo, hi); all NaN when no query is left.

    Examples:
        >>> paired_bootstrap_diff([0.2, 0.4], [0.2, 0.4])
        (0.0, 0.0, 0.0)
        >>> d, lo, hi = paired_bootstrap_diff([1.0, 0.9, 0.8, 1.0], [0.1, 0.3, 0.2, 0.0])
        >>> lo > 0
        True
    """
    _check_level(level, n_boot)
    va, vb = _as_1d(a, "a"), _as_1d(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"a and b must be the same queries, got {va.shape} and {vb.shape}")
    keep = ~(np.isnan(va) | np.isnan(vb))
    d = va[keep] - vb[keep]  # mean of resampled differences == difference of resampled means
    if d.size == 0:
        return math.nan, math.nan, math.nan
    return _percentile_ci(d.mean(), _boot_means(d, n_boot, seed), level)


def format_ci(mean: float, lo: float, hi: float) -> str:
    """The interval as text, "mean [lo, hi]" with 2 decimals.

    Examples:
        >>> format_ci(0.4812, 0.41, 0.5549)
        '0.48 [0.41, 0.55]'
    """
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def random_ranking_expected(relevant_fraction, k: int = 10) -> float:
    """Expected P@k of a uniformly random ranking: the relevant fraction R/N.

    The number of relevant items in the top k is hypergeometric(N, R, k) with mean k R / N, so
    P@k's mean is R / N whatever k (also for k > N, where P@k is taken over all N items).

    Args:
        relevant_fraction: R / N as a float, or a bool [N] relevance vector.
        k: the cut-off (kept for symmetry with the measured row; the mean does not depend on it).

    Examples:
        >>> random_ranking_expected(0.25)
        0.25
        >>> random_ranking_expected(torch.tensor([True, False, False, False]), k=2)
        0.25
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(relevant_fraction, (torch.Tensor, np.ndarray, list, tuple)):
        rel = np.asarray(torch.as_tensor(relevant_fraction).cpu(), dtype=bool)
        if rel.ndim != 1 or rel.size == 0:
            raise ValueError(f"relevance must be a non-empty bool [N], got shape {rel.shape}")
        return float(rel.mean())
    f = float(relevant_fraction)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"relevant_fraction must be in [0, 1], got {f}")
    return f


def random_scores(n: int, n_draws: int, seed: int = 0) -> torch.Tensor:
    """[n_draws, n] float64 i.i.d. standard normal scores: each row ranks n items uniformly at
    random (continuous, so no ties), for the measured random-ranking row.

    Examples:
        >>> s = random_scores(5, 3, seed=1)
        >>> s.shape, torch.equal(s, random_scores(5, 3, seed=1))
        (torch.Size([3, 5]), True)
    """
    if n < 1 or n_draws < 1:
        raise ValueError(f"n and n_draws must be >= 1, got n={n}, n_draws={n_draws}")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_draws, n, generator=g, dtype=torch.float64)


def _as_2d(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"{name} must be [n_lambda, n_queries] with n_lambda >= 1, got {m.shape}")
    return m


def oracle_best(per_lambda) -> np.ndarray:
    """Per-query best over lambda: the paper's protocol, which picks lambda with the test labels.

    Args:
        per_lambda: [n_lambda, n_queries] per-query metric at each lambda. NaN entries are
            skipped; a query that is NaN at every lambda stays NaN.

    Returns:
        [n_queries] float64, the max over lambda. Report it as "oracle (uses labels)".

    Examples:
        >>> oracle_best([[0.1, 0.9], [0.5, 0.2]])
        array([0.5, 0.9])
    """
    m = _as_2d(per_lambda, "per_lambda")
    finite = ~np.isnan(m)
    best = np.where(finite, m, -np.inf).max(axis=0)
    return np.where(finite.any(axis=0), best, np.nan)


def random_oracle_p10(
    relevant, n_lambda: int, k: int = 10, seed: int = 0, n_sims: int = 20000
) -> float:
    """Expected P@k of the best of n_lambda independent random rankings, by simulation.

    The oracle protocol (:func:`oracle_best`) applied to rankings that carry no signal: what it
    adds over :func:`random_ranking_expected` is an artefact of choosing with the labels.
    Each random ranking's top k holds hypergeometric(N, R, k) relevant items, so a simulation
    draws those counts directly (exactly the distribution of ranking random scores).

    Args:
        relevant: bool [N] for one query, or [n_queries, N] (the mean over queries is returned).
        n_lambda: rankings the oracle chooses among (the sweep's length).
        k: cut-off (10 for P@10; k > N is taken as N, as ranking_metrics does).
        seed: simulation seed. n_sims: simulated oracle choices per query (standard error of the
            result <= 0.5 / sqrt(n_sims)).

    Returns:
        The simulated mean P@k of the oracle's pick.

    Examples:
        >>> rel = torch.zeros(100, dtype=torch.bool)
        >>> rel[:10] = True
        >>> random_oracle_p10(rel, n_lambda=1) < 0.11 < random_oracle_p10(rel, n_lambda=9)
        True
    """
    if n_lambda < 1 or k < 1 or n_sims < 1:
        raise ValueError(f"n_lambda, k and n_sims must be >= 1, got {n_lambda}, {k}, {n_sims}")
    rel = np.asarray(torch.as_tensor(relevant).cpu(), dtype=bool)
    if rel.ndim == 1:
        rel = rel[None]
    if rel.ndim != 2 or rel.shape[1] == 0:
        raise ValueError(f"relevant must be bool [N] or [n_queries, N], got shape {rel.shape}")
    rng = np.random.default_rng(seed)
    n = rel.shape[1]
    kk = min(k, n)
    per_query = []
    for r in rel.sum(axis=1):
        hits = rng.hypergeometric(int(r), n - int(r), kk, size=(n_sims, n_lambda))
        per_query.append(hits.max(axis=1).mean() / kk)
    return float(np.mean(per_query))


def _check_lambdas(lambdas: Sequence[float], n_lambda: int) -> np.ndarray:
    lam = np.asarray(lambdas, dtype=np.float64)
    if lam.ndim != 1 or lam.shape[0] != n_lambda:
        raise ValueError(f"need one lambda per metric row ({n_lambda}), got shape {lam.shape}")
    if not (np.isfinite(lam).all() and (lam > 0).all()):
        raise ValueError(f"lambdas must be finite and > 0, got {lam.tolist()}")
    return lam


def choose_lambda_on_validation(val_metric, lambdas: Sequence[float]) -> float:
    """The lambda with the best mean validation metric; ties go to the one nearest 1 in log space.

    Takes validation metrics only, so the choice cannot depend on test labels.

    Args:
        val_metric: [n_lambda, n_val_queries] per-query validation metric (NaN queries skipped).
        lambdas: [n_lambda] positive lambda_r values, one per row.

    Returns:
        The chosen lambda_r (an element of ``lambdas``).

    Examples:
        >>> choose_lambda_on_validation([[0.2, 0.4], [0.6, 0.8], [0.1, 0.1]], [0.1, 1.0, 10.0])
        1.0
        >>> choose_lambda_on_validation([[0.5], [0.5]], [0.01, 10.0])  # tie: |log 10| < |log .01|
        10.0
    """
    m = _as_2d(val_metric, "val_metric")
    lam = _check_lambdas(lambdas, m.shape[0])
    finite = ~np.isnan(m)
    if not finite.any():
        raise ValueError("val_metric has no finite entry: nothing to choose lambda on")
    counts = finite.sum(axis=1)
    sums = np.where(finite, m, 0.0).sum(axis=1)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
    # Means of the same numbers summed in another order differ in the last bits: treat as ties.
    tied = np.flatnonzero(means >= means.max() - 1e-12 * max(1.0, abs(means.max())))
    # Nearest to 1 in log space, then the smaller lambda: deterministic whatever the row order.
    best = min(tied, key=lambda i: (abs(math.log(lam[i])), lam[i]))
    return float(lam[best])


def lambda_rule_validation(
    per_lambda_val, per_lambda_test, lambdas: Sequence[float]
) -> tuple[float, np.ndarray]:
    """Rule (c): choose lambda on validation queries, report the test queries at that lambda.

    Args:
        per_lambda_val: [n_lambda, n_val_queries] validation metric; the only input to the choice.
        per_lambda_test: [n_lambda, n_test_queries] test metric; only read at the chosen row.
        lambdas: [n_lambda] lambda_r values.

    Returns:
        (lambda_r, test): the chosen lambda_r and the [n_test_queries] per-query test metric at it
        (its mean is the reported number; :func:`bootstrap_ci` gives its interval).

    Examples:
        >>> val, test = [[0.1], [0.9]], [[1.0, 1.0], [0.0, 0.5]]
        >>> lam, test = lambda_rule_validation(val, test, [1.0, 10.0])
        >>> lam, test.tolist()
        (10.0, [0.0, 0.5])
    """
    test = _as_2d(per_lambda_test, "per_lambda_test")
    lam = _check_lambdas(lambdas, test.shape[0])
    chosen = choose_lambda_on_validation(per_lambda_val, lambdas)  # sees validation rows only
    return chosen, test[int(np.flatnonzero(lam == chosen)[0])].copy()


__all__ = [
    "bootstrap_ci",
    "choose_lambda_on_validation",
    "format_ci",
    "lambda_rule_validation",
    "oracle_best",
    "paired_bootstrap_diff",
    "random_oracle_p10",
    "random_ranking_expected",
    "random_scores",
]
