"""Training: the FactorUNet diffusion model, the ConceptJudge, and generation evaluation.

    python -m ctrak_fast.bench.train --out ctrak_fast/assets --name shapes16 --time-budget 2400

writes <name>.json (the SyntheticConfig), unet_<name>.safetensors (EMA weights),
judge_<name>.safetensors, <name>_eval.json (judge accuracy per combination) and a sample grid PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrak_fast.bench.report import image_rows
from ctrak_fast.data import ConceptDataset, SyntheticConfig, make_dataset, render
from ctrak_fast.data.synthetic import paper_config
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.method.diffusion import NoiseSchedule, add_noise, ddim_sample
from ctrak_fast.models.factor_unet import ConceptJudge, FactorUNet, load_model, save_model
from ctrak_fast.models.shipped import ASSETS

__all__ = ["train_diffusion", "train_judge", "evaluate_generation", "sample_grid", "train_all"]


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
    images, labels = dataset.images, dataset.labels
    n = len(dataset)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        f"train_diffusion: N={n} params={n_params} steps={steps} batch={batch_size} lr={lr} "
        f"budget={time_budget_s}"
    )
    t0 = time.time()
    perm, pos = torch.randperm(n, generator=g), 0
    running, step = 0.0, 0
    for step in range(1, steps + 1):
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
    save_model(ema.weights(), out_path)
    Path(partial).unlink(missing_ok=True)
    el = time.time() - t0
    log.info(
        f"train_diffusion done: {step} steps in {el:.0f}s ({el / max(step, 1):.3f}s/step) "
        f"-> {out_path}"
    )
    return ema.weights()


def _judge_pool(
    cfg: SyntheticConfig, per_combo: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    combos = cfg.combos("all")
    x = torch.cat([render(s, c, per_combo, seed, cfg.image_size, cfg) for s, c in combos])
    y = torch.tensor(combos, dtype=torch.int64).repeat_interleave(per_combo, dim=0)
    return x, y


def train_judge(
    cfg: SyntheticConfig,
    out_path: str | os.PathLike,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    per_combo: int = 500,
    noise_aug: float = 0.1,
    progress: bool = True,
) -> ConceptJudge:
    """Train the ConceptJudge on fresh renders of *all* combinations (held-out ones included: it is
    an independent classifier). Small Gaussian pixel noise makes it robust to imperfect samples.
    Logs the accuracy on a separate render set; returns the judge in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    # Seeds far from the dataset's so the judge never sees the exact training images.
    x, y = _judge_pool(cfg, per_combo, seed + 7_000_001)
    xv, yv = _judge_pool(cfg, 64, seed + 9_000_011)
    judge = ConceptJudge(
        [len(cfg.shapes), len(cfg.colours)],
        factors=["shape", "colour"],
        values=cfg.values,
        image_size=cfg.image_size,
    ).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = x[idx]
        xb = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, xb.flip(-1), xb)
        xb = xb + noise_aug * torch.rand(len(idx), 1, 1, 1, generator=g) * torch.randn(
            xb.shape, generator=g
        )
        loss = sum(F.cross_entropy(lg, y[idx, f]) for f, lg in enumerate(judge(xb)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and step % 250 == 0:
            log.info(f"judge step {step}/{steps} loss {loss.item():.4f}")
    judge.eval()
    acc = (judge.predict(xv) == yv).float().mean(0).tolist()
    log.info(f"judge done in {time.time() - t0:.0f}s; validation accuracy per factor {acc}")
    save_model(judge, out_path)
    return judge


@torch.no_grad()
def evaluate_generation(
    model: FactorUNet,
    judge: ConceptJudge,
    combos: list[tuple[int, int]],
    n: int = 32,
    guidance: float = 2.0,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[tuple[int, int], dict[str, float]]:
    """Generate n images per combination (CFG against the all-null condition) and judge them.

    Returns {(shape_idx, colour_idx): {"acc": both factors right, "<factor>_acc": per factor}}.
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    cond = torch.tensor(combos, dtype=torch.int64).repeat_interleave(n, dim=0)
    x_T = torch.randn(len(cond), 3, model.image_size, model.image_size, generator=g)
    pred = torch.cat(
        [
            judge.predict(ddim_sample(model, c, guidance=guidance, steps=steps, x_T=xt)[0])
            for c, xt in zip(cond.split(batch_size), x_T.split(batch_size), strict=True)
        ]
    )
    names = judge.config["factors"]
    out = {}
    for i, combo in enumerate(combos):
        ok = pred[i * n : (i + 1) * n] == cond[i * n : (i + 1) * n]
        res = {"acc": ok.all(-1).float().mean().item()}
        res.update({f"{name}_acc": ok[:, f].float().mean().item() for f, name in enumerate(names)})
        out[tuple(combo)] = res
    return out


@torch.no_grad()
def sample_grid(
    model: FactorUNet,
    combos: list[tuple[int, int]],
    path: str | os.PathLike,
    n_per: int = 8,
    guidance: float = 2.0,
    seed: int = 0,
    labels: list[str] | None = None,
) -> None:
    """PNG with one row per combination, n_per samples each (row labels optional)."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.tensor(combos, dtype=torch.int64).repeat_interleave(n_per, dim=0)
    x, _ = ddim_sample(model, cond, guidance=guidance, generator=g)
    image_rows(list(x.split(n_per)), labels, path)


def evaluation_report(
    model: FactorUNet,
    judge: ConceptJudge,
    cfg: SyntheticConfig,
    guidances: tuple[float, ...] = (1.0, 2.0),
    eval_n: int = 32,
    seed: int = 0,
) -> dict:
    """Judge accuracy of the model's samples per combination and guidance (the <name>_eval.json
    that ships with a model), logged as it goes."""
    combos = cfg.combos("all")
    held = set(cfg.heldout)
    report: dict = {"config": cfg.to_dict(), "n_per_combo": eval_n, "results": {}}
    for w in guidances:
        res = evaluate_generation(model, judge, combos, n=eval_n, guidance=w, seed=seed)
        rows = {
            f"{cfg.shapes[s]}/{cfg.colours[c]}": {"heldout": (s, c) in held, **r}
            for (s, c), r in res.items()
        }
        seen_acc = float(np.mean([r["acc"] for k, r in res.items() if k not in held]))
        held_acc = (
            float(np.mean([r["acc"] for k, r in res.items() if k in held]))
            if held
            else float("nan")
        )
        report["results"][f"guidance_{w:g}"] = {
            "seen_mean_acc": seen_acc,
            "heldout_mean_acc": held_acc,
            "per_combo": rows,
        }
        log.info(f"guidance {w:g}: seen acc {seen_acc:.3f}, held-out acc {held_acc:.3f}")
        for k, r in rows.items():
            log.info(
                f"  {k:18s} {'HELD-OUT' if r['heldout'] else 'seen    '} acc {r['acc']:.3f} "
                f"shape {r['shape_acc']:.3f} colour {r['colour_acc']:.3f}"
            )
    return report


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
    """Dataset -> diffusion model -> judge -> evaluation; returns the written paths.

    Files in out_dir: <name>.json (SyntheticConfig; `make_dataset(SyntheticConfig.load_json(...))`
    regenerates the training set bit for bit), unet_<name>.safetensors, judge_<name>.safetensors,
    <name>_eval.json. The diffusion model goes first: it is what everything else waits for.
    schedule: NoiseSchedule config for a new model (default models.DEFAULT_SCHEDULE).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or SyntheticConfig(seed=seed)
    paths = {
        "config": str(out / f"{name}.json"),
        "unet": str(out / f"unet_{name}.safetensors"),
        "judge": str(out / f"judge_{name}.safetensors"),
        "eval": str(out / f"{name}_eval.json"),
    }
    cfg.save_json(paths["config"])
    ds = make_dataset(cfg)
    log.info(
        f"dataset: {len(ds)} images, "
        f"held out {[(cfg.shapes[s], cfg.colours[c]) for s, c in cfg.heldout]}"
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
    train_s = time.time() - t0
    judge = train_judge(cfg, paths["judge"], steps=judge_steps, seed=seed, progress=progress)
    report = evaluation_report(model, judge, cfg, guidances, eval_n, seed)
    report["train_seconds"] = round(train_s)
    atomic_write_text(paths["eval"], json.dumps(report, indent=2) + "\n")
    combos, held = cfg.combos("all"), set(cfg.heldout)
    if samples_png:
        labels = [
            f"{cfg.shapes[s]}/{cfg.colours[c]}{' *' if (s, c) in held else ''}" for s, c in combos
        ]
        sample_grid(model, combos, samples_png, guidance=guidances[0], seed=seed, labels=labels)
        paths["samples"] = str(samples_png)
    log.info(f"train_all done: {paths}")
    return paths


SCHEDULES = {
    "cosine": {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "max_beta": 0.05},
    "linear": {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
    },
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the synthetic-concept diffusion model and judge."
    )
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--name", default="shapes16")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--per-combo", type=int, default=250)
    p.add_argument("--n-heldout", type=int, default=2, help="Latin-square held-out pairs")
    p.add_argument(
        "--preset",
        choices=["shapes", "paper"],
        default="shapes",
        help="shapes: 4 shapes x 4 colours; paper: the paper's 2 x 2 (outlined triangle/circle, "
        "red/blue, red triangle held out)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds of diffusion training at most"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--judge-steps", type=int, default=1500)
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--samples", default=None, help="PNG path for a sample grid")
    p.add_argument("--init-from", default=None, help="continue from this FactorUNet checkpoint")
    p.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="cosine",
        help="noise schedule of a new model (ignored with --init-from)",
    )
    a = p.parse_args(argv)
    if a.preset == "paper":
        cfg = paper_config(per_combo=a.per_combo, image_size=a.image_size, seed=a.seed)
    else:
        cfg = SyntheticConfig(
            image_size=a.image_size, per_combo=a.per_combo, n_heldout=a.n_heldout, seed=a.seed
        )
    train_all(
        a.out,
        a.name,
        cfg,
        steps=a.steps,
        time_budget_s=a.time_budget,
        batch_size=a.batch_size,
        lr=a.lr,
        judge_steps=a.judge_steps,
        eval_n=a.eval_n,
        samples_png=a.samples,
        seed=a.seed,
        init_from=a.init_from,
        schedule=SCHEDULES[a.schedule],
    )


if __name__ == "__main__":
    main()
