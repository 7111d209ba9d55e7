"""Ranking metrics of the concept benchmark (BENCHMARKS.md §1)."""

from __future__ import annotations

import torch


def precision_at(relevant_ranked: torch.Tensor, k: int) -> float:
    """Fraction of the first k items that are relevant; relevant_ranked: bool [N] in rank order."""
    k = min(k, relevant_ranked.numel())
    return relevant_ranked[:k].float().mean().item()


def average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """AP of the full ranking by descending score. scores: [N], relevant: bool [N].

    Ties are broken by index (stable sort) so the result is deterministic.
    """
    if relevant.sum() == 0:
        return float("nan")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    rel = relevant[order].double()
    hits = rel.cumsum(0)
    ranks = torch.arange(1, rel.numel() + 1, dtype=torch.float64)
    return ((hits / ranks) * rel).sum().item() / rel.sum().item()


def ranking_metrics(
    scores: torch.Tensor, relevant: torch.Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """P@k for each k and AP for one query. scores: [N]; relevant: bool [N]."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    ranked = relevant[order]
    out = {f"p@{k}": precision_at(ranked, k) for k in ks}
    out["ap"] = average_precision(scores, relevant)
    return out


def factor_metrics(scores: torch.Tensor, labels: torch.Tensor, combo, f: int) -> dict[str, float]:
    """Metrics of one query for its factor f: relevant = training rows with the query's value of
    factor f. Specificity: the fraction of the top-10 that also carry the query's value of every
    other factor, averaged over those factors (any number of factors).
    scores [N]; labels int64 [N, F]; combo: the query's F value indices."""
    m = ranking_metrics(scores, labels[:, f] == combo[f])
    top10 = torch.sort(scores.double(), descending=True, stable=True).indices[:10]
    others = [g for g in range(labels.shape[1]) if g != f]
    if others:
        same = [(labels[top10, g] == combo[g]).float().mean().item() for g in others]
        m["specificity"] = sum(same) / len(same)
    else:
        m["specificity"] = float("nan")
    return m
