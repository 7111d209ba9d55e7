"""Training the FactorUNet diffusion model: resumable, EMA weights, per-factor condition dropout.
assets.py turns it into a model with its judges and evaluation (`ctrak train`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctrak_fast.data import ConceptDataset
from ctrak_fast.method.diffusion import NoiseSchedule, add_noise
from ctrak_fast.models.factor_unet import FactorUNet, load_model, save_model
from ctrak_fast.train.state import load_state, save_state

__all__ = ["EMAWeights", "train_diffusion"]


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
    device: str | torch.device = "cpu",
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
        resume: every checkpoint also writes out_path + ".state" (state.py: model, EMA,
            optimiser, data order, random state); a run started with a state there continues
            from it (the same settings are required), so a killed run loses at most
            `checkpoint_every` steps. The state is removed when training ends.
        device: where the model trains; every random draw stays on the CPU generator, so a
            run's batches, noise and timesteps are the same on any device.
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
    model.to(device)
    ema = EMAWeights(model, ema_decay)
    sched = NoiseSchedule.from_config(model.config["schedule"])
    partial = f"{out_path}.partial"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    null = model.null_index.cpu()
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
        x_t = add_noise(x0, eps, t, sched).to(device)
        loss = F.mse_loss(model(x_t, t.to(device), cond.to(device)), eps.to(device))
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
