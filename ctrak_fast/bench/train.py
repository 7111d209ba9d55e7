"""Training the FactorUNet diffusion model (resumable), then its judge and evaluation
(bench/judge.py), on synthetic data (train_all) or a labelled image folder (train_folder).

    ctrak train --out ctrak_fast/assets --name shapes16 --time-budget 2400
    ctrak train --folder DIR --labels FILE --out OUT --name NAME

write <name>.json (where the data comes from), unet_<name>.safetensors (EMA weights),
judge_<name>.safetensors, <name>_eval.json (judge accuracy per combination) and a sample grid PNG.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctrak_fast.bench.judge import (
    combo_name,
    evaluation_report,
    sample_grid,
    train_judge,
    train_judge_on_data,
)
from ctrak_fast.bench.mark_judge import synthetic_pool, train_mark_judge
from ctrak_fast.bench.train_state import load_state, save_state
from ctrak_fast.data import ConceptDataset, SyntheticConfig, make_dataset
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.method.diffusion import NoiseSchedule, add_noise
from ctrak_fast.models.factor_unet import FactorUNet, load_model, save_model

__all__ = ["SCHEDULES", "EMAWeights", "train_all", "train_diffusion", "train_folder"]


log = logging.getLogger(__name__)


class EMAWeights:
    """diffusers' EMAModel over a model's parameters, with its warm-up decay
    min(decay, (1 + s) / (10 + s)) at training step s = 1, 2, ...; `weights()` is a copy of the
    model (eval mode) holding the averaged parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(model.parameters(), decay=decay)
        self.ema.optimization_step = 1  # EMAModel's step s uses (1 + s - 1) / (10 + s - 1)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        self.ema.step(model.parameters())

    def weights(self) -> nn.Module:
        self.ema.copy_to(self.model.parameters())
        return self.model


def train_diffusion(
    dataset: ConceptDataset,
    out_path: str | os.PathLike,
    steps: int = 10_000,
    batch_size: int = 64,
    lr: float = 4e-4,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.1,
    null_dropout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    model_kwargs: dict | None = None,
    checkpoint_every: int = 1000,
    log_every: int = 200,
    warmup: int = 200,
    time_budget_s: float | None = None,
    hflip: bool = False,
    init_from: str | os.PathLike | None = None,
    resume: bool = True,
) -> FactorUNet:
    """DDPM epsilon-prediction training of a FactorUNet on `dataset`; returns the EMA model (eval).

    Args:
        dataset: ConceptDataset (images [N,3,S,S] in [-1,1], labels [N,F]).
        out_path: final EMA weights (safetensors), written atomically once training ends, so a
            model already at out_path (and in use) is only replaced by a finished one.
            Every `checkpoint_every` steps the EMA goes to out_path + ".partial" (atomic, removed
            at the end): a killed run leaves a usable model there.
        cond_dropout: each factor is independently replaced by its null token with this
            probability: trains the "factor removed" condition of concept queries.
        null_dropout: every factor at once is replaced by its null token with this probability:
            trains the unconditional model of classifier-free guidance (per-factor dropout alone
            shows it in 0.1² = 1% of the samples).
        time_budget_s: stop early when the wall time reaches it; the learning-rate decay follows
            progress = max(step / steps, elapsed / budget), so a budget-limited run still anneals.
        hflip: random horizontal flips; only for data whose labels survive mirroring (true of
            the synthetic shapes, whose rotation range is symmetric; train_all turns it on).
        init_from: continue from a saved FactorUNet (its config overrides model_kwargs); the
            optimiser starts fresh, the EMA starts from the loaded weights.
        resume: every checkpoint also writes out_path + ".state" (train_state.py: model, EMA,
            optimiser, data order, random state); a run started with a state there continues
            from it (the same settings are required), so a killed run loses at most
            `checkpoint_every` steps. The state is removed when training ends.
    Learning rate: linear warm-up, constant, then linear decay to 10% over the last 30% of progress.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    kw = {"image_size": dataset.image_size, "factors": dataset.factors, "values": dataset.values}
    kw.update(model_kwargs or {})
    if init_from is not None:
        model = load_model(init_from).train()
        if model.n_values != dataset.n_values:
            raise ValueError(
                f"{init_from}: n_values {model.n_values} != dataset {dataset.n_values}"
            )
    else:
        model = FactorUNet(dataset.n_values, **kw).train()
    ema = EMAWeights(model, ema_decay)
    sched = NoiseSchedule.from_config(model.config["schedule"])
    partial = f"{out_path}.partial"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    null = model.null_index
    # the model learns what it is told: the captions (null tokens where a caption is missing)
    images, labels = dataset.images, dataset.captions
    n = len(dataset)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"train_diffusion: N={n} params={n_params} steps={steps} batch={batch_size} lr={lr} "
        f"budget={time_budget_s}"
    )
    t0 = time.time()
    perm, pos = torch.randperm(n, generator=g), 0
    running, step, start = 0.0, 0, 1
    state = f"{out_path}.state"
    run = {
        "n": n,
        "n_values": dataset.n_values,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "budget": time_budget_s,
        "params": n_params,
    }
    if resume and Path(state).exists():
        perm, scalars = load_state(state, model, opt, ema.ema.shadow_params, g, run)
        start, pos, running = scalars["step"] + 1, scalars["pos"], scalars["running"]
        ema.ema.optimization_step = scalars["ema_step"]
        t0 -= scalars["elapsed"]  # the budget counts the time before the kill too
        log.info(f"resumed from {state} at step {scalars['step']}")
    for step in range(start, steps + 1):
        elapsed = time.time() - t0
        frac = max(step / steps, elapsed / time_budget_s if time_budget_s else 0.0)
        if frac > 1.0:
            log.info(f"time budget reached at step {step - 1}")
            step -= 1
            break
        lr_now = (
            lr * min(1.0, step / warmup) * (1.0 if frac < 0.7 else 1.0 - 0.9 * (frac - 0.7) / 0.3)
        )
        for group in opt.param_groups:
            group["lr"] = lr_now
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x0, cond = images[idx], labels[idx].clone()
        if hflip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        drop = torch.rand(cond.shape, generator=g) < cond_dropout
        drop |= (torch.rand(len(idx), generator=g) < null_dropout)[:, None]
        cond = torch.where(drop, null.expand_as(cond), cond)
        t = torch.randint(0, sched.num_train_timesteps, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(add_noise(x0, eps, t, sched), t, cond), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)  # warm-up: early weights are averaged over a shorter horizon
        running += loss.item()
        if progress and step % log_every == 0:
            el = time.time() - t0
            log.info(
                f"step {step}/{steps} loss {running / log_every:.4f} lr {lr_now:.2e} "
                f"{el / step:.3f}s/step elapsed {el:.0f}s"
            )
            running = 0.0
        if checkpoint_every and step % checkpoint_every == 0:
            save_model(ema.weights(), partial)
            scalars = {
                "step": step,
                "pos": pos,
                "running": running,
                "elapsed": time.time() - t0,
                "ema_step": ema.ema.optimization_step,
            }
            save_state(state, model, opt, ema.ema.shadow_params, g, perm, scalars, run)
    save_model(ema.weights(), out_path)
    Path(partial).unlink(missing_ok=True)
    Path(state).unlink(missing_ok=True)
    el = time.time() - t0
    log.info(
        f"train_diffusion done: {step} steps in {el:.0f}s ({el / max(step, 1):.3f}s/step) "
        f"-> {out_path}"
    )
    return ema.weights()


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
) -> dict[str, str]:
    """A labelled image folder (any number of factors) -> FactorUNet -> judge -> evaluation.

    Held-out combinations come from the labels file (data/folder.read_labels). Writes in out_dir:
    <name>.json (where the data is: folder, labels, image size; FolderData), unet_<name>, judge_
    <name> (trained on the folder's images), <name>_eval.json (the judge's accuracy on samples of
    every seen and held-out combination) and <name>_samples.png (one row per combination, held-out
    ones marked *). Training resumes from its last checkpoint (train_diffusion, resume).
    """
    from ctrak_fast.models.shipped import FolderData

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _paths(out, name)
    spec = FolderData(str(Path(folder).resolve()), str(Path(labels_file).resolve()), image_size)
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
