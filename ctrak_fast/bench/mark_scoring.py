"""Scoring of the uncaptioned-mark benchmark (bench/mark.py): its metrics, the patch-search pixel
baseline, lambda_r chosen per row on validation queries, CIs and paired differences on the test
queries, and the table."""

from __future__ import annotations

import numpy as np
import torch

from ctrak_fast.bench.metrics import ranking_metrics
from ctrak_fast.bench.stats import (
    bootstrap_ci,
    choose_lambda_on_validation,
    format_ci,
    paired_bootstrap_diff,
)

MARK_METRICS = ("p@10", "ap", "r-precision")
CALIBRATION = ("random", "caption lookup", "das weight alone (no query)")
# the rows every concept-trak row is compared with (paired AP differences on the test queries)
BASELINES = (
    "d-trak · whole image",
    "das · whole image",
    "trak · whole image",
    "d-trak · region",
    "das · region",
    "trak · region",
    "pixel · whole image",
    "pixel · region (fixed place)",
    "pixel · patch search (any place)",
    "das weight alone (no query)",
    "caption lookup",
    "random",
)


def mark_metrics(scores: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """P@10, AP and R-precision (the fraction of the top R that is marked, R = the number of
    marked images; equal to their recall within the top R) of one ranking. scores [N]; truth
    bool [N].

    Examples:
        >>> m = mark_metrics(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1, 0, 1, 0]) > 0)
        >>> m["r-precision"], round(m["ap"], 3)
        (0.5, 0.833)
    """
    m = ranking_metrics(scores, truth, ks=(10,))
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    r = int(truth.sum())
    m["r-precision"] = truth[order[:r]].float().mean().item() if r else float("nan")
    return m


def patch_search(train_images: torch.Tensor, image: torch.Tensor, box) -> torch.Tensor:
    """Template matching: the query's region (box x0, y0, x1, y1 of image [C,H,W]) compared with
    every window of its size in every training image [N,C,H,W] by zero-mean normalised cross-
    correlation; the best window's value per image [N]. A flat window or patch scores 0.

    Examples:
        >>> x = -torch.ones(2, 1, 6, 6); x[1, 0, 3, 4] = 1.0
        >>> q = -torch.ones(1, 6, 6); q[0, 1, 1] = 1.0
        >>> patch_search(x, q, (0, 0, 3, 3)).tolist()
        [0.0, 1.0]
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    patch = image[:, y0:y1, x0:x1].flatten()
    patch = patch - patch.mean()
    patch = patch / patch.norm().clamp_min(1e-12)
    win = torch.nn.functional.unfold(train_images, (y1 - y0, x1 - x0))  # [N, C*h*w, L]
    win = win - win.mean(1, keepdim=True)
    win = win / win.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("d,ndl->nl", patch, win).amax(1)


def row_results(
    per_row: dict[str, list[np.ndarray]],
    roles: list[str],
    lambdas: list[float],
    select_by: str,
    controls: dict[str, list[np.ndarray]] | None = None,
) -> tuple[dict, dict[str, float]]:
    """Per row: lambda_r chosen on the validation queries by `select_by`, the test queries'
    means with bootstrap 95% CIs at it, the validation means, the control queries' means with
    CIs at it (what the row finds when asked about no mark), and (concept-trak rows) the paired
    AP differences to every baseline. per_row[row], controls[row]: per query [n_lambda (or 1),
    metrics]."""
    val = [i for i, r in enumerate(roles) if r == "validation"]
    test = [i for i, r in enumerate(roles) if r == "test"]
    col = MARK_METRICS.index(select_by)
    at: dict[str, np.ndarray] = {}  # row -> [queries, metrics] at its chosen lambda
    chosen: dict[str, float] = {}
    rows: dict[str, dict] = {}
    for row, per_query in per_row.items():
        m = np.stack(per_query)  # [Q, n_lambda, metrics]
        li = 0
        if m.shape[1] > 1:
            chosen[row] = choose_lambda_on_validation(m[val, :, col].T, lambdas)
            li = lambdas.index(chosen[row])
        at[row] = m[:, li]
        rows[row] = {
            "test": {k: list(bootstrap_ci(at[row][test, j])) for j, k in enumerate(MARK_METRICS)},
            "validation": {
                k: float(np.nanmean(at[row][val, j])) for j, k in enumerate(MARK_METRICS)
            },
        }
        if controls and controls.get(row):
            c = np.stack(controls[row])[:, li]
            rows[row]["control"] = {
                k: list(bootstrap_ci(c[:, j])) for j, k in enumerate(MARK_METRICS)
            }
    for row, m in at.items():
        if row.startswith("concept-trak"):
            ap = MARK_METRICS.index("ap")
            rows[row]["paired_ap"] = {
                b: list(paired_bootstrap_diff(m[test, ap], at[b][test, ap]))
                for b in BASELINES
                if b in at
            }
    return rows, chosen


def mark_table(results: dict) -> str:
    """Markdown: every row's test P@10, AP and R-precision with 95% CIs at its validation-chosen
    lambda_r (gradient rows first, then pixels, then the calibration rows), and the paired AP
    differences of the concept-trak rows."""
    n = results["n_queries"]
    lines = [
        f"Uncaptioned mark: {results['n_train']} training images, {results['n_marked']} "
        f"stamped; {n['test']} test queries ({n['validation']} validation queries chose "
        f"lambda_r by AP); the judge found the mark in {results['found']} of "
        f"{results['candidates']} samples.",
        "",
        "AP on no-mark controls: the same row asked about a region of a sample that shows no "
        f"mark ({n.get('control', 0)} controls); a row that finds the stamped images whatever it "
        "is asked scores as high there.",
        "",
        "| method · query | lambda_r | P@10 | AP | R-precision | AP on no-mark controls |",
        "|---|---|---|---|---|---|",
    ]
    order = sorted(results["rows"], key=lambda r: (r in CALIBRATION, r.startswith("pixel")))
    for row in order:
        cell = results["rows"][row]["test"]
        lam = results["lambda_r"].get(row)
        lam_txt = f"{lam:g}" if lam is not None else "-"
        control = results["rows"][row].get("control")
        cells = [format_ci(*cell[m]) for m in MARK_METRICS]
        cells.append(format_ci(*control["ap"]) if control else "-")
        lines.append(f"| {row} | {lam_txt} | " + " | ".join(cells) + " |")
    ours = [r for r in order if results["rows"][r].get("paired_ap")]
    if ours:
        lines += [
            "",
            "AP minus each baseline's, on the same test queries (paired bootstrap 95% CI):",
        ]
        lines += ["", "| baseline | " + " | ".join(ours) + " |", "|---" * (1 + len(ours)) + "|"]
        for b in results["rows"][ours[0]]["paired_ap"]:
            cells = [format_ci(*results["rows"][r]["paired_ap"][b]) for r in ours]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "BASELINES",
    "MARK_METRICS",
    "mark_metrics",
    "mark_table",
    "patch_search",
    "row_results",
]
