"""`ctrak bench paper`: the paper's own synthetic 2 x 2 setting, in the paper's table layout.

Park et al. train on outlined triangles and circles, red and blue, with the red triangle held out,
and report P@10 averaged over the queries "triangle" and "red" (and the other concept of each
query) for in-distribution and held-out combinations. We ship the same setting at 16 x 16
(data/synthetic.py: paper_config) with a FactorUNet and judge trained on it (`ctrak train
--preset paper --name paper2x2`), run the concept benchmark on it, and print both protocols:
the paper's (best lambda_r per query, chosen with the labels) and ours (lambda_r chosen on
validation queries), beside the paper's figures.
"""

from __future__ import annotations

import numpy as np

from ctrak_fast.bench.stats import format_ci

PAPER_NAME = "paper2x2"
PAPER_P10 = {  # METHOD.md §8, synthetic: (in-distribution, held-out combination)
    "concept-trak": (1.00, 0.85),
    "das": (1.00, 0.50),
    "d-trak": (1.00, 0.50),
    "trak": (0.80, 0.45),
}


def split_mean(results: dict, method: str, split: str, key: str) -> float:
    """A method's P@10 (`key`) averaged over the factors of a split (the paper's averages)."""
    cells = results["methods"][method][split]
    return float(np.mean([c[key] for c in cells.values()]))


def paper_table(results: dict) -> str:
    """Markdown: per method, ID / held-out P@10 under the paper's oracle protocol, under ours
    (the validation lambda, with the mean of its per-factor CIs' ends), and the paper's figures;
    the random ranking under both protocols as the calibration row."""
    lines = [
        "| method | paper's protocol (oracle lambda, uses labels) ID / held-out | ours (lambda "
        "on validation queries) ID / held-out | paper's figures ID / held-out |",
        "|---|---|---|---|",
    ]
    for m in results["methods"]:
        if m not in PAPER_P10 and m not in ("pixel",):
            label = f"{m} (ours)"
        else:
            label = m
        oracle = [split_mean(results, m, s, "p@10_oracle") for s in ("in_distribution", "heldout")]
        ours = []
        for s in ("in_distribution", "heldout"):
            cells = results["methods"][m][s].values()
            lo = float(np.mean([c["p@10_ci"][0] for c in cells]))
            hi = float(np.mean([c["p@10_ci"][1] for c in cells]))
            ours.append(format_ci(split_mean(results, m, s, "p@10"), lo, hi))
        paper = PAPER_P10.get(m)
        paper_txt = f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"
        lines.append(
            f"| {label} | {oracle[0]:.2f} / {oracle[1]:.2f} | {ours[0]} / {ours[1]} | {paper_txt} |"
        )
    cal = results["calibration"]
    rnd = [np.mean([v["p@10"] for v in cal["random"][s].values()]) for s in cal["random"]]
    rnd_or = [np.mean([v["p@10"] for v in cal["random_oracle"][s].values()]) for s in cal["random"]]
    lines.append(
        f"| random ranking | {rnd_or[0]:.2f} / {rnd_or[1]:.2f} | {rnd[0]:.2f} / {rnd[1]:.2f} | - |"
    )
    n = results["n_queries"]
    lines.append(
        f"\nTest queries: {n['in_distribution']} ID, {n['heldout']} held-out; "
        f"n_train={results['n_train']}, k={results['k']}."
    )
    return "\n".join(lines)


__all__ = ["PAPER_NAME", "PAPER_P10", "paper_table", "split_mean"]
