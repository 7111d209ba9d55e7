from __future__ import annotations

import math

import torch

from ctrak_fast.bench.metrics import average_precision, precision_at, ranking_metrics


def test_precision_at():
    ranked = torch.tensor([True, False, True, True, False])
    assert precision_at(ranked, 1) == 1.0
    assert precision_at(ranked, 4) == 0.75
    assert math.isclose(precision_at(ranked, 10), 0.6, rel_tol=1e-6)  # k beyond N: all items


def test_average_precision_against_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randn(30, generator=g)
        rel = torch.rand(30, generator=g) < 0.3
        if not rel.any():
            continue
        order = torch.argsort(scores, descending=True)
        hits, total = 0, 0.0
        for rank, i in enumerate(order.tolist(), 1):
            if rel[i]:
                hits += 1
                total += hits / rank
        assert math.isclose(average_precision(scores, rel), total / rel.sum().item(), rel_tol=1e-12)


def test_perfect_and_inverted_rankings():
    scores = torch.arange(10.0)
    rel = scores >= 7
    m = ranking_metrics(scores, rel, ks=(1, 3))
    assert m == {"p@1": 1.0, "p@3": 1.0, "ap": 1.0}
    assert ranking_metrics(-scores, rel, ks=(3,))["p@3"] == 0.0
    assert math.isnan(average_precision(scores, torch.zeros(10, dtype=torch.bool)))
