"""Regenerating the ground truth (`ctrak bench counterfactual --retrain`), in phases that resume:

1. prepare: the full model (every training image), its judge, the query images and their fixed
   draws (probes.safetensors) and the LDS subset masks (masks.json);
2. lds: one model per subset mask, measured;
3. removal: each method's top-m of each removal query (written to masks.json by the benchmark,
   bench.py, from the scores on the full model), plus random, caption-lookup and no-removal arms,
   every arm at each training seed; measured, with the concept's generation rate.

Everything a phase writes lands in the setting's folder as it accrues (small files, no models
but the full one), so the benchmark itself reads them in minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ctrak_fast.bench.counterfactual.probes import Probes, make_probes
from ctrak_fast.bench.counterfactual.queue import Job
from ctrak_fast.bench.counterfactual.setting import (
    CounterfactualSetting,
    mask_to_text,
    subset_masks,
)
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.models.factor_unet import load_model
from ctrak_fast.progress import report
from ctrak_fast.train.diffusion import train_diffusion
from ctrak_fast.train.judge import evaluation_report, train_judge

__all__ = [
    "prepare",
    "lds_jobs",
    "removal_jobs",
    "read_masks",
    "write_removal_masks",
    "arm_name",
    "parse_concept",
]


def read_masks(folder: Path) -> dict:
    p = folder / "masks.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _write_masks(folder: Path, masks: dict) -> None:
    atomic_write_text(folder / "masks.json", json.dumps(masks, indent=1) + "\n")


def prepare(folder: Path, work: Path, progress: bool = True, device: str = "cpu") -> None:
    """Phase 1 (each step skipped when its file is there)."""
    setting = CounterfactualSetting.load(folder / "setting.json")
    data = setting.dataset()
    unet, judge_path = folder / "unet_full.safetensors", folder / "judge.safetensors"
    if not unet.exists():
        work.mkdir(parents=True, exist_ok=True)
        report(f"counterfactual: training the full model on {len(data)} images")
        train_diffusion(
            data, work / "full.safetensors", steps=setting.steps,
            batch_size=setting.batch_size, lr=setting.lr, seed=setting.train_seed,
            progress=progress, model_kwargs=setting.model_kwargs(), checkpoint_every=250,
            hflip=True, device=device,
        )  # fmt: skip
        shutil.copyfile(work / "full.safetensors", work / "full.copy")
        (work / "full.copy").replace(unet)
    if not judge_path.exists():
        report("counterfactual: training the judge")
        train_judge(setting.synthetic, judge_path, steps=setting.judge_steps,
                    seed=setting.train_seed, per_combo=setting.judge_renders,
                    progress=progress)  # fmt: skip
    if not (folder / "probes.safetensors").exists():
        report("counterfactual: query images and their draws")
        probes = make_probes(load_model(unet), load_model(judge_path), setting, progress)
        probes.save(folder / "probes.safetensors")
    if not (folder / "full_eval.json").exists():  # the full model draws what it was taught
        combos = setting.synthetic.combos("all")
        report_ = evaluation_report(
            load_model(unet), load_model(judge_path), combos, [], ["shape", "colour"],
            setting.synthetic.values, (setting.guidance,), 32, setting.probe_seed,
        )  # fmt: skip
        atomic_write_text(folder / "full_eval.json", json.dumps(report_, indent=1) + "\n")
    masks = read_masks(folder)
    if "lds" not in masks:
        m = subset_masks(len(data), setting.n_subsets, setting.subset_fraction,
                         setting.subset_seed)  # fmt: skip
        masks["lds"] = [mask_to_text(row) for row in m]
        _write_masks(folder, masks)


def lds_jobs(folder: Path) -> list[Job]:
    """Phase 2: one job per LDS subset."""
    setting = CounterfactualSetting.load(folder / "setting.json")
    return [
        Job(f"lds-{i:03d}", mask, setting.train_seed)
        for i, mask in enumerate(read_masks(folder).get("lds", []))
    ]


def write_removal_masks(folder: Path, removal: dict[str, str]) -> None:
    """The benchmark's removal arms, {arm name: mask}, kept once written: a later scoring run
    (other code, other lambda) cannot change what was retrained."""
    masks = read_masks(folder)
    known = masks.setdefault("removal", {})
    changed = {k: v for k, v in removal.items() if k in known and known[k] != v}
    if changed:
        report(f"counterfactual: {len(changed)} removal masks differ from the written ones; kept")
    for k, v in removal.items():
        known.setdefault(k, v)
    _write_masks(folder, masks)


def removal_jobs(folder: Path) -> list[Job]:
    """Phase 3: every removal arm at every seed, and the full data at every seed (the no-removal
    arm). Arm names are "q<query>f<factor>/<arm>/<percent of N>"; the rate is measured for the
    arm's own concept, the no-removal arm's for every removal concept."""
    setting = CounterfactualSetting.load(folder / "setting.json")
    arms = read_masks(folder).get("removal", {})
    n = len(setting.dataset())
    concepts = sorted({parse_concept(a) for a in arms})
    jobs = [
        Job(f"keep-s{seed}", mask_to_text(torch.ones(n, dtype=torch.bool)), seed, tuple(concepts))
        for seed in setting.removal_seeds
    ]
    for name, mask in sorted(arms.items()):
        slug = name.replace("/", "-").replace(" ", "_")
        for seed in setting.removal_seeds:
            jobs.append(Job(f"remove-{slug}-s{seed}", mask, seed, (parse_concept(name),), name))
    return jobs


def arm_name(query: int, factor: int, arm: str, fraction: float) -> str:
    return f"q{query}f{factor}/{arm}/{round(fraction * 100)}"


def parse_concept(arm: str) -> tuple[int, int]:
    """(query, factor) of an arm name."""
    q, f = arm.split("/")[0][1:].split("f")
    return int(q), int(f)


def probes_of(folder: Path) -> Probes:
    return Probes.load(folder / "probes.safetensors")
