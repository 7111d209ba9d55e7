"""The linear datamodeling score (LDS; Park et al. 2023, TRAK §2): how well a method's scores,
summed over a training subset, predict what a model trained on that subset actually does.

For query q, method scores tau[q, i] and subsets S_1..S_M (masks [M, N]):

    predicted[m, q] = sum_{i in S_m} tau[q, i]
    LDS[q] = Spearman over m of (predicted[m, q], measured[m, q])

`measured` is a model output where larger means "the model does more of what the query asks"
(the negated loss), so a score that credits helpful training images correlates positively.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrak_fast.bench.stats import bootstrap_ci, paired_bootstrap_diff

__all__ = ["spearman", "subset_predictions", "lds_per_query", "lds_summary", "lds_difference"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along axis 0 (ties share the mean of their ranks, as scipy's rankdata)."""
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    cols = np.arange(x.shape[1])
    ranks[order, cols] = np.arange(x.shape[0], dtype=np.float64)[:, None]
    out = ranks.copy()
    for j in range(x.shape[1]):  # ties: few columns and short vectors here, a loop is clear
        _, inverse, counts = np.unique(x[:, j], return_inverse=True, return_counts=True)
        if (counts > 1).any():
            sums = np.bincount(inverse, weights=ranks[:, j])
            out[:, j] = (sums / counts)[inverse]
    return out


def spearman(a, b) -> np.ndarray:
    """Spearman correlation of each column of a [M, Q] with the same column of b [M, Q] -> [Q];
    NaN where a column is constant (no ranking to correlate).

    Examples:
        >>> spearman([[1.0], [2.0], [3.0]], [[10.0], [30.0], [20.0]]).round(2).tolist()
        [0.5]
        >>> spearman([[1.0], [1.0]], [[0.0], [1.0]]).tolist()
        [nan]
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim == 1:
        x, y = x[:, None], y[:, None]
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"a and b must both be [M, Q], got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman: non-finite entries")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean(0)
    ry -= ry.mean(0)
    den = np.sqrt((rx * rx).sum(0) * (ry * ry).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def subset_predictions(scores, masks) -> np.ndarray:
    """predicted[m, q] = sum of scores[q, i] over the training images i of subset m.
    scores [Q, N]; masks bool [M, N] -> [M, Q] (float64)."""
    s = torch.as_tensor(scores).double()
    m = torch.as_tensor(masks).double()
    if s.dim() != 2 or m.dim() != 2 or s.shape[1] != m.shape[1]:
        raise ValueError(f"scores [Q, N] and masks [M, N] must share N: {s.shape}, {m.shape}")
    return (m @ s.T).numpy()


def lds_per_query(scores, masks, measured) -> np.ndarray:
    """LDS of each query: scores [Q, N], masks [M, N], measured [M, Q] -> [Q]."""
    pred = subset_predictions(scores, masks)
    measured = np.asarray(measured, dtype=np.float64)
    if measured.shape != pred.shape:
        raise ValueError(f"measured must be [M, Q] = {pred.shape}, got {measured.shape}")
    return spearman(pred, measured)


def lds_summary(per_query, seed: int = 0) -> dict:
    """Mean LDS over queries with a bootstrap 95% CI: {"mean", "lo", "hi", "n"}."""
    v = np.asarray(per_query, dtype=np.float64)
    mean, lo, hi = bootstrap_ci(v, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": int(np.isfinite(v).sum())}


def lds_difference(a, b, seed: int = 0) -> dict:
    """Paired difference of two methods' per-query LDS on the same queries, with its CI."""
    mean, lo, hi = paired_bootstrap_diff(np.asarray(a), np.asarray(b), seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi}
