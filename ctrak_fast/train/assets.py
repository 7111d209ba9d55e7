"""A model and its judges, written as assets (`ctrak train`): the FactorUNet (train.py), then
its ConceptJudge and evaluation (judge.py) and, where an uncaptioned mark is stamped, its
MarkJudge (mark_judge.py), on synthetic data (train_all) or a labelled image folder
(train_folder).

    ctrak train --out ctrak_fast/assets --name shapes16 --time-budget 2400
    ctrak train --folder DIR --labels FILE --out OUT --name NAME

write <name>.json (where the data comes from), unet_<name>.safetensors (EMA weights),
judge_<name>.safetensors, <name>_eval.json (judge accuracy per combination), a sample grid PNG,
and markjudge_<name>.safetensors with --mark-fraction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from ctrak_fast.data import SyntheticConfig, make_dataset
from ctrak_fast.data.dataset import images_tensor
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.train.diffusion import train_diffusion
from ctrak_fast.train.judge import (
    combo_name,
    evaluation_report,
    sample_grid,
    train_judge,
    train_judge_on_data,
)
from ctrak_fast.train.mark_judge import synthetic_pool, train_mark_judge

__all__ = ["SCHEDULES", "train_all", "train_folder"]

log = logging.getLogger(__name__)


# Noise schedules of `ctrak train --schedule` (NoiseSchedule configs).
SCHEDULES = {
    "cosine": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "max_beta": 0.05},
    "linear": {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
    },
}


def _write_eval(
    model,
    judge,
    paths,
    combos,
    heldout,
    factors,
    values,
    guidances,
    eval_n,
    seed,
    samples_png,
    extra,
) -> None:
    report = evaluation_report(
        model, judge, combos, heldout, factors, values, guidances, eval_n, seed, extra
    )
    report["judge_validation_accuracy"] = getattr(judge, "validation_accuracy", None)
    atomic_write_text(paths["eval"], json.dumps(report, indent=2) + "\n")
    if samples_png:
        held = set(map(tuple, heldout))
        labels = [combo_name(factors, values, c) + (" *" if c in held else "") for c in combos]
        sample_grid(model, combos, samples_png, guidance=guidances[0], seed=seed, labels=labels)
        paths["samples"] = str(samples_png)


def _paths(out: Path, name: str) -> dict[str, str]:
    return {
        "config": str(out / f"{name}.json"),
        "unet": str(out / f"unet_{name}.safetensors"),
        "judge": str(out / f"judge_{name}.safetensors"),
        "eval": str(out / f"{name}_eval.json"),
    }


def train_all(
    out_dir: str | os.PathLike,
    name: str = "shapes16",
    cfg: SyntheticConfig | None = None,
    steps: int = 20_000,
    time_budget_s: float | None = None,
    batch_size: int = 64,
    lr: float = 4e-4,
    judge_steps: int = 1500,
    eval_n: int = 32,
    guidances: tuple[float, ...] = (1.0, 2.0),
    samples_png: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    init_from: str | os.PathLike | None = None,
    schedule: dict | None = None,
) -> dict[str, str]:
    """Synthetic dataset -> diffusion model -> judge -> evaluation; returns the written paths.

    Files in out_dir: <name>.json (SyntheticConfig; `make_dataset(SyntheticConfig.load_json(...))`
    regenerates the training set bit for bit), unet_<name>.safetensors, judge_<name>.safetensors,
    <name>_eval.json, and markjudge_<name>.safetensors where cfg stamps a mark (mark_judge.py).
    The diffusion model goes first: it is what everything else waits for.
    schedule: NoiseSchedule config for a new model (default models.DEFAULT_SCHEDULE).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or SyntheticConfig(seed=seed)
    paths = _paths(out, name)
    cfg.save_json(paths["config"])
    ds = make_dataset(cfg)
    log.info(
        f"dataset: {len(ds)} images, "
        f"held out {[(cfg.shapes[s], cfg.colours[c]) for s, c in cfg.heldout]}, "
        f"uncaptioned per factor {ds.uncaptioned.sum(0).tolist()}, marked {int(ds.marked.sum())}"
    )
    t0 = time.time()
    model = train_diffusion(
        ds,
        paths["unet"],
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        time_budget_s=time_budget_s,
        progress=progress,
        hflip=True,
        init_from=init_from,
        model_kwargs={"schedule": schedule} if schedule else None,
    )
    train_s = round(time.time() - t0)
    judge = train_judge(cfg, paths["judge"], steps=judge_steps, seed=seed, progress=progress)
    if cfg.mark_fraction:  # the detector that confirms `bench mark`'s queries
        paths["mark_judge"] = str(out / f"markjudge_{name}.safetensors")
        pool = synthetic_pool(cfg, 150, seed + 5_000_011)
        train_mark_judge(pool, paths["mark_judge"], judge_steps, seed=seed, progress=progress)
    extra = {"config": cfg.to_dict(), "train_seconds": train_s}
    _write_eval(
        model,
        judge,
        paths,
        cfg.combos("all"),
        cfg.heldout,
        ["shape", "colour"],
        cfg.values,
        guidances,
        eval_n,
        seed,
        samples_png,
        extra,
    )
    log.info(f"train_all done: {paths}")
    return paths


def train_folder(
    out_dir: str | os.PathLike,
    folder: str | os.PathLike,
    labels_file: str | os.PathLike,
    name: str = "folder",
    image_size: int = 16,
    steps: int = 20_000,
    time_budget_s: float | None = None,
    batch_size: int = 64,
    lr: float = 4e-4,
    judge_steps: int = 1500,
    eval_n: int = 16,
    guidances: tuple[float, ...] = (1.0, 2.0),
    seed: int = 0,
    progress: bool = True,
    checkpoint_every: int = 500,
    model_kwargs: dict | None = None,
    mark_fraction: float = 0.0,
) -> dict[str, str]:
    """A labelled image folder (any number of factors) -> FactorUNet -> judge -> evaluation.

    Held-out combinations come from the labels file (data/folder.read_labels). Writes in out_dir:
    <name>.json (where the data is: folder, labels, image size; FolderData), unet_<name>, judge_
    <name> (trained on the folder's images), <name>_eval.json (the judge's accuracy on samples of
    every seen and held-out combination) and <name>_samples.png (one row per combination, held-out
    ones marked *). Training resumes from its last checkpoint (train_diffusion, resume).
    mark_fraction: stamp an uncaptioned mark on this fraction of the images (seeded by `seed`,
    recorded in <name>.json) and train its detector, markjudge_<name>, on the unstamped images.
    """
    from ctrak_fast.models.shipped import FolderData

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(out, name)
    spec = FolderData(
        str(Path(folder).resolve()),
        str(Path(labels_file).resolve()),
        image_size,
        mark_fraction,
        seed,
    )
    ds = spec.dataset()
    spec.save_json(paths["config"])
    combos = sorted(set(ds.combos()) | set(ds.heldout))
    log.info(
        f"dataset: {len(ds)} images, factors {ds.factors}, {len(combos)} combinations, "
        f"held out {[combo_name(ds.factors, ds.values, c) for c in ds.heldout]}"
    )
    t0 = time.time()
    model = train_diffusion(
        ds,
        paths["unet"],
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        time_budget_s=time_budget_s,
        progress=progress,
        checkpoint_every=checkpoint_every,
        model_kwargs=model_kwargs,
    )
    train_s = round(time.time() - t0)
    judge = train_judge_on_data(ds, paths["judge"], steps=judge_steps, seed=seed, progress=progress)
    if mark_fraction:
        paths["mark_judge"] = str(out / f"markjudge_{name}.safetensors")
        clean = images_tensor(replace(spec, mark_fraction=0.0).dataset().images)
        train_mark_judge(clean, paths["mark_judge"], judge_steps, seed=seed, progress=progress)
    extra = {"data": spec.to_dict(), "train_seconds": train_s}
    _write_eval(
        model,
        judge,
        paths,
        combos,
        ds.heldout,
        ds.factors,
        ds.values,
        guidances,
        eval_n,
        seed,
        out / f"{name}_samples.png",
        extra,
    )
    log.info(f"train_folder done: {paths}")
    return paths
