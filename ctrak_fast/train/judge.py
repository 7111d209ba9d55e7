"""The ConceptJudge: an independent classifier of every factor, which confirms generated query
images and grades a model's samples (its accuracy per combination is a model's <name>_eval.json).

Trained on fresh renders of all combinations for synthetic data (train_judge), or on a labelled
folder's own images (train_judge_on_data): a folder has no images of its held-out combinations,
but each factor is classified on its own, so the judge still reads their values.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ctrak_fast.data import ConceptDataset, SyntheticConfig, render
from ctrak_fast.figures import image_rows
from ctrak_fast.method.diffusion import ddim_sample
from ctrak_fast.models.factor_unet import ConceptJudge, FactorUNet, save_model

log = logging.getLogger(__name__)


def _render_pool(cfg: SyntheticConfig, per_combo: int, seed: int):
    combos = cfg.combos("all")
    x = torch.cat([render(s, c, per_combo, seed, cfg.image_size, cfg) for s, c in combos])
    y = torch.tensor(combos, dtype=torch.int64).repeat_interleave(per_combo, dim=0)
    return x, y


def train_steps(net: torch.nn.Module, batch_loss, steps: int, lr: float, what: str, progress):
    """AdamW (weight decay 1e-4) with a cosine learning rate over `steps`; batch_loss() -> the
    loss of a fresh batch. Logs every 250 steps."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and step % 250 == 0:
            log.info(f"{what} step {step}/{steps} loss {loss.item():.4f}")


def pixel_noise(x: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """x [B,...] plus Gaussian pixel noise of a random strength in [0, scale) per image: judges
    robust to imperfect samples."""
    strength = scale * torch.rand(len(x), *([1] * (x.dim() - 1)), generator=g)
    return x + strength * torch.randn(x.shape, generator=g)


def fit_judge(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    factors: list[str],
    values: dict[str, list[str]],
    out_path: str | os.PathLike,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    noise_aug: float = 0.1,
    hflip: bool = True,
    progress: bool = True,
) -> ConceptJudge:
    """Train a ConceptJudge on images x [N, 3, S, S] with labels y [N, F]; small Gaussian pixel
    noise makes it robust to imperfect samples. Logs the accuracy per factor on `val`, saves the
    judge to out_path and returns it in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = train
    judge = ConceptJudge(
        [len(values[f]) for f in factors], factors=factors, values=values, image_size=x.shape[-1]
    ).train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = x[idx]
        if hflip:
            xb = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, xb.flip(-1), xb)
        xb = pixel_noise(xb, noise_aug, g)
        return sum(F.cross_entropy(lg, y[idx, f]) for f, lg in enumerate(judge(xb)))

    t0 = time.time()
    train_steps(judge, batch_loss, steps, lr, "judge", progress)
    judge.eval()
    acc = (judge.predict(val[0]) == val[1]).float().mean(0).tolist()
    log.info(f"judge done in {time.time() - t0:.0f}s; validation accuracy per factor {acc}")
    judge.validation_accuracy = dict(zip(factors, acc, strict=True))
    save_model(judge, out_path)
    return judge


def train_judge(
    cfg: SyntheticConfig,
    out_path: str | os.PathLike,
    steps: int = 1500,
    seed: int = 0,
    per_combo: int = 500,
    progress: bool = True,
    **kw,
) -> ConceptJudge:
    """The judge of synthetic data: fresh renders of *all* combinations (held-out ones included:
    it is an independent classifier), seeds far from the dataset's so it never sees the exact
    training images."""
    train = _render_pool(cfg, per_combo, seed + 7_000_001)
    val = _render_pool(cfg, 64, seed + 9_000_011)
    factors = ["shape", "colour"]
    return fit_judge(
        train, val, factors, cfg.values, out_path, steps, seed=seed, progress=progress, **kw
    )


def train_judge_on_data(
    data: ConceptDataset,
    out_path: str | os.PathLike,
    steps: int = 1500,
    seed: int = 0,
    val_fraction: float = 0.1,
    hflip: bool = False,
    progress: bool = True,
    **kw,
) -> ConceptJudge:
    """The judge of a labelled folder: its own images, a random `val_fraction` held back to
    measure it (no flips by default: a folder's labels may not survive mirroring). Images with an
    unknown value (no caption, no truth) are left out."""
    data = data.subset(data.known)
    g = torch.Generator().manual_seed(seed + 13)
    order = torch.randperm(len(data), generator=g)
    n_val = max(1, int(len(data) * val_fraction)) if len(data) > 1 else 0
    val_i, train_i = order[:n_val], order[n_val:]
    train = data.images[train_i], data.labels[train_i]
    val = (data.images[val_i], data.labels[val_i]) if n_val else train
    return fit_judge(
        train,
        val,
        list(data.factors),
        data.values,
        out_path,
        steps,
        seed=seed,
        hflip=hflip,
        progress=progress,
        **kw,
    )


@torch.no_grad()
def evaluate_generation(
    model: FactorUNet,
    judge: ConceptJudge,
    combos: list[tuple[int, ...]],
    n: int = 32,
    guidance: float = 2.0,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[tuple[int, ...], dict[str, float]]:
    """Generate n images per combination (CFG against the all-null condition) and judge them.

    Returns {combo: {"acc": every factor right, "<factor>_acc": per factor}}.
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
    combos: list[tuple[int, ...]],
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


def combo_name(factors: list[str], values: dict[str, list[str]], combo) -> str:
    """'circle/red' for a combination of value indices."""
    return "/".join(values[f][int(v)] for f, v in zip(factors, combo, strict=True))


def evaluation_report(
    model: FactorUNet,
    judge: ConceptJudge,
    combos: list[tuple[int, ...]],
    heldout: list[tuple[int, ...]],
    factors: list[str],
    values: dict[str, list[str]],
    guidances: tuple[float, ...] = (1.0, 2.0),
    eval_n: int = 32,
    seed: int = 0,
    extra: dict | None = None,
) -> dict:
    """Judge accuracy of the model's samples per combination and guidance (the <name>_eval.json
    that ships with a model), logged as it goes."""
    held = set(map(tuple, heldout))
    report: dict = {**(extra or {}), "n_per_combo": eval_n, "results": {}}
    for w in guidances:
        res = evaluate_generation(model, judge, combos, n=eval_n, guidance=w, seed=seed)
        rows = {combo_name(factors, values, c): {"heldout": c in held, **r} for c, r in res.items()}
        seen = [r["acc"] for c, r in res.items() if c not in held]
        held_acc = [r["acc"] for c, r in res.items() if c in held]
        seen_acc = float(np.mean(seen)) if seen else float("nan")
        held_mean = float(np.mean(held_acc)) if held_acc else float("nan")
        report["results"][f"guidance_{w:g}"] = {
            "seen_mean_acc": seen_acc,
            "heldout_mean_acc": held_mean,
            "per_combo": rows,
        }
        log.info(f"guidance {w:g}: seen acc {seen_acc:.3f}, held-out acc {held_mean:.3f}")
        for k, r in rows.items():
            per = " ".join(f"{f} {r[f'{f}_acc']:.3f}" for f in factors)
            log.info(
                f"  {k:18s} {'HELD-OUT' if r['heldout'] else 'seen    '} acc {r['acc']:.3f} {per}"
            )
    return report


__all__ = [
    "combo_name",
    "evaluate_generation",
    "evaluation_report",
    "fit_judge",
    "sample_grid",
    "train_judge",
    "train_judge_on_data",
]
