"""Recipes built from the rows of the incomplete-caption benchmark, for the results log.

Phase 1 (`--scores`) runs `ctrak bench partial` once (its stores read from `--stores-from` when
given) and keeps every query's full scores, every method and lambda_r, in OUT/scores.safetensors.
Phase 2 (always) builds each recipe's scores from those rows, query by query, scores them as the
benchmark does (the same QueryLog, lambda_r and any recipe weight chosen on the VALIDATION
queries by AP) and prints validation and test AP / uncaptioned recall. No recipe reads a label:
they read the scores, and the captions (what the model was told).

    python tools/partial_recipes.py --scores --stores-from out/partial_bench
    python tools/partial_recipes.py                   # phase 2 only (default --out)
    python tools/partial_recipes.py --by-caption-state  # AP per caption state (no recipes)

Recipes:
- `group-z:<m>`: each score standardised within the images whose caption states the queried
  factor, and within those whose caption leaves it out, then merged: an uncaptioned image's
  features are scored on another scale (docs/RESULTS_LOG.md, variant 1's diagnosis), so the two
  groups are ranked each on its own scale.
- `<a>+w*<b>`: z(a) + w z(b) (each standardised over the training set): the condition path plus a
  path that reads the image, w from a grid chosen on validation; b at its own validation lambda_r.
- `switch:<a>|<b>`: a's group-z scores for the images whose caption states the factor, b's for
  those whose caption leaves it out (the condition path cannot see the concept there).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ctrak_fast.bench.metrics import average_precision
from ctrak_fast.bench.protocol import QueryLog, summarize_protocols
from ctrak_fast.bench.quality import QualityConfig, run_quality
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.models.shipped import ASSETS, PARTIAL, asset_dataset, shipped

WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
CELLS = [(s, f) for s in ("in_distribution", "heldout") for f in ("shape", "colour")]


def run_scores(out: Path, assets: Path, stores_from: Path | None) -> None:
    model, judge, spec = shipped(PARTIAL, assets=assets)
    data = asset_dataset(spec, model)
    if stores_from is not None and not (out / "stores").exists():
        shutil.copytree(stores_from / "stores", out / "stores")
    cfg = QualityConfig(select_lambda_by="ap", query_candidates=24)
    res = run_quality(model, judge, data, cfg, out, progress=False)
    tensors, meta = {}, []
    for i, q in enumerate(res["_queries"]):
        meta.append({k: q[k] for k in ("split", "role", "combo")})
        for m, s in q["scores"].items():
            tensors[f"{i}/{m}"] = s.float().contiguous()
    train = res["_train"]
    tensors["labels"], tensors["captions"] = train.labels, train.captions
    save_file(tensors, str(out / "scores.safetensors"))
    info = {"queries": meta, "lambda_r": res["lambda_r"], "lambdas": list(cfg.lambdas)}
    info["n_values"], info["factors"] = list(model.n_values), list(data.factors)
    atomic_write_text(out / "scores.json", json.dumps(info, indent=1))


def zscore(s: torch.Tensor) -> torch.Tensor:
    """Standardise over the training axis (dim -2 of [n_lambda, N, F])."""
    return (s - s.mean(-2, keepdim=True)) / s.std(-2, keepdim=True).clamp_min(1e-12)


def group_z(s: torch.Tensor, stated: torch.Tensor) -> torch.Tensor:
    """z-scores within each caption state: stated [N, F] bool (the caption names factor f)."""
    out = torch.empty_like(s)
    for f in range(s.shape[-1]):
        for g in (stated[:, f], ~stated[:, f]):
            out[:, g, f] = zscore(s[:, g, f : f + 1])[..., 0]
    return out


def recipes(scores: dict, stated, lam_index: dict) -> dict[str, torch.Tensor]:
    """Every recipe's scores [n_lambda, N, F] for one query."""
    out = dict(scores)

    def at_chosen(m):  # [1, N, F] at m's validation lambda_r
        s = scores[m]
        return s[lam_index[m] : lam_index[m] + 1] if s.shape[0] > 1 else s

    for m in ("concept-trak-cond", "concept-trak-complete", "concept-trak", "d-trak"):
        out[f"group-z:{m}"] = group_z(scores[m], stated)
    for a in ("concept-trak-cond", "concept-trak-complete"):
        for b in ("d-trak", "pixel", "concept-trak"):
            for w in WEIGHTS:
                out[f"{a}+{w:g}*{b}"] = zscore(scores[a]) + w * zscore(at_chosen(b))
                out[f"group-z:{a}+{w:g}*{b}"] = group_z(scores[a], stated) + w * group_z(
                    at_chosen(b).expand_as(scores[a]).clone(), stated
                )
    for a in ("concept-trak-cond", "concept-trak-complete"):
        for b in ("d-trak", "trak", "pixel", "concept-trak", "concept-trak-complete"):
            if a == b:
                continue
            za = group_z(scores[a], stated)
            zb = group_z(at_chosen(b).expand_as(scores[a]).clone(), stated)
            out[f"switch:{a}|{b}"] = torch.where(stated[None], za, zb)
    return out


def evaluate(out: Path) -> dict:
    info = json.loads((out / "scores.json").read_text())
    t = load_file(str(out / "scores.safetensors"))
    labels, captions = t["labels"], t["captions"]
    nulls = torch.tensor(info["n_values"])
    stated = captions != nulls
    lambdas = tuple(info["lambdas"])
    lam_index = {m: lambdas.index(v) for m, v in info["lambda_r"].items() if v in lambdas}
    log = QueryLog(tuple(info["factors"]), lambdas)
    names = None
    for i, q in enumerate(info["queries"]):
        scores = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(f"{i}/")}
        r = recipes(scores, stated, lam_index)
        names = names or list(r)
        log.record(r, labels, tuple(q["combo"]), q["split"], q["role"], seed=i, captions=captions)
    res = summarize_protocols(log, names, 1.0, "ap")
    rows = {}
    for m in names:
        val = res["validation"][m]
        test = res["methods"][m]
        rows[m] = {
            "lambda_r": res["lambda_r"].get(m),
            "val_ap": [val[s][f]["ap"] for s, f in CELLS],
            "val_recall": [val[s][f]["recall_uncaptioned"] for s, f in CELLS],
            "test_ap": [test[s][f]["ap"] for s, f in CELLS],
            "test_ap_ci": [test[s][f]["ap_ci"] for s, f in CELLS],
            "test_recall": [test[s][f]["recall_uncaptioned"] for s, f in CELLS],
            "test_p10": [test[s][f]["p@10"] for s, f in CELLS],
        }
    for name in ("caption-lookup", "random"):
        cal = res["calibration"].get(name)
        if cal:
            rows[name] = {
                "test_ap": [cal[s][f]["ap"] for s, f in CELLS],
                "test_recall": [cal[s][f]["recall_uncaptioned"] for s, f in CELLS],
            }
    atomic_write_text(out / "recipes.json", json.dumps(rows, indent=1))
    return rows


def by_caption_state(out: Path) -> dict:
    """Does a method see the concept where the caption does not say it? Per test query, factor
    and method (at its validation lambda_r): the AP of the uncaptioned carriers against the
    non-carriers (captioned carriers left out of the ranking), and of the captioned carriers
    against the non-carriers. The caption lookup ties every image in the first ranking, so it
    is at chance there by construction: the first column is attribution beyond the captions."""
    info = json.loads((out / "scores.json").read_text())
    t = load_file(str(out / "scores.safetensors"))
    labels, captions = t["labels"], t["captions"]
    stated = captions != torch.tensor(info["n_values"])
    lambdas = info["lambdas"]
    acc: dict[tuple, list[float]] = {}
    for i, q in enumerate(info["queries"]):
        if q["role"] != "test":
            continue
        for key, s in t.items():
            if not key.startswith(f"{i}/"):
                continue
            m = key.split("/", 1)[1]
            if s.dim() == 3:  # [n_lambda, N, F]: at the validation choice
                s = s[lambdas.index(info["lambda_r"][m])] if s.shape[0] > 1 else s[0]
            for f in range(labels.shape[1]):
                carrier = labels[:, f] == q["combo"][f]
                for group, sel in (("uncaptioned", carrier & ~stated[:, f]),
                                   ("captioned", carrier & stated[:, f])):  # fmt: skip
                    keep = sel | ~carrier
                    ap = average_precision(s[keep, f], sel[keep])
                    acc.setdefault((m, group, q["split"], f), []).append(ap)
                    acc.setdefault(("random", group, q["split"], f), []).append(
                        float(sel[keep].float().mean())
                    )
    rows: dict[str, dict[str, list[float]]] = {}
    for (m, group, split, f), v in acc.items():
        cell = CELLS.index((split, info["factors"][f]))
        rows.setdefault(m, {}).setdefault(group, [float("nan")] * len(CELLS))[cell] = float(
            np.mean(v)
        )
    return rows


def fmt(v) -> str:
    return " / ".join(f"{x:.2f}" for x in v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/partial_recipes")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--scores", action="store_true", help="phase 1: run the benchmark first")
    p.add_argument("--stores-from", help="a `bench partial --out` folder whose stores to reuse")
    p.add_argument(
        "--by-caption-state", action="store_true",
        help="print each row's AP of the uncaptioned (and captioned) carriers against the "
        "non-carriers, then stop",
    )  # fmt: skip
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.scores:
        run_scores(out, Path(a.assets), Path(a.stores_from) if a.stores_from else None)
    if a.by_caption_state:
        table = by_caption_state(out)
        atomic_write_text(out / "by_caption_state.json", json.dumps(table, indent=1))
        print("row | AP uncaptioned carriers vs non-carriers (ID shape, ID colour, HO shape, "
              "HO colour) | AP captioned carriers vs non-carriers")  # fmt: skip
        for m, r in sorted(table.items()):
            print(f"{m} | {fmt(r['uncaptioned'])} | {fmt(r['captioned'])}")
        return
    rows = evaluate(out)
    best = sorted(
        (m for m in rows if "val_ap" in rows[m]), key=lambda m: -np.nanmean(rows[m]["val_ap"])
    )
    print("recipe | λ_r | val AP (ID shape, colour, HO shape, colour) | val recall | test")
    for m in best + ["caption-lookup", "random"]:
        r = rows[m]
        if "val_ap" in r:
            print(
                f"{m} | {r['lambda_r']} | {fmt(r['val_ap'])} | {fmt(r['val_recall'])} | "
                f"{fmt(r['test_ap'])} | {fmt(r['test_recall'])}"
            )
        else:
            print(f"{m} | - | | | {fmt(r['test_ap'])} | {fmt(r['test_recall'])}")


if __name__ == "__main__":
    main()
