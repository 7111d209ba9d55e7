"""DDIM sampling and DDIM inversion with classifier-free guidance, on any training schedule
(method/schedules.py: the DDPM noise schedule, or a flow, where the same loops are the Euler
steps of the flow ODE).

Timestep grid: with `steps` S (S must divide 1000) the grid is t_i = i * (1000 / S) - 1 for
i = S, ..., 1, i.e. for S = 50: 999, 979, ..., 39, 19. It contains 99, 199, ..., 899 (the method's
default timesteps) for S in {10, 20, 25, 50, 100, ...}; `record_timesteps` must lie on the grid.
The last DDIM step goes from t = 19 to the clean image (alpha_bar = 1).

CFG: eps = eps(neg) + guidance * (eps(cond) - eps(neg)); neg defaults to every factor null. With
guidance == 1 only eps(cond) is evaluated.

Inversion evaluates the model at the *target* timestep on the current (less noisy) latent, as in
null-text inversion (Mokady et al. 2023): eps(x_{t_prev}, t) ~ eps(x_t, t).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ctrak_fast.method.schedules import FlowSchedule, NoiseSchedule, Schedule

__all__ = [
    "FlowSchedule",
    "NoiseSchedule",
    "Schedule",
    "ddim_timesteps",
    "add_noise",
    "tweedie_x0",
    "guided_eps",
    "ddim_sample",
    "ddim_invert",
    "ddim_invert_stochastic",
]


def _schedule(model, schedule: Schedule | None) -> Schedule:
    return schedule if schedule is not None else NoiseSchedule.for_model(model)


def ddim_timesteps(steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """Descending DDIM grid [t_S, ..., t_1] with t_i = i * (T / S) - 1 (see module docstring)."""
    if steps < 1 or num_train_timesteps % steps:
        raise ValueError(f"steps must divide {num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [i * stride - 1 for i in range(steps, 0, -1)]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
    """x_t of x0 and noise eps [B,C,H,W] at t (int or int64 [B]): sqrt(ab_t) x0 + sqrt(1 - ab_t)
    eps, or (1 - sigma_t) x0 + sigma_t eps for a flow schedule."""
    return schedule.add_noise(x0, eps, t)


def tweedie_x0(x_t: torch.Tensor, out: torch.Tensor, t, schedule: Schedule) -> torch.Tensor:
    """x0_hat of the model's output at (x_t, t): (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    (Tweedie), or x_t - sigma_t v for a flow. Differentiable in x_t and out (the DPS loss
    backpropagates through it)."""
    return schedule.split(x_t, out, t)[0]


def guided_eps(
    model, x_t: torch.Tensor, t: int, cond, neg_cond=None, guidance: float = 1.0
) -> torch.Tensor:
    """CFG eps(neg) + g * (eps(cond) - eps(neg)) in one batched forward; x_t, result [B,C,H,W]."""
    b = x_t.shape[0]
    tt = torch.full((b,), int(t), dtype=torch.int64, device=x_t.device)
    if guidance == 1.0:  # eps(neg) cancels exactly; skip its forward
        return model(x_t, tt, cond)
    if neg_cond is None:
        neg_cond = model.null_cond(b, device=x_t.device)
    neg_cond = neg_cond.expand(b, *neg_cond.shape[1:]) if neg_cond.shape[0] == 1 else neg_cond
    both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([cond, neg_cond]))
    e_c, e_n = both.chunk(2)
    return e_n + guidance * (e_c - e_n)


def _check_record(record_timesteps: Iterable[int] | None, grid: list[int]) -> set[int]:
    rec = {int(t) for t in (record_timesteps or ())}
    off = sorted(rec - set(grid))
    if off:
        raise ValueError(
            f"record_timesteps {off} are not on the DDIM grid {grid[::-1][:3]}...{grid[0]}"
        )
    return rec


def _expand_cond(cond: torch.Tensor, b: int) -> torch.Tensor:
    """Factor indices [F] / [1, F] / [B, F] (made int64), or float embeddings [1, ...] / [B, ...]
    (e.g. text hidden states [B, L, D]; kept as they are), -> batch b."""
    cond = torch.as_tensor(cond)
    if not cond.is_floating_point():
        cond = cond.to(torch.int64)
        if cond.ndim == 1:
            cond = cond[None]
    return cond.expand(b, *cond.shape[1:]) if cond.shape[0] == 1 else cond


@torch.no_grad()
def ddim_sample(
    model,
    cond: torch.Tensor,
    neg_cond: torch.Tensor | None = None,
    guidance: float = 1.0,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    record_timesteps: Iterable[int] | None = None,
    schedule: Schedule | None = None,
    progress: bool = False,
    stop_at: int | None = None,
    clip_x0: bool = True,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DDIM sampling with CFG.

    Args:
        cond: int64 [B, F] (or [F] / [1, F] broadcast to x_T's batch).
        neg_cond: int64 [B, F] / [1, F]; None -> all-null when guidance != 1.
        eta: 0 deterministic DDIM; > 0 adds DDIM's sigma_t noise (drawn from `generator`).
        x_T: [B, C, H, W] start noise; None -> drawn from `generator`.
        record_timesteps: grid timesteps t whose x_t (state *before* denoising at t) is returned.
        stop_at: optional grid timestep; return as soon as x_{stop_at} is reached (x0 is then the
            Tweedie estimate at that point), for query draws that only need the trajectory.
        clip_x0: clamp each step's x0 estimate to [-1, 1] and continue with the eps it implies
            (diffusers' clip_sample with use_clipped_model_output; keeps the first, near-pure-noise
            steps from overshooting). False gives the exact DDIM ODE (inverse of `ddim_invert`).

    Returns: (x0 float32 [B, C, H, W] (not clamped), {t: x_t [B, C, H, W]} for the recorded t).

    Examples:
        >>> x0, traj = ddim_sample(model, cond, guidance=2.0, record_timesteps=[99, 499])
    """
    sch = _schedule(model, schedule)
    grid = ddim_timesteps(steps, sch.num_train_timesteps)
    rec = _check_record(record_timesteps, grid)
    if stop_at is not None and stop_at not in grid:
        raise ValueError(f"stop_at {stop_at} not on the grid")
    device = next(model.parameters()).device
    if x_T is None:
        b = _expand_cond(cond, 1).shape[0]
        cfg = model.config
        shape = (b, cfg.get("in_channels", 3), cfg["image_size"], cfg["image_size"])
        x_T = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    x = x_T.to(device=device, dtype=torch.float32)
    b = x.shape[0]
    cond = _expand_cond(cond, b).to(device)
    neg_cond = None if neg_cond is None else _expand_cond(neg_cond, b).to(device)
    traj: dict[int, torch.Tensor] = {}
    x0 = x
    for i, t in enumerate(tqdm(grid, disable=not progress, desc="ddim", leave=False)):
        if t in rec:
            traj[t] = x.clone()
        out = guided_eps(model, x, t, cond, neg_cond, guidance)
        x0, eps = sch.split(x, out, t)
        if clip_x0:
            # The step must use the eps that the clamped x0 implies (diffusers'
            # use_clipped_model_output): mixing the clamped x0 with the raw eps breaks CFG samples.
            x0 = x0.clamp(-1.0, 1.0)
            eps = sch.eps_given_x0(x, x0, t)
        if stop_at is not None and t == stop_at:
            return x0, traj
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        sigma = sch.fresh_std(t, t_prev, eta, x) if eta > 0 else 0.0
        x = sch.move(x0, eps, t_prev, sigma)  # DDIM; for a flow the Euler step of its ODE
        if eta > 0 and t_prev >= 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device)
            x = x + sigma * noise
    return x, traj


INVERSION_EPS = ("next", "current")


@torch.no_grad()
def ddim_invert(
    model,
    x0: torch.Tensor,
    cond: torch.Tensor,
    neg_cond: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    guidance: float = 1.0,
    steps: int = 50,
    record_timesteps: Iterable[int] | None = None,
    schedule: Schedule | None = None,
    progress: bool = False,
    eps_at: str = "next",
) -> dict[int, torch.Tensor]:
    """Deterministic DDIM inversion (eta = 0) with CFG on the same grid as `ddim_sample`.

    Args:
        x0: float32 [B, C, H, W] in [-1, 1]; cond / neg_cond as in ddim_sample.
        record_timesteps: grid timesteps to return (None -> only the final t = grid max).
        eps_at: "next": the step t_i -> t_{i+1} evaluates eps(x_{t_i}, t_{i+1}) (ours);
            "current": eps(x_{t_i}, t_i), as the authors' code does.
    Returns: {t: x_t [B, C, H, W]}; stops after the largest requested timestep.

    Examples:
        >>> traj = ddim_invert(model, x0, labels, guidance=7.5, record_timesteps=T)
    """
    return ddim_invert_stochastic(
        model, x0, cond, neg_cond, guidance, steps, record_timesteps, 0.0, None, schedule,
        progress, eps_at,
    )  # fmt: skip


@torch.no_grad()
def ddim_invert_stochastic(
    model,
    x0: torch.Tensor,
    cond: torch.Tensor,
    neg_cond: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    guidance: float = 1.0,
    steps: int = 50,
    record_timesteps: Iterable[int] | None = None,
    eta: float = 0.1,
    generator: torch.Generator | None = None,
    schedule: Schedule | None = None,
    progress: bool = False,
    eps_at: str = "next",
) -> dict[int, torch.Tensor]:
    """Stochastic DDIM inversion (local query draws, METHOD.md §5): as `ddim_invert`, but each
    step also injects fresh noise of std sigma_t(eta), so repeated calls give different x_t
    around the deterministic trajectory (eta = 0 is `ddim_invert`). Returns {t: x_t [B,C,H,W]}.

    neg_cond may also be a callable step -> [B, ...]: a CFG negative redrawn at every step (the
    authors' random other condition, negatives.InversionNegatives)."""
    if record_timesteps is None:
        record_timesteps = [
            ddim_timesteps(steps, _schedule(model, schedule).num_train_timesteps)[0]
        ]
    # eps_at: the timestep at which eps is evaluated for the step t_i -> t_{i+1}: "next"
    # (t_{i+1}, ours) or "current" (t_i, the authors' code; the first step, from x0, uses t_1).
    if eps_at not in INVERSION_EPS:
        raise ValueError(f"eps_at must be one of {INVERSION_EPS}, got {eps_at!r}")
    sch = _schedule(model, schedule)
    grid = ddim_timesteps(steps, sch.num_train_timesteps)[::-1]  # ascending: 19, 39, ..., 999
    rec = _check_record(record_timesteps, grid)
    device = next(model.parameters()).device
    x = x0.to(device=device, dtype=torch.float32)
    b = x.shape[0]
    cond = _expand_cond(cond, b).to(device)
    negative_at = neg_cond if callable(neg_cond) else None
    if negative_at is None and neg_cond is not None:
        neg_cond = _expand_cond(neg_cond, b).to(device)
    last = max(rec) if rec else grid[-1]
    traj: dict[int, torch.Tensor] = {}
    t_cur = -1
    for step, t in enumerate(tqdm(grid, disable=not progress, desc="ddim-invert", leave=False)):
        t_eps = t if eps_at == "next" or t_cur < 0 else t_cur
        neg = neg_cond if negative_at is None else _expand_cond(negative_at(step), b).to(device)
        out = guided_eps(model, x, t_eps, cond, neg, guidance)
        x0_hat, eps = sch.split(x, out, t_cur)
        x0_hat = x0_hat if t_cur >= 0 else x
        if eta > 0:
            # Forward (noising) analogue of DDIM's sigma_t: keep x_t's noise level.
            sigma = sch.fresh_std(t_cur, t, eta, x)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device)
            x = sch.move(x0_hat, eps, t, sigma) + sigma * noise
        else:
            x = sch.move(x0_hat, eps, t)  # DDIM; for a flow the Euler step x + (s' - s) v
        if t in rec:
            traj[t] = x.clone()
        if t == last:  # nothing later is needed
            break
        t_cur = t
    return traj
