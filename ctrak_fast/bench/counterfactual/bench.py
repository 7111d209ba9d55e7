"""`ctrak bench counterfactual`: every method judged by what the training data did (LDS and
remove-and-retrain), from the shipped ground truth (ground_truth.py) in minutes.

Each method scores the training set for every probe query on the full model (the same
featurization and queries as `ctrak bench quality`). Query units are (query, factor) pairs for the
concept output and queries for the whole-image output. lambda_r is chosen per method on the
validation queries by mean LDS; every figure is on the test queries, with bootstrap 95% CIs over
them. Caption lookup scores an image 1 where its caption names the query's value of the factor;
random scores are uniform.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ctrak_fast.bench.counterfactual.ground_truth import (
    arm_name,
    lds_jobs,
    read_masks,
    removal_jobs,
    write_removal_masks,
)
from ctrak_fast.bench.counterfactual.lds import (
    lds_difference,
    lds_per_query,
    lds_summary,
    subset_predictions,
)
from ctrak_fast.bench.counterfactual.probes import Probes
from ctrak_fast.bench.counterfactual.queue import read_outputs
from ctrak_fast.bench.counterfactual.setting import (
    CounterfactualSetting,
    mask_from_text,
    mask_to_text,
)
from ctrak_fast.bench.harness import (
    factor_featurizers,
    featurize_methods,
    method_scores,
    pixel_cosine,
)
from ctrak_fast.bench.quality import QualityConfig, factor_concept_features
from ctrak_fast.bench.stats import choose_lambda_on_validation
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.method.methods import METHODS
from ctrak_fast.method.query import image_query_features
from ctrak_fast.models.factor_unet import load_model
from ctrak_fast.progress import progress as show_progress

__all__ = [
    "all_scores",
    "run_counterfactual",
    "refresh_removal",
    "removal_arms",
    "removal_table",
    "SHIPPED_METHOD",
    "CALIBRATION",
]

SHIPPED_METHOD = "concept-trak-cond"
CALIBRATION = ("caption lookup", "random")


def all_scores(model, data, probes: Probes, cfg: QualityConfig, out_dir: Path, progress=True):
    """{row: [n_lambda, Q, N, F]} for every method of cfg and the calibration rows (one lambda)."""
    trained = featurize_methods(
        cfg, factor_featurizers(model, cfg), data.images, data.captions, data.ids, out_dir,
        progress,
    )  # fmt: skip
    n_factors = probes.combos.shape[1]
    per_query: list[dict[str, torch.Tensor]] = []
    queries = range(probes.n_queries)
    for q in show_progress(queries, desc="attribute", unit="query", enabled=progress):
        cond, image = probes.combos[q], probes.images[q]
        per_query.append(method_scores(
            trained, cfg.methods,
            lambda row, fz, c=cond, x=image: factor_concept_features(fz, cfg.query_spec(row), c, x),
            lambda fz, c=cond, x=image: image_query_features(fz, x[None], c[None]),
            lambda x=image: pixel_cosine(data.images, x),
            n_factors, cfg.lambdas,
        ))  # fmt: skip
    scores = {m: torch.stack([s[m] for s in per_query], 1) for m in cfg.methods}
    named = (data.captions[None] == probes.combos[:, None]).float()  # [Q, N, F]
    scores["caption lookup"] = named[None]
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + 11)
    scores["random"] = torch.rand(named.shape, generator=gen)[None]
    return scores, trained.timings


def query_units(x: torch.Tensor) -> torch.Tensor:
    """[..., Q, N, F] -> [..., Q*F, N]: one row per (query, factor) unit, query-major."""
    return x.movedim(-1, -2).flatten(-3, -2)


def lds_rows(scores, masks, measured, roles, lambdas, concept: bool) -> dict:
    """Per row: the lambda chosen on validation, test LDS per unit and its summary."""
    val = np.array([r == "validation" for r in roles])
    rows = {}
    for name, s in scores.items():
        if not concept and name in METHODS and METHODS[name].query == "concept":
            continue  # a concept query does not predict the whole-image loss
        per_lambda = [
            lds_per_query(query_units(sl) if concept else sl[:, :, 0], masks, measured) for sl in s
        ]
        grid = np.stack(per_lambda)  # [n_lambda, units]
        lam_list = list(lambdas) if len(s) == len(lambdas) else [float("nan")]
        i = 0
        if len(s) > 1:
            i = lam_list.index(choose_lambda_on_validation(grid[:, val], lam_list))
        rows[name] = {"lambda_r": lam_list[i], "test": grid[i, ~val], "validation": grid[i, val]}
    return rows


def lds_summaries(rows: dict, ref: str | None) -> dict:
    out = {}
    for name, r in rows.items():
        out[name] = {"lambda_r": r["lambda_r"], **lds_summary(r["test"])}
        if ref in rows and name != ref:
            out[name][f"{ref} − this"] = lds_difference(rows[ref]["test"], r["test"])
    return out


def removal_arms(scores, chosen: dict, lambdas, probes: Probes, setting, n: int) -> dict[str, str]:
    """{arm name: mask of the images kept}: each row's top-m of each removal query at its
    chosen lambda_r. Removal queries are test (query, factor) units whose value is rare, the
    first of each rare value, `removal_queries` in all; the random arm is one draw shared by
    every query."""
    units, asked = [], set()
    for q, role in enumerate(probes.roles):
        for f, values in enumerate((setting.shapes, setting.colours)):
            value = values[int(probes.combos[q, f])]
            if role == "test" and value in setting.rare and value not in asked:
                units.append((q, f))  # each rare value's first test unit, in turn
                asked.add(value)
    units = units[: setting.removal_queries]
    arms = {}
    gen = torch.Generator().manual_seed(setting.probe_seed * 31 + 7)
    shared_random = torch.rand(n, generator=gen)
    for q, f in units:
        for name, s in scores.items():
            row = s[0]  # the calibration rows have one "lambda"
            if len(s) > 1:
                row = s[list(lambdas).index(chosen[name]["lambda_r"])]
            v = shared_random if name == "random" else row[q, :, f].clone()
            if name == "caption lookup":  # ties (every carrier) broken at random
                v = v + 1e-3 * torch.rand(n, generator=gen)
            for frac in setting.removal_fractions:
                keep = torch.ones(n, dtype=torch.bool)
                keep[torch.topk(v, round(frac * n)).indices] = False
                arms[arm_name(q, f, name, frac)] = mask_to_text(keep)
    return arms


def run_counterfactual(folder, out_dir, cfg: QualityConfig | None = None, progress=True) -> dict:
    """The tables from the ground truth in `folder`; results.json and a plot in out_dir. Writes
    the removal arms into folder/masks.json the first time (ground_truth.removal_jobs)."""
    t0 = time.time()
    folder, out = Path(folder), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or QualityConfig()
    setting = CounterfactualSetting.load(folder / "setting.json")
    data = setting.dataset()
    model = load_model(folder / "unet_full.safetensors").eval()
    probes = Probes.load(folder / "probes.safetensors")
    jobs = lds_jobs(folder)
    done = read_outputs(folder / "outputs", [j.name for j in jobs])
    if len(done) < 2:
        raise ValueError(f"{folder}: {len(done)} LDS models measured; regenerate (--retrain)")
    masks = torch.stack([mask_from_text(j.mask, len(data)) for j in jobs if j.name in done])
    slider = torch.tensor([done[j.name]["slider"] for j in jobs if j.name in done])
    whole = torch.tensor([done[j.name]["whole"] for j in jobs if j.name in done])
    scores, timings = all_scores(model, data, probes, cfg, out, progress)
    roles_units = [r for r in probes.roles for _ in range(probes.combos.shape[1])]
    concept = lds_rows(scores, masks, slider.flatten(1), roles_units, cfg.lambdas, True)
    whole_rows = lds_rows(scores, masks, whole, probes.roles, cfg.lambdas, False)
    results = {
        "benchmark": "counterfactual",
        "n_train": len(data),
        "n_subsets": len(masks),
        "n_queries": {r: probes.roles.count(r) for r in ("validation", "test")},
        "concept_lds": lds_summaries(concept, SHIPPED_METHOD),
        "whole_lds": lds_summaries(whole_rows, "d-trak"),
        "concept_lds_per_unit": {m: r["test"].tolist() for m, r in concept.items()},
        "lambdas": list(cfg.lambdas),
        "k": cfg.k,
        "cpu_hours": _cpu_hours(folder),
        "timings": timings,
    }
    if "removal" not in read_masks(folder):
        write_removal_masks(
            folder, removal_arms(scores, results["concept_lds"], cfg.lambdas, probes, setting,
                                 len(data)))  # fmt: skip
    results["removal"] = removal_table(folder)
    plot_unit = roles_units.index("test")
    results["plot"] = predicted_vs_actual(scores, concept, masks, slider.flatten(1), plot_unit,
                                          cfg.lambdas, out / "lds_scatter.png")  # fmt: skip
    results["seconds"] = time.time() - t0
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    return results


def refresh_removal(results: dict, folder: Path, out: Path) -> dict:
    """results with the removal table and cost re-read (after more removal models)."""
    results = {**results, "removal": removal_table(folder), "cpu_hours": _cpu_hours(folder)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    return results


def _cpu_hours(folder: Path) -> dict:
    files = list((folder / "outputs").glob("*.json"))
    cpu = sum(json.loads(p.read_text()).get("cpu_seconds", 0.0) for p in files)
    return {"models": len(files), "cpu_hours": cpu / 3600}


def removal_table(folder: Path) -> dict:
    """{concept: {arm: {percent: {"rate": [per seed], "slider": [per seed]}}}} of the removal
    jobs measured so far ("no removal": the full data at each seed)."""
    jobs = removal_jobs(folder)
    done = read_outputs(folder / "outputs", [j.name for j in jobs])
    table: dict = {}
    for j in (j for j in jobs if j.name in done):
        o = done[j.name]
        arm, percent = j.arm.split("/")[1:] if j.arm else ("no removal", "0")
        for q, f in j.rate:
            cell = table.setdefault(f"q{q}f{f}", {}).setdefault(arm, {}).setdefault(percent, {})
            cell.setdefault("rate", []).append(o["rate"][f"{q},{f}"]["concept"])
            cell.setdefault("slider", []).append(o["slider"][q][f])
    return table


def predicted_vs_actual(scores, rows, masks, measured, unit, lambdas, path) -> dict:
    """Scatter of predicted (summed scores) against measured concept output for one test unit,
    the shipped method and D-TRAK; returns the plotted values."""
    from matplotlib.figure import Figure

    from ctrak_fast.bench.report import save_figure

    names = [m for m in (SHIPPED_METHOD, "d-trak") if m in scores]
    fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
    plotted = {}
    for i, name in enumerate(names):
        lam = rows[name]["lambda_r"]
        s = scores[name][list(lambdas).index(lam)]
        pred = subset_predictions(query_units(s)[unit][None], masks)[:, 0]
        actual = measured[:, unit].numpy()
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.scatter(pred, actual, s=14)
        rho = lds_per_query(query_units(s)[unit][None], masks, actual[:, None])[0]
        ax.set_title(f"{name} (λ_r={lam:g}): Spearman {rho:.2f}")
        ax.set_xlabel("predicted: sum of scores over the subset")
        ax.set_ylabel("measured: − slider loss")
        plotted[name] = {"predicted": pred.tolist(), "measured": actual.tolist(), "lds": rho}
    save_figure(fig, path)
    return {"unit": unit, **plotted}
