"""The tables of `ctrak bench counterfactual` (results.json -> markdown)."""

from __future__ import annotations

import numpy as np

from ctrak_fast.bench.stats import bootstrap_ci, format_ci, paired_bootstrap_diff

__all__ = ["counterfactual_tables", "removal_summary"]


def _lds_table(rows: dict, ref: str, title: str) -> list[str]:
    diff = f"{ref} − row"
    out = [
        f"**{title}**",
        "",
        f"| row | λ_r | LDS, test [95% CI] | {diff} [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, r in sorted(rows.items(), key=lambda kv: -np.nan_to_num(kv[1]["mean"], nan=-9)):
        lam = "—" if r["lambda_r"] != r["lambda_r"] else f"{r['lambda_r']:g}"
        d = r.get(f"{ref} − this")
        cell = format_ci(d["mean"], d["lo"], d["hi"]) if d else "—"
        out.append(
            f"| {name} | {lam} | {format_ci(r['mean'], r['lo'], r['hi'])} (n={r['n']}) | {cell} |"
        )
    return out


def removal_summary(table: dict, ref: str) -> dict:
    """Per arm and percent: the concept's generation rate after removal, and its drop from the
    no-removal arm at the same seed, over (concept, seed) pairs; paired difference to `ref`."""
    out: dict = {}
    for concept, arms in table.items():
        base = arms.get("no removal", {}).get("0", {}).get("rate", [])
        for arm, by_pct in arms.items():
            if arm == "no removal":
                continue
            for pct, cell in by_pct.items():
                entry = out.setdefault(pct, {}).setdefault(
                    arm, {"rate": [], "drop": [], "keys": []}
                )
                for seed, rate in enumerate(cell["rate"]):
                    entry["rate"].append(rate)
                    entry["drop"].append(base[seed] - rate if seed < len(base) else float("nan"))
                    entry["keys"].append(f"{concept}/s{seed}")
    summary: dict = {}
    for pct, arms in out.items():
        for arm, e in arms.items():
            row = {
                "rate": bootstrap_ci(e["rate"]),
                "drop": bootstrap_ci(e["drop"]),
                "n": len(e["rate"]),
            }
            if ref in arms and arm != ref and arms[ref]["keys"] == e["keys"]:
                row[f"{ref} − this (drop)"] = paired_bootstrap_diff(arms[ref]["drop"], e["drop"])
            summary.setdefault(pct, {})[arm] = row
    return summary


def counterfactual_tables(results: dict) -> str:
    ref = "concept-trak-cond"
    lines = [
        f"{results['n_train']} training images, {results['n_subsets']} LDS subsets, "
        f"{results['n_queries']['test']} test / {results['n_queries']['validation']} validation "
        f"queries; ground truth: {results['cpu_hours']['models']} retrained models, "
        f"{results['cpu_hours']['cpu_hours']:.1f} CPU-hours",
        "",
    ]
    lines += _lds_table(
        results["concept_lds"], ref, "Concept LDS (− slider loss; units: query × factor)"
    )
    lines += [""]
    lines += _lds_table(
        results["whole_lds"], "d-trak", "Whole-image LDS (− denoising loss of the query image)"
    )
    summary = removal_summary(results.get("removal", {}), ref)
    for pct, arms in sorted(summary.items(), key=lambda kv: float(kv[0])):
        lines += [
            "",
            f"**Remove the top {pct}% and retrain** (drop of the concept's generation rate from "
            "the no-removal model at the same seed; n = concepts × seeds)",
            "",
            f"| arm | rate after | drop [95% CI] | {ref} − arm (drop) |",
            "|---|---|---|---|",
        ]
        for arm, r in sorted(arms.items(), key=lambda kv: -np.nan_to_num(kv[1]["drop"][0], nan=-9)):
            d = r.get(f"{ref} − this (drop)")
            lines.append(f"| {arm} | {r['rate'][0]:.2f} | {format_ci(*r['drop'])} (n={r['n']}) | "
                         f"{format_ci(*d) if d else '—'} |")  # fmt: skip
    if not summary:
        lines += ["", "Remove-and-retrain: no arm measured yet (`--retrain` runs them after LDS)."]
    return "\n".join(lines)
