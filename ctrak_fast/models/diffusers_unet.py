"""What every adapter of a diffusers UNet shares: the training schedule of its scheduler, its
sample size, the prediction type turned into eps, and the identity that scales gradients (float16
loss scaling)."""

from __future__ import annotations

from typing import Any

import torch

from ctrak_fast.method import diffusion

__all__ = [
    "PREDICTION_TYPES",
    "GradScale",
    "check_prediction_type",
    "sample_size",
    "schedule_from_scheduler",
    "to_eps",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def schedule_from_scheduler(scheduler: Any) -> diffusion.NoiseSchedule:
    """The DDPM training schedule of any diffusers scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver,
    ...): they all carry num_train_timesteps / beta_schedule / beta_start / beta_end in `config`."""
    cfg = dict(scheduler.config)
    if cfg.get("trained_betas") is not None:
        raise ValueError("schedulers with trained_betas are not supported")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("zero-terminal-SNR schedules are not supported (alpha_bar_T = 0)")
    return diffusion.NoiseSchedule(
        num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        beta_schedule=cfg.get("beta_schedule", "linear"),
        beta_start=cfg.get("beta_start", 1e-4),
        beta_end=cfg.get("beta_end", 0.02),
    )


def sample_size(unet: Any) -> int:
    """H = W of the UNet's input (a square sample_size only)."""
    s = unet.config.sample_size
    if isinstance(s, (tuple, list)):
        if s[0] != s[1]:
            raise ValueError(f"non-square sample_size {s} is not supported")
        s = s[0]
    return int(s)


def check_prediction_type(scheduler: Any) -> str:
    """The scheduler's prediction type, one that to_eps converts."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return str(kind)


def to_eps(
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: diffusion.Schedule,
    prediction_type: str,
) -> torch.Tensor:
    """The UNet's output [B,C,h,w] of `prediction_type` as eps (the engine's parametrisation
    on a DDPM schedule)."""
    if prediction_type == "epsilon":
        return out
    if not isinstance(schedule, diffusion.NoiseSchedule):
        raise TypeError(f"{prediction_type} outputs convert to eps on a DDPM noise schedule only")
    ab = schedule.alpha_bar(t, x_t)
    if prediction_type == "v_prediction":
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t
    return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()  # "sample": out is x0


class GradScale(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` (vmap-compatible)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.scale, None
