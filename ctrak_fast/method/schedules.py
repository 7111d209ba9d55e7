"""Training schedules: how x_t is made from (x0, noise) at an integer timestep, what the model
predicts there, and the deterministic step between two timesteps (DDIM / the Euler flow ODE).

A model kind declares its schedule, and with it the objective it was trained with; the method
(losses, inversion, sampling, the slider) asks the schedule and never the model kind:

| schedule        | x_t                              | model output (`prediction`) | target       |
|-----------------|----------------------------------|-----------------------------|--------------|
| NoiseSchedule   | sqrt(ab_t) x0 + sqrt(1 - ab_t) e | "eps": e                    | noise        |
| FlowSchedule    | (1 - s_t) x0 + s_t e             | "velocity": v = e - x0      | noise - x0   |

Both write x_t = a_t x0 + b_t e, and the deterministic step t -> t' of either is
x_t' = a_t' x0_hat + b_t' e_hat with (x0_hat, e_hat) split from the model's output at t: DDIM for
the noise schedule, and for the flow exactly the Euler step x_t' = x_t + (s_t' - s_t) v of the
flow ODE dx/ds = v. Timesteps are integers 0..T-1 on both (t = -1: the clean image), so the
method's timestep grids (99..899, the DDIM grid) serve both.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

__all__ = ["FlowSchedule", "NoiseSchedule", "Schedule", "schedule_from_config"]


class Schedule(ABC):
    """What the method asks of a training schedule (see the module docstring).

    Attributes: num_train_timesteps T; prediction ("eps" | "velocity"), what the model returns;
    config, a JSON-able dict that `schedule_from_config` turns back into the schedule."""

    num_train_timesteps: int
    prediction: str
    config: dict[str, Any]

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Any) -> torch.Tensor:
        """x_t of x0 and noise [B,C,H,W] at t (int or int64 [B])."""

    @abstractmethod
    def target(self, x0: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
        """What the model output regresses onto at x_t = add_noise(x0, noise, t)."""

    @abstractmethod
    def split(
        self, x_t: torch.Tensor, out: torch.Tensor, t: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) of the model's output `out` at (x_t, t); differentiable."""

    @abstractmethod
    def eps_given_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: Any) -> torch.Tensor:
        """The noise that x_t implies for a given x0 (a sampler that clamps x0 goes on with it)."""

    @abstractmethod
    def move(
        self, x0: torch.Tensor, eps: torch.Tensor, t: Any, fresh_std: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        """x at t from (x0, eps), the eps share lowered so that adding `fresh_std` * fresh
        noise keeps x_t's noise level (0: the deterministic DDIM / Euler step)."""

    @abstractmethod
    def fresh_std(self, t_from: int, t_to: int, eta: float, like: torch.Tensor) -> torch.Tensor:
        """Std of the fresh noise of a stochastic step t_from -> t_to (either direction) at eta,
        in the coordinates of x at t_to (DDIM's sigma_t)."""


class NoiseSchedule(Schedule):
    """DDPM noise schedule, eps prediction; alphas_cumprod float64 [T].

    Args:
        beta_schedule: "squaredcos_cap_v2" (default) | "linear" | "scaled_linear"; the linear
            ones come from diffusers' DDPMScheduler(beta_start, beta_end).
        max_beta: cap on the cosine betas (diffusers' betas_for_alpha_bar). diffusers' default
            0.999 leaves alpha_bar_999 ~ 2e-9, so the first DDIM step multiplies eps errors by
            ~600; 0.05 gives alpha_bar_999 = 5e-4 and the same curve below t ~ 930.

    Why cosine: with DDPM's linear betas on 16x16 images alpha_bar < 0.01 from t ~ 650 on, so
    the steps that decide colour and layout carry almost no eps-loss signal (a trained model's
    colour conditioning changed the loss by < 0.0003 there and samples mixed colours), and the
    method's timesteps 699..899 would be nearly pure noise.
    """

    prediction = "eps"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        max_beta: float = 0.05,
    ):
        self.config = {
            "num_train_timesteps": int(num_train_timesteps),
            "beta_schedule": beta_schedule,
            "beta_start": float(beta_start),
            "beta_end": float(beta_end),
            "max_beta": float(max_beta),
        }
        self.num_train_timesteps = int(num_train_timesteps)
        if beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(self.num_train_timesteps, max_beta=max_beta)
        else:
            betas = DDPMScheduler(  # type: ignore[no-untyped-call]
                num_train_timesteps=self.num_train_timesteps,
                beta_schedule=beta_schedule,
                beta_start=beta_start,
                beta_end=beta_end,
            ).betas  # type: ignore[attr-defined]
        self.betas = betas.double()
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float64 [T]

    @classmethod
    def from_config(cls, config: dict | None) -> NoiseSchedule:  # type: ignore[type-arg]
        return cls(**(config or {}))

    @classmethod
    def for_model(cls, model: Any) -> Schedule:
        """The schedule stored in a model's config (default schedule for other models)."""
        return schedule_from_config(getattr(model, "config", {}).get("schedule"))

    def alpha_bar(self, t: Any, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t as float32 on like's device, shaped [B,1,1,1] to broadcast over like [B,...].
        t: int, 0-dim or [B] int64; t == -1 means the clean image (alpha_bar = 1)."""
        t = torch.as_tensor(t, dtype=torch.int64)
        ab = torch.where(
            t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64)
        )
        ab = ab.to(device=like.device, dtype=like.dtype)
        return ab.reshape(-1, *([1] * (like.ndim - 1))) if ab.ndim else ab

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Any) -> torch.Tensor:
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def target(self, x0: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def split(
        self, x_t: torch.Tensor, out: torch.Tensor, t: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar(t, x_t)  # Tweedie: x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
        return (x_t - (1.0 - ab).sqrt() * out) / ab.sqrt(), out

    def eps_given_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: Any) -> torch.Tensor:
        ab = self.alpha_bar(t, x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def move(
        self, x0: torch.Tensor, eps: torch.Tensor, t: Any, fresh_std: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab - fresh_std**2).clamp(min=0).sqrt() * eps

    def fresh_std(self, t_from: int, t_to: int, eta: float, like: torch.Tensor) -> torch.Tensor:
        t_lo, t_hi = sorted((t_from, t_to))
        ab_lo, ab_hi = self.alpha_bar(t_lo, like), self.alpha_bar(t_hi, like)
        return eta * ((1 - ab_lo) / (1 - ab_hi) * (1 - ab_hi / ab_lo)).sqrt()


class FlowSchedule(Schedule):
    """Rectified-flow schedule (SD3's FlowMatchEulerDiscreteScheduler), velocity prediction.

    sigma_t = shift * s / (1 + (shift - 1) * s) with s = (t + 1) / T, t = 0..T-1 (the scheduler's
    training sigmas; sigma_{T-1} = 1 is pure noise, t = -1 the clean image); x_t = (1 - sigma_t)
    x0 + sigma_t noise, and the model predicts v = noise - x0, the velocity of the flow ODE
    dx/dsigma = v. The network reads the timestep sigma_t * T (`model_time`).

    Examples:
        >>> sch = FlowSchedule(1000, shift=1.0)
        >>> round(float(sch.sigma(499, torch.zeros(1))), 3), float(sch.sigma(-1, torch.zeros(1)))
        (0.5, 0.0)
    """

    prediction = "velocity"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"a flow schedule's shift must be positive, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.config = {"kind": "flow", "num_train_timesteps": self.num_train_timesteps}
        self.config["shift"] = float(shift)
        s = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64)
        s = s / self.num_train_timesteps
        self.sigmas = shift * s / (1 + (shift - 1) * s)  # float64 [T], ascending to 1

    def sigma(self, t: Any, like: torch.Tensor) -> torch.Tensor:
        """sigma_t as like's dtype/device, [B,1,1,1] for t [B] (t == -1: 0, the clean image)."""
        t = torch.as_tensor(t, dtype=torch.int64).cpu()  # the table lives on the CPU
        s = torch.where(t >= 0, self.sigmas[t.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        s = s.to(device=like.device, dtype=like.dtype)
        return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network's embedding reads: sigma_t * T, float32 [B]."""
        return (self.sigmas[t.cpu().clamp(min=0)] * self.num_train_timesteps).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Any) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
        if x0 is None:
            raise ValueError("the flow-matching target noise - x0 needs the clean image x0")
        return noise - x0

    def split(
        self, x_t: torch.Tensor, out: torch.Tensor, t: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t, x_t)  # x0 = x_t - sigma v, eps = x_t + (1 - sigma) v
        return x_t - s * out, x_t + (1 - s) * out

    def eps_given_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: Any) -> torch.Tensor:
        s = self.sigma(t, x_t)
        return (x_t - (1 - s) * x0) / s

    def move(
        self, x0: torch.Tensor, eps: torch.Tensor, t: Any, fresh_std: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + (s * s - fresh_std**2).clamp(min=0).sqrt() * eps

    def fresh_std(self, t_from: int, t_to: int, eta: float, like: torch.Tensor) -> torch.Tensor:
        # DDIM's sigma_t in the variance-preserving coordinates of equal signal-to-noise ratio
        # (ab = a^2 / (a^2 + b^2)), scaled back by the flow's norm sqrt(a^2 + b^2) at t_to.
        def vp(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            s = self.sigma(t, like)
            norm2 = (1 - s) ** 2 + s**2
            return (1 - s) ** 2 / norm2, norm2

        (ab_lo, _), (ab_hi, _) = vp(min(t_from, t_to)), vp(max(t_from, t_to))
        norm2_to = vp(t_to)[1]
        return eta * ((1 - ab_lo) / (1 - ab_hi) * (1 - ab_hi / ab_lo) * norm2_to).sqrt()


def schedule_from_config(config: dict[str, Any] | None) -> Schedule:
    """The schedule of a config dict (a Schedule's `config`; None: the default NoiseSchedule)."""
    config = dict(config or {})
    if config.pop("kind", None) == "flow":
        return FlowSchedule(**config)
    return NoiseSchedule(**config)
