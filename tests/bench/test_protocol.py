"""The benchmark's lambda protocols (bench/protocol.py): query roles, the validation rule that
never reads test labels, the oracle and its calibration row, CIs and paired differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrak_fast.bench.protocol import (
    LAMBDAS,
    METRICS,
    QueryLog,
    chosen_lambdas,
    query_roles,
    summarize_protocols,
)

FACTORS = ("shape", "colour")


def test_roles_alternate_queries_or_heldout_combinations():
    assert query_roles([(0, 1), (1, 0)], [3, 2], heldout=False) == [
        "test", "val", "test", "test", "val",
    ]  # fmt: skip
    # >= 4 held-out combinations: whole combinations alternate (val sees other combinations)
    roles = query_roles([(0, 0), (1, 1), (2, 2), (3, 3)], [2, 2, 2, 2], heldout=True)
    assert roles == ["val"] * 2 + ["test"] * 2 + ["val"] * 2 + ["test"] * 2
    assert query_roles([(0, 2), (3, 1)], [2, 2], heldout=True) == ["test", "val"] * 2


def _log(seed: int, best_val: int, n: int = 12) -> QueryLog:
    """A log whose validation P@10 peaks at lambda index `best_val`; test entries random."""
    rng = np.random.default_rng(seed)
    log = QueryLog(FACTORS)
    for m in ("concept-trak", "d-trak", "das", "pixel"):
        for split in ("in_distribution", "heldout"):
            for f in FACTORS:
                for q in range(n):
                    role = "val" if q % 2 else "test"
                    n_lam = 1 if m == "pixel" else len(LAMBDAS)
                    v = rng.random((n_lam, len(METRICS)))
                    if role == "val" and m != "pixel":
                        v[:, METRICS.index("p@10")] = 0.1
                        v[best_val, METRICS.index("p@10")] = 0.9
                    log.add(m, split, role, f, v)
                for name in ("random", "random_oracle"):
                    for q in range(n):
                        k = 1 if name == "random" else len(LAMBDAS)
                        role = "val" if q % 2 else "test"
                        log.add(name, split, role, f, rng.random((k, len(METRICS))))
    return log


def test_validation_rule_cannot_see_test_labels():
    log = _log(0, best_val=6)
    chosen = chosen_lambdas(log, ["concept-trak", "d-trak", "das", "pixel"])
    assert chosen == {"concept-trak": LAMBDAS[6], "d-trak": LAMBDAS[6], "das": LAMBDAS[6]}
    # Overwrite every test entry (as if the test labels were anything else): same lambda.
    rng = np.random.default_rng(1)
    for by_split in log.entries.values():
        for by_factor in by_split.values():
            for f, rows in by_factor.items():
                by_factor[f] = [(r, rng.random(v.shape) if r == "test" else v) for r, v in rows]
    assert chosen_lambdas(log, ["concept-trak", "d-trak", "das"]) == {
        m: LAMBDAS[6] for m in ("concept-trak", "d-trak", "das")
    }
    # ... while the validation entries do decide it.
    assert chosen_lambdas(_log(0, best_val=2), ["d-trak"]) == {"d-trak": LAMBDAS[2]}


def test_summary_fields_oracle_and_calibration():
    log = _log(3, best_val=4)
    res = summarize_protocols(log, ["concept-trak", "d-trak", "das", "pixel"])
    cell = res["methods"]["concept-trak"]["heldout"]["shape"]
    test = log.values("concept-trak", "heldout", "shape", "test")
    p10 = METRICS.index("p@10")
    assert cell["p@10"] == pytest.approx(test[:, 4, p10].mean())  # the validation lambda
    assert cell["p@10_fixed"] == pytest.approx(test[:, LAMBDAS.index(1.0), p10].mean())
    assert cell["p@10_oracle"] == pytest.approx(test[:, :, p10].max(1).mean())
    lo, hi = cell["p@10_ci"]
    assert lo <= cell["p@10"] <= hi
    assert res["n_queries"] == {"in_distribution": 6, "heldout": 6}
    assert res["n_val_queries"] == {"in_distribution": 6, "heldout": 6}
    rand = log.values("random_oracle", "heldout", "shape", "test")[:, :, p10]
    assert res["calibration"]["random_oracle"]["heldout"]["shape"]["p@10"] == pytest.approx(
        rand.max(1).mean()
    )
    d = res["paired"]["concept-trak - d-trak"]["heldout"]["shape"]
    want = test[:, 4, p10] - log.values("d-trak", "heldout", "shape", "test")[:, 4, p10]
    assert d[0] == pytest.approx(want.mean()) and d[1] <= d[0] <= d[2]


def test_record_measures_random_rankings_near_chance():
    # 400 training rows, 25% carry the queried value: random P@10 ~ 0.25, best of 9 is higher.
    labels = torch.stack([torch.arange(400) % 4, torch.arange(400) // 100], 1)
    log = QueryLog(FACTORS)
    for q in range(200):
        scores = {"pixel": torch.randn(1, 400, 2)}
        log.record(scores, labels, (0, 1), "heldout", "test", seed=q)
    rnd = log.values("random", "heldout", "shape", "test")[:, 0, METRICS.index("p@10")]
    best = log.values("random_oracle", "heldout", "shape", "test")[:, :, METRICS.index("p@10")]
    assert abs(rnd.mean() - 0.25) < 0.04
    assert best.max(1).mean() > rnd.mean() + 0.1
