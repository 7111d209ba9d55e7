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


def uncaptioned_recall(
    scores: torch.Tensor, relevant: torch.Tensor, uncaptioned: torch.Tensor
) -> float:
    """The fraction of the uncaptioned carriers (relevant & uncaptioned) ranked within the top R,
    R = the number of carriers: what a caption lookup cannot find (it ranks every captioned
    carrier first). NaN when no carrier is uncaptioned. scores [N]; relevant, uncaptioned bool [N].

    Examples:
        >>> rel = torch.tensor([True, True, False, False])
        >>> unc = torch.tensor([False, True, False, True])
        >>> uncaptioned_recall(torch.tensor([0.0, 3.0, 2.0, 1.0]), rel, unc)
        1.0
    """
    hidden = relevant & uncaptioned
    if not hidden.any():
        return float("nan")
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    top = order[: int(relevant.sum())]
    return hidden[top].sum().item() / hidden.sum().item()


def factor_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    combo,
    f: int,
    uncaptioned: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of one query for its factor f: relevant = training rows with the query's value of
    factor f. Specificity: the fraction of the top-10 that also carry the query's value of every
    other factor, averaged over those factors (any number of factors). "recall_uncaptioned":
    uncaptioned_recall of the carriers whose caption leaves factor f out (NaN without any).
    scores [N]; labels int64 [N, F] (what the images show); combo: the query's F value indices;
    uncaptioned: bool [N, F] (None: every caption complete)."""
    relevant = labels[:, f] == combo[f]
    m = ranking_metrics(scores, relevant)
    hidden = uncaptioned[:, f] if uncaptioned is not None else torch.zeros_like(relevant)
    m["recall_uncaptioned"] = uncaptioned_recall(scores, relevant, hidden)
    top10 = torch.sort(scores.double(), descending=True, stable=True).indices[:10]
    others = [g for g in range(labels.shape[1]) if g != f]
    if others:
        same = [(labels[top10, g] == combo[g]).float().mean().item() for g in others]
        m["specificity"] = sum(same) / len(same)
    else:
        m["specificity"] = float("nan")
    return m
