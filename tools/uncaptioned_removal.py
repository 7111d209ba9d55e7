"""Do the images whose caption leaves a concept out teach the model that concept? A
remove-and-retrain test for the incomplete-caption benchmark's ground truth.

The incomplete-caption benchmarks (`ctrak bench partial`, `ctrak t2i bench`) count an image as
a carrier of "blue" when it *shows* blue, captioned or not, and ask attribution to find the
uncaptioned carriers (recall >= 0.8). That is a claim about influence: that the uncaptioned blue
images taught the model to draw blue when asked for it. This tool measures that claim directly.

Setting: the counterfactual setting `shapes9` (assets/counterfactual/shapes9/setting.json: 3
shapes x 3 colours, triangle and blue rare, 2,000 steps), with each factor's caption dropped on
half of the images (`caption_drop`, seeded). For a concept (factor, value), with its carriers
split into those whose caption names the value and those whose caption leaves the factor out,
and m = the smaller group's size, the arms are:
- `full`: every image;
- `captioned`: m of the captioned carriers removed;
- `uncaptioned`: m of the uncaptioned carriers removed;
- `random`: m images that do not show the value removed;
each trained with every seed in `--seeds` (same steps, batch and learning rate as the setting).
Measured on every model: the generation rate of the concept, i.e. how often the judge reads the
value in samples prompted with it (every shape or colour it combines with, `--samples` each, CFG
as the setting), and of the whole combination.

Each job writes OUT/<arm>-s<seed>.json atomically when done; a killed run resumes (finished jobs
are skipped, training resumes from its checkpoint in --work, where concepts share the
`full` models). `--summary` prints the table:
the rate per arm, the drop against `full` with a bootstrap CI over (seed, sample).

    python tools/uncaptioned_removal.py --concept colour=blue --out out/uncaptioned_removal/blue
    python tools/uncaptioned_removal.py --out out/uncaptioned_removal/blue --summary
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctrak_fast.bench.counterfactual.queue import judged_samples
from ctrak_fast.bench.counterfactual.setting import CounterfactualSetting
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.models.factor_unet import load_model
from ctrak_fast.train.diffusion import train_diffusion

TRUTH = Path("ctrak_fast/assets/counterfactual/shapes9")
ARMS = ("full", "captioned", "uncaptioned", "random")


def arm_masks(data, factor: int, value: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """{arm: keep mask [N]} and the group sizes; the removed images drawn with `seed`."""
    null = len(data.values[data.factors[factor]])
    shows = data.labels[:, factor] == value
    told = data.captions[:, factor] == value
    left_out = data.captions[:, factor] == null
    groups = {
        "captioned": (shows & told).nonzero().flatten(),
        "uncaptioned": (shows & left_out).nonzero().flatten(),
        "random": (~shows).nonzero().flatten(),
    }
    m = min(len(groups["captioned"]), len(groups["uncaptioned"]))
    gen = torch.Generator().manual_seed(seed)
    masks = {"full": torch.ones(len(data), dtype=torch.bool)}
    for arm, rows in groups.items():
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[rows[torch.randperm(len(rows), generator=gen)[:m]]] = False
        masks[arm] = keep
    sizes = {k: len(v) for k, v in groups.items()} | {"removed": m}
    return masks, sizes


def judged(model, judge, combos, factor: int, n: int, guidance: float, seed: int) -> dict:
    """Per prompted combination, n samples judged (queue.judged_samples) as 0/1 lists."""
    out = {}
    for combo in combos:
        hits = judged_samples(model, judge, combo, factor, n, guidance,
                              seed=seed * 7919 + combo[0] * 31 + combo[1])  # fmt: skip
        out[f"{combo[0]},{combo[1]}"] = {k: v.int().tolist() for k, v in hits.items()}
    return out


def run(args) -> None:
    setting = replace(CounterfactualSetting.load(TRUTH / "setting.json"), caption_drop=0.5)
    data = setting.dataset()
    factor = data.factors.index(args.factor)
    value = data.values[args.factor].index(args.value)
    masks, sizes = arm_masks(data, factor, value, seed=args.mask_seed)
    others = range(len(data.values[data.factors[1 - factor]]))
    combos = [(value, o) if factor == 0 else (o, value) for o in others]
    judge = load_model(TRUTH / "judge.safetensors")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "setting.json", json.dumps(setting.to_dict(), indent=2) + "\n")
    jobs = [(arm, s) for s in args.seeds for arm in args.arms]
    for i, (arm, seed) in enumerate(jobs):
        path = out / f"{arm}-s{seed}.json"
        if path.exists():
            continue
        wall, cpu = time.time(), time.process_time()
        print(
            f"[{time.strftime('%H:%M:%S')}] job {i + 1}/{len(jobs)}: {arm} seed {seed}", flush=True
        )
        weights = work / f"{ckpt_name(arm, args)}-s{seed}.safetensors"
        model = load_model(weights) if weights.exists() else train_diffusion(
            data.subset(masks[arm]), weights,
            steps=setting.steps, batch_size=setting.batch_size, lr=setting.lr, seed=seed,
            progress=False, model_kwargs=setting.model_kwargs(), checkpoint_every=250,
            hflip=True,
        )  # fmt: skip
        rec = {
            "arm": arm, "seed": seed, "concept": f"{args.factor}={args.value}",
            "n_train": int(masks[arm].sum()), "sizes": sizes,
            "samples": judged(model, judge, combos, factor, args.samples,
                                      setting.guidance, seed=1000 + seed),
            "seconds": time.time() - wall, "cpu_seconds": time.process_time() - cpu,
        }  # fmt: skip
        atomic_write_text(path, json.dumps(rec) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] done {arm} seed {seed}: {rate(rec):.3f}", flush=True)


def ckpt_name(arm: str, args) -> str:
    """The weights' file: `full` is the same model for every concept, so concepts share it."""
    return arm if arm == "full" else f"{args.factor}-{args.value}-m{args.mask_seed}-{arm}"


def rate(rec: dict, key: str = "concept") -> float:
    return float(np.mean([v for s in rec["samples"].values() for v in s[key]]))


def summary(out: Path, n_boot: int = 2000) -> dict:
    """Per arm: the concept's (and the combination's) generation rate per training seed and its
    mean; the drop against `full`, paired by seed (the same seed draws the same batches), with a
    95% bootstrap CI that resamples the seeds done for both arms, then the samples within each
    (seed, combination)."""
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("*-s*.json"))]
    runs = {(r["arm"], r["seed"]): r for r in recs}
    rng = np.random.default_rng(0)

    def resampled(r: dict, key: str) -> float:
        vals = [np.asarray(s[key]) for s in r["samples"].values()]
        return float(np.mean([a[rng.integers(len(a), size=len(a))].mean() for a in vals]))

    table: dict[str, dict] = {}
    for key in ("concept", "combination"):
        for arm in ARMS:
            seeds = sorted(s for a, s in runs if a == arm)
            if not seeds:
                continue
            per_seed = {s: rate(runs[arm, s], key) for s in seeds}
            row: dict = {"per_seed": per_seed, "rate": float(np.mean(list(per_seed.values())))}
            paired = [s for s in seeds if ("full", s) in runs]
            if arm != "full" and paired:
                draws = np.empty(n_boot)
                for b in range(n_boot):
                    pick = rng.choice(paired, size=len(paired))
                    draws[b] = np.mean(
                        [
                            resampled(runs["full", s], key) - resampled(runs[arm, s], key)
                            for s in pick
                        ]
                    )
                point = np.mean([rate(runs["full", s], key) - per_seed[s] for s in paired])
                row["drop"] = [float(point), *map(float, np.quantile(draws, [0.025, 0.975]))]
                row["paired_seeds"] = paired
            table.setdefault(key, {})[arm] = row
    sizes = recs[0]["sizes"] if recs else {}
    cpu_h = sum(r["cpu_seconds"] for r in recs) / 3600
    return {"sizes": sizes, "table": table, "cpu_hours": cpu_h, "jobs": len(recs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concept", default="colour=blue", help="factor=value (default colour=blue)")
    ap.add_argument("--out", default="out/uncaptioned_removal")
    ap.add_argument(
        "--work", default="out/uncaptioned_removal_work", help="checkpoints (shared by concepts)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to train")
    ap.add_argument("--mask-seed", type=int, default=0, help="which carriers are removed")
    ap.add_argument("--samples", type=int, default=96, help="samples per prompted combination")
    ap.add_argument("--summary", action="store_true", help="print the table of the done jobs")
    args = ap.parse_args()
    args.factor, args.value = args.concept.split("=")
    if args.summary:
        print(json.dumps(summary(Path(args.out)), indent=1))
    else:
        torch.set_num_threads(1)
        run(args)


if __name__ == "__main__":
    main()
