"""How a benchmark turns rankings into numbers people can act on (BENCHMARKS.md §1b).

Every query gets a role: "val" or "test" (alternate queries of each seen combination; with four or
more held-out combinations, alternate held-out combinations). Every gradient method is scored at
every lambda_r of the sweep (one eigendecomposition per store, engine/sweep.py), and three lambda
protocols are reported on the TEST queries:

- fixed: one lambda_r of the sweep, the config's `lambda_r` (default 1);
- oracle (uses labels): the best lambda_r per query, the paper's protocol. Shown only beside the
  calibration row that puts a random ranking through the same protocol;
- validation (the headline): one lambda_r per method, the best mean validation P@10, applied
  unchanged to the test queries. It never reads a test label (tests/bench/test_protocol.py).

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
METRICS = ("p@1", "p@5", "p@10", "ap", "specificity", "recall_uncaptioned")
ROLES = ("val", "test")
CAPTION_LOOKUP = "caption-lookup"
"""The calibration row that reads the captions: training images ranked by whether their caption
states the queried value, ties at random. With complete captions it scores about 1.00."""
COMPLETED_LOOKUP = "completed-caption-lookup"
"""The same lookup over the captions as the model completed them (method/completion.py): what
the completion alone finds, without any attribution."""
CI_METRICS = ("p@10", "ap", "recall_uncaptioned")
BASELINES = ("d-trak", "das", "trak", "pixel", CAPTION_LOOKUP, COMPLETED_LOOKUP)
"""What the concept methods' paired AP and recall differences are taken against."""


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
        captions: torch.Tensor | None = None,
        completed: torch.Tensor | None = None,
    ) -> None:
        """One query: scores[method] [n_lambda or 1, N, F]; labels [N, F] what the training
        images show (the ground truth); captions [N, F] what the model was told (None: the
        labels). Adds the calibration rows: "random" (one random ranking), "random_oracle" (the
        best of n_lambda of them) and CAPTION_LOOKUP; with `completed` (the captions as the
        model completed them), COMPLETED_LOOKUP too."""
        gen = torch.Generator().manual_seed(seed)
        rand = torch.rand(len(self.lambdas), labels.shape[0], generator=gen, dtype=torch.float64)
        captions = labels if captions is None else captions
        hidden = captions != labels  # the caption does not state what the image shows
        ties = torch.rand(
            labels.shape[0],
            generator=torch.Generator().manual_seed(seed + 0x5EED),
            dtype=torch.float64,
        )
        for f, fname in enumerate(self.factors):
            for m, s in scores.items():
                rows = [
                    _metric_row(s[i, :, f], labels, combo, f, hidden) for i in range(s.shape[0])
                ]
                self.add(m, split, role, fname, np.stack(rows))
            rows = [
                _metric_row(rand[i], labels, combo, f, hidden) for i in range(len(self.lambdas))
            ]
            self.add("random", split, role, fname, np.stack(rows[:1]))
            self.add("random_oracle", split, role, fname, np.stack(rows))
            lookups = {CAPTION_LOOKUP: captions}
            if completed is not None:
                lookups[COMPLETED_LOOKUP] = completed
            for name, caps in lookups.items():
                lookup = (caps[:, f] == combo[f]).double() + 0.5 * ties
                row = _metric_row(lookup, labels, combo, f, hidden)[None]
                self.add(name, split, role, fname, row)

    def values(self, method: str, split: str, factor: str, role: str) -> np.ndarray:
        """[n_queries, n_lambda, n_metrics] of one role."""
        rows = [v for r, v in self.entries[method][split][factor] if r == role]
        if not rows:
            return np.zeros((0, len(self.lambdas), len(METRICS)))
        return np.stack(rows)


def _metric_row(scores: torch.Tensor, labels, combo, f: int, hidden) -> np.ndarray:
    m = factor_metrics(scores, labels, combo, f, hidden)
    return np.array([m[k] for k in METRICS])


def chosen_lambdas(
    log: QueryLog, methods: Sequence[str], fixed: float = FIXED_LAMBDA, metric: str = "p@10"
) -> dict[str, float]:
    """Rule (c): per gradient method, the lambda_r with the best mean validation `metric` (P@10;
    AP where P@10 saturates on captioned carriers) over every validation query and factor. Reads
    only validation entries."""
    col = METRICS.index(metric)
    out = {}
    for m in methods:
        if m in METHODS and not METHODS[m].has_features:  # a recipe of rows has its own sweep
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
        per_lambda = np.nan_to_num(np.concatenate(val, axis=0).T)  # [n_lambda, n_val]
        out[m] = choose_lambda_on_validation(per_lambda, list(log.lambdas))
    return out


def _cell(values: np.ndarray) -> dict:
    """Mean and CI of per-query values (NaN-aware) as the results.json fields."""
    mean, lo, hi = bootstrap_ci(values)
    return {"mean": mean, "ci": [lo, hi]}


def _cells(head: np.ndarray) -> dict:
    """Every metric's test mean of [n_queries, n_metrics], with CIs of CI_METRICS."""
    cell = {}
    for j, name in enumerate(METRICS):
        c = _cell(head[:, j])
        cell[name] = c["mean"]
        if name in CI_METRICS:
            cell[f"{name}_ci"] = c["ci"]
    return cell


def summarize_protocols(
    log: QueryLog, methods: Sequence[str], fixed: float = FIXED_LAMBDA, select_by: str = "p@10"
) -> dict:
    """The results fields of the three protocols, on the test queries (see the module docstring).
    select_by: the validation metric that chooses each method's lambda_r.

    Returns {"methods": {m: {split: {factor: {...}}}}, "calibration": ..., "lambda_r": ...,
    "paired": ..., "paired_ap": ..., "paired_recall_uncaptioned": ...,
    "n_queries": {split: n_test}, "n_val_queries": {split: n_val}}."""
    if fixed not in log.lambdas:
        raise ValueError(f"the fixed lambda_r {fixed:g} is not in the sweep {list(log.lambdas)}")
    lam = chosen_lambdas(log, methods, fixed, select_by)
    fixed_i = log.lambdas.index(fixed)
    splits = list(next(iter(log.entries.values())))
    # metric -> method -> split -> factor -> headline per-query values (paired CIs)
    per_test: dict = {m: {} for m in CI_METRICS}
    out: dict = {"methods": {}, "calibration": {"random": {}, "random_oracle": {}}}
    p10 = METRICS.index("p@10")
    for m in methods:
        li = log.lambdas.index(lam[m]) if m in lam else 0
        out["methods"][m] = {}
        for split in splits:
            cells = {}
            for f in log.factors:
                v = log.values(m, split, f, "test")  # [n, n_lambda, n_metrics]
                head = v[:, li, :]
                cell = _cells(head)
                cell["p@10_fixed"] = float(np.nanmean(v[:, min(fixed_i, v.shape[1] - 1), p10]))
                cell["p@10_oracle"] = float(np.nanmean(oracle_best(v[:, :, p10].T)))
                cells[f] = cell
                for metric in CI_METRICS:
                    by = per_test[metric].setdefault(m, {}).setdefault(split, {})
                    by[f] = head[:, METRICS.index(metric)]
            out["methods"][m][split] = cells
            # the validation queries at the same lambda: what a recipe is chosen on
            val = {}
            for f in log.factors:
                v = log.values(m, split, f, "val")
                if len(v):
                    val[f] = {k: _cell(v[:, li, METRICS.index(k)])["mean"] for k in CI_METRICS}
            out.setdefault("validation", {}).setdefault(m, {})[split] = val
    for split in splits:
        for name in ("random", "random_oracle", CAPTION_LOOKUP, COMPLETED_LOOKUP):
            if name not in log.entries:  # a log of a run without captions
                continue
            out["calibration"].setdefault(name, {})[split] = {}
            for f in log.factors:
                v = log.values(name, split, f, "test")
                if name == "random_oracle":
                    cell = {"p@10": _cell(v[:, :, p10].max(1))["mean"]}
                else:
                    cell = _cells(v[:, 0, :])
                    for metric in CI_METRICS:
                        by = per_test[metric].setdefault(name, {}).setdefault(split, {})
                        by[f] = v[:, 0, METRICS.index(metric)]
                out["calibration"][name][split][f] = cell
    out["lambda_r"] = lam
    out["lambda_fixed"] = fixed
    out["select_lambda_by"] = select_by
    out["paired"] = paired_differences(per_test["p@10"], methods)
    for metric in ("ap", "recall_uncaptioned"):
        key = "paired_" + metric.replace("@", "")
        out[key] = paired_differences(per_test[metric], methods, BASELINES)
    out["n_queries"] = {s: len(log.values(methods[0], s, log.factors[0], "test")) for s in splits}
    out["n_val_queries"] = {
        s: len(log.values(methods[0], s, log.factors[0], "val")) for s in splits
    }
    return out


def paired_differences(
    per_test: dict, methods: Sequence[str], baselines: Sequence[str] = ("d-trak", "das")
) -> dict:
    """Each concept method minus each baseline present in per_test, a metric on the same test
    queries (queries where either is NaN are left out), paired bootstrap 95% CI:
    {"a - b": {split: {factor: [mean, lo, hi]}}}; a cell with no query left is omitted."""
    out = {}
    # a name outside the method table is a recipe built from concept rows (tools/)
    concept = [m for m in methods if m not in METHODS or METHODS[m].query == "concept"]
    for a in concept:
        for b in baselines:
            if b not in per_test or (b in METHODS and b not in methods):
                continue
            diff: dict = {}
            for split in per_test[a]:
                for f in per_test[a][split]:
                    x, y = np.asarray(per_test[a][split][f]), np.asarray(per_test[b][split][f])
                    keep = ~(np.isnan(x) | np.isnan(y))
                    if keep.any():
                        cell = paired_bootstrap_diff(x[keep], y[keep])
                        diff.setdefault(split, {})[f] = list(cell)
            if diff:
                out[f"{a} - {b}"] = diff
    return out


def expected_random(labels: torch.Tensor, combos: Sequence[tuple], f: int) -> float:
    """Expected P@10 of a random ranking over queries of `combos` for factor f: the mean
    frequency of the queried value."""
    vals = [random_ranking_expected(labels[:, f] == c[f]) for c in combos]
    return float(np.mean(vals)) if vals else float("nan")


__all__ = [
    "BASELINES",
    "CAPTION_LOOKUP",
    "CI_METRICS",
    "COMPLETED_LOOKUP",
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
