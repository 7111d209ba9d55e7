"""How a benchmark turns rankings into numbers people can act on (BENCHMARKS.md §1b).

Every query gets a role: "val" or "test" (alternate queries of each seen combination; with four or
more held-out combinations, alternate held-out combinations). Every gradient method is scored at
every lambda_r of the sweep (one eigendecomposition per store, engine/sweep.py), and three lambda
protocols are reported on the TEST queries:

- fixed: one lambda_r of the sweep, the config's `lambda_r` (default 1);
- oracle (uses labels): the best lambda_r per query, the paper's protocol. Shown only beside the
  calibration row that puts a random ranking through the same protocol;
- validation (the headline): one lambda_r per method, the best mean validation P@10, applied
  unchanged to the test queries. It never reads a test label (tests/test_protocol.py).

Every figure carries a bootstrap 95% CI over test queries; the concept methods get a
paired-bootstrap CI of their difference to D-TRAK and DAS on the same queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ctrak_fast.bench.metrics import factor_metrics
from ctrak_fast.bench.stats import (
    bootstrap_ci,
    choose_lambda_on_validation,
    oracle_best,
    paired_bootstrap_diff,
    random_ranking_expected,
)
from ctrak_fast.method.methods import METHODS

LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4)
"""The lambda_r sweep of the authors' evaluation code."""
FIXED_LAMBDA = 1.0
METRICS = ("p@1", "p@5", "p@10", "ap", "specificity")
ROLES = ("val", "test")


def query_roles(combos: Sequence[tuple], per_combo: Sequence[int], heldout: bool) -> list[str]:
    """Roles of the queries of a split, in order: per_combo[i] queries of combos[i]. Held-out
    splits with >= 4 combinations alternate whole combinations (val sees other combinations);
    otherwise queries alternate within each combination (val sees other seeds)."""
    if heldout and len(combos) >= 4:
        return [ROLES[i % 2] for i, n in enumerate(per_combo) for _ in range(n)]
    return [ROLES[(j + 1) % 2] for n in per_combo for j in range(n)]


@dataclass
class QueryLog:
    """Per-query metrics: entries[method][split][factor] = list of (role, [n_lambda, n_metrics])."""

    factors: tuple[str, ...]
    lambdas: tuple[float, ...] = LAMBDAS
    entries: dict = field(default_factory=dict)

    def add(self, method: str, split: str, role: str, factor: str, per_lambda: np.ndarray):
        by = self.entries.setdefault(method, {}).setdefault(split, {}).setdefault(factor, [])
        by.append((role, per_lambda))

    def record(
        self,
        scores: dict[str, torch.Tensor],
        labels: torch.Tensor,
        combo,
        split: str,
        role: str,
        seed: int,
    ) -> None:
        """One query: scores[method] [n_lambda or 1, N, F]; adds the random-ranking calibration
        rows ("random": one random ranking; "random_oracle": the best of n_lambda of them)."""
        gen = torch.Generator().manual_seed(seed)
        rand = torch.rand(len(self.lambdas), labels.shape[0], generator=gen, dtype=torch.float64)
        for f, fname in enumerate(self.factors):
            for m, s in scores.items():
                rows = [_metric_row(s[i, :, f], labels, combo, f) for i in range(s.shape[0])]
                self.add(m, split, role, fname, np.stack(rows))
            rows = [_metric_row(rand[i], labels, combo, f) for i in range(len(self.lambdas))]
            self.add("random", split, role, fname, np.stack(rows[:1]))
            self.add("random_oracle", split, role, fname, np.stack(rows))

    def values(self, method: str, split: str, factor: str, role: str) -> np.ndarray:
        """[n_queries, n_lambda, n_metrics] of one role."""
        rows = [v for r, v in self.entries[method][split][factor] if r == role]
        if not rows:
            return np.zeros((0, len(self.lambdas), len(METRICS)))
        return np.stack(rows)


def _metric_row(scores: torch.Tensor, labels, combo, f: int) -> np.ndarray:
    m = factor_metrics(scores, labels, combo, f)
    return np.array([m[k] for k in METRICS])


def chosen_lambdas(
    log: QueryLog, methods: Sequence[str], fixed: float = FIXED_LAMBDA
) -> dict[str, float]:
    """Rule (c): per gradient method, the lambda_r with the best mean validation P@10 over every
    validation query and factor. Reads only validation entries."""
    col = METRICS.index("p@10")
    out = {}
    for m in methods:
        if not METHODS[m].has_features:
            continue
        val = [
            log.values(m, split, f, "val")[:, :, col]
            for split in log.entries[m]
            for f in log.factors
        ]
        val = [v for v in val if len(v)]
        if not val:  # no validation query (toy runs): the fixed lambda_r, never a test label
            out[m] = fixed
            continue
        per_lambda = np.concatenate(val, axis=0).T  # [n_lambda, n_val]
        out[m] = choose_lambda_on_validation(per_lambda, list(log.lambdas))
    return out


def _cell(values: np.ndarray) -> dict:
    """Mean and CI of per-query values (NaN-aware) as the results.json fields."""
    mean, lo, hi = bootstrap_ci(values)
    return {"mean": mean, "ci": [lo, hi]}


def summarize_protocols(log: QueryLog, methods: Sequence[str], fixed: float = FIXED_LAMBDA) -> dict:
    """The results fields of the three protocols, on the test queries (see the module docstring).

    Returns {"methods": {m: {split: {factor: {...}}}}, "calibration": ..., "lambda_r": ...,
    "paired": ..., "n_queries": {split: n_test}, "n_val_queries": {split: n_val}}."""
    if fixed not in log.lambdas:
        raise ValueError(f"the fixed lambda_r {fixed:g} is not in the sweep {list(log.lambdas)}")
    lam = chosen_lambdas(log, methods, fixed)
    fixed_i = log.lambdas.index(fixed)
    splits = list(next(iter(log.entries.values())))
    per_test: dict = {}  # method -> split -> factor -> headline per-query P@10 (paired CIs)
    out: dict = {"methods": {}, "calibration": {"random": {}, "random_oracle": {}}}
    for m in methods:
        li = log.lambdas.index(lam[m]) if m in lam else 0
        out["methods"][m] = {}
        for split in splits:
            cells = {}
            for f in log.factors:
                v = log.values(m, split, f, "test")  # [n, n_lambda, n_metrics]
                head = v[:, li, :]
                cell = {}
                for j, name in enumerate(METRICS):
                    c = _cell(head[:, j])
                    cell[name] = c["mean"]
                    if name in ("p@10", "ap"):
                        cell[f"{name}_ci"] = c["ci"]
                p10 = METRICS.index("p@10")
                cell["p@10_fixed"] = float(np.nanmean(v[:, min(fixed_i, v.shape[1] - 1), p10]))
                cell["p@10_oracle"] = float(np.nanmean(oracle_best(v[:, :, p10].T)))
                cells[f] = cell
                per_test.setdefault(m, {}).setdefault(split, {})[f] = head[:, p10]
            out["methods"][m][split] = cells
    for split in splits:
        for name in ("random", "random_oracle"):
            out["calibration"][name][split] = {}
            for f in log.factors:
                v = log.values(name, split, f, "test")[:, :, METRICS.index("p@10")]
                best = v.max(1) if name == "random_oracle" else v[:, 0]
                out["calibration"][name][split][f] = {"p@10": _cell(best)["mean"]}
    out["lambda_r"] = lam
    out["lambda_fixed"] = fixed
    out["paired"] = paired_differences(per_test, methods)
    out["n_queries"] = {s: len(log.values(methods[0], s, log.factors[0], "test")) for s in splits}
    out["n_val_queries"] = {
        s: len(log.values(methods[0], s, log.factors[0], "val")) for s in splits
    }
    return out


def paired_differences(per_test: dict, methods: Sequence[str]) -> dict:
    """Each concept method minus D-TRAK and DAS, P@10 on the same test queries, paired bootstrap
    95% CI: {"a - b": {split: {factor: [mean, lo, hi]}}}."""
    out = {}
    concept = [m for m in methods if METHODS[m].query == "concept"]
    for a in concept:
        for b in ("d-trak", "das"):
            if b not in methods:
                continue
            out[f"{a} - {b}"] = {
                split: {
                    f: list(paired_bootstrap_diff(per_test[a][split][f], per_test[b][split][f]))
                    for f in per_test[a][split]
                }
                for split in per_test[a]
            }
    return out


def expected_random(labels: torch.Tensor, combos: Sequence[tuple], f: int) -> float:
    """Expected P@10 of a random ranking over queries of `combos` for factor f: the mean
    frequency of the queried value."""
    vals = [random_ranking_expected(labels[:, f] == c[f]) for c in combos]
    return float(np.mean(vals)) if vals else float("nan")


__all__ = [
    "FIXED_LAMBDA",
    "LAMBDAS",
    "METRICS",
    "QueryLog",
    "chosen_lambdas",
    "expected_random",
    "paired_differences",
    "query_roles",
    "summarize_protocols",
]
