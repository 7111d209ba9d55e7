"""The Markdown tables of a concept benchmark's results (quality.py, text_quality.py).

Every table carries the calibration rows: the random ranking, and the caption lookup (training
images ranked by whether their caption states the queried value). With complete captions the
lookup scores about 1.00: a method's 1.00 there is no evidence of attribution. Where captions are
incomplete, AP over every carrier and the recall of the uncaptioned carriers decide, and get
tables of their own.
"""

from __future__ import annotations

import math

from ctrak_fast.bench.protocol import CAPTION_LOOKUP, COMPLETED_LOOKUP
from ctrak_fast.bench.stats import format_ci

SPLIT_NAMES = {"in_distribution": "ID", "heldout": "held-out"}


def _columns(results: dict) -> tuple[list[tuple[str, str]], str]:
    factors = list(results["chance"])
    cols = [(s, f) for s in ("in_distribution", "heldout") for f in factors]
    return cols, " | ".join(f"{SPLIT_NAMES[s]} {f}" for s, f in cols)


def _ci_cell(cell: dict, metric: str) -> str:
    mean = cell.get(metric, math.nan)
    if mean is None or math.isnan(mean):
        return "-"
    return format_ci(mean, *cell[f"{metric}_ci"])


def has_uncaptioned(results: dict) -> bool:
    """True when some carrier's caption leaves its value out (the recall is measured)."""
    cal = results["calibration"].get(CAPTION_LOOKUP, {})
    return any(
        not math.isnan(c.get("recall_uncaptioned", math.nan))
        for by in cal.values()
        for c in by.values()
    )


def metric_table(results: dict, metric: str, title: str) -> list[str]:
    """One headline table of `metric` [95% CI]: every method at its chosen lambda_r, then the
    random ranking and the caption lookup."""
    cols, head = _columns(results)
    lines = [title, "", f"| method | lambda_r | {head} |", "|---" * (2 + len(cols)) + "|"]
    for m, by_split in results["methods"].items():
        lam = results["lambda_r"].get(m)
        cells = [_ci_cell(by_split[s][f], metric) for s, f in cols]
        lam_txt = f"{lam:g}" if lam is not None else "-"
        lines.append(f"| {m} | {lam_txt} | " + " | ".join(cells) + " |")
    cal = results["calibration"]
    exp = results.get("expected_random", {})
    if exp and metric == "p@10":
        lines.append(
            "| random ranking (expected) | - | "
            + " | ".join(f"{exp[s][f]:.2f}" for s, f in cols)
            + " |"
        )
    rows = (
        ("random", "random ranking (measured)"),
        (CAPTION_LOOKUP, CAPTION_LOOKUP),
        (COMPLETED_LOOKUP, COMPLETED_LOOKUP),
    )
    for name, label in rows:
        if name not in cal:
            continue
        cells = []
        for s, f in cols:
            cell = cal[name][s][f]
            cells.append(
                _ci_cell(cell, metric) if f"{metric}_ci" in cell else f"{cell[metric]:.2f}"
            )
        lines.append(f"| {label} | - | " + " | ".join(cells) + " |")
    return lines


def paired_table(results: dict, key: str, title: str) -> list[str]:
    """Paired differences results[key] ("a - b" -> split -> factor -> [mean, lo, hi])."""
    cols, head = _columns(results)
    lines = ["", title, "", f"| difference | {head} |", "|---" * (1 + len(cols)) + "|"]
    for name, by_split in results.get(key, {}).items():
        cells = [format_ci(*by_split[s][f]) if f in by_split.get(s, {}) else "-" for s, f in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def format_table(results: dict) -> str:
    """Markdown tables of the three lambda protocols (bench/protocol.py), on the test queries:
    the headline (lambda_r chosen on validation queries) with bootstrap 95% CIs and the
    calibration rows; the fixed lambda_r and the oracle beside the random ranking under the same
    oracle; the paired differences of the concept methods to D-TRAK and DAS. With incomplete
    captions, AP and the uncaptioned carriers' recall follow, with their paired differences."""
    cols, head = _columns(results)
    n = results["n_queries"]
    by = results.get("select_lambda_by", "p@10")
    by = "" if by == "p@10" else f" (by {by.upper()})"
    lines = metric_table(
        results,
        "p@10",
        f"P@10 [95% CI], test queries ({n['in_distribution']} ID, {n['heldout']} held-out), "
        f"lambda_r chosen on the validation queries{by}:",
    )
    lines += [
        "",
        "P@10 under the other lambda protocols (test queries); the oracle picks the best lambda_r "
        f"of {len(results['lambdas'])} per query with the labels:",
        "",
        f"| method | fixed lambda_r = {results['lambda_fixed']:g}: {head} | "
        f"oracle (uses labels): {head} |",
        "|---" * (1 + 2 * len(cols)) + "|",
    ]
    for m, by_split in results["methods"].items():
        fixed = [f"{by_split[s][f]['p@10_fixed']:.2f}" for s, f in cols]
        oracle = [f"{by_split[s][f]['p@10_oracle']:.2f}" for s, f in cols]
        lines.append(f"| {m} | " + " | ".join(fixed + oracle) + " |")
    cal = results["calibration"]
    rand = [f"{cal['random'][s][f]['p@10']:.2f}" for s, f in cols]
    rand_or = [f"{cal['random_oracle'][s][f]['p@10']:.2f}" for s, f in cols]
    lines.append("| random ranking | " + " | ".join(rand + rand_or) + " |")
    if CAPTION_LOOKUP in cal:
        look = [f"{cal[CAPTION_LOOKUP][s][f]['p@10']:.2f}" for s, f in cols]
        lines.append(f"| {CAPTION_LOOKUP} (no lambda) | " + " | ".join(look + look) + " |")
    if results.get("paired"):
        lines += paired_table(
            results, "paired", "Paired difference of P@10 on the same test queries, mean [95% CI]:"
        )
    if has_uncaptioned(results):
        lines += [""] + metric_table(
            results, "ap", "AP over every carrier (what the images show) [95% CI], test queries:"
        )
        lines += [""] + metric_table(
            results,
            "recall_uncaptioned",
            "Recall of the uncaptioned carriers within the top R (R = number of carriers) "
            "[95% CI], test queries:",
        )
        lines += paired_table(results, "paired_ap", "Paired difference of AP, mean [95% CI]:")
        lines += paired_table(
            results,
            "paired_recall_uncaptioned",
            "Paired difference of the uncaptioned recall, mean [95% CI]:",
        )
    for split, n in results.get("underpowered", {}).items():
        lines.append(
            f"\nUNDERPOWERED: {n} test queries in the {SPLIT_NAMES[split]} split (below the "
            "floor; unconfirmed queries kept): its CIs decide nothing."
        )
    lines.append(f"\nn_train={results['n_train']}, k={results['k']}")
    return "\n".join(lines)


__all__ = ["format_table", "has_uncaptioned", "metric_table", "paired_table"]
