"""Training-side and query-side functions of Concept-TRAK and its baselines (METHOD.md §4-6).

Each loss is written literally, as in the paper, on batched tensors; it returns one value per
sample. Every one of them has a per-sample parameter gradient of the form

    grad_theta loss = (2 / D) * J_theta^T r,        J_theta = d eps_theta(x_t, t, c) / d theta,

for a detached *residual* r of the shape of eps. The featurizer uses that form (one vector-Jacobian
product per sample, see grads.py); the literal losses are the specification the tests check.

| loss      | literal form                                   | residual r      |
|-----------|------------------------------------------------|-----------------|
| dps       | mean((sg[eps - v] - eps)^2)                    | v               |
| dsm       | mean((noise - eps)^2)                          | eps - noise     |
| eps-norm  | mean(eps^2)                                    | eps             |
| slider    | mean((sg[eps(c+) + w d] - eps(c+))^2)          | -w d            |
"""

from __future__ import annotations

import torch

from .diffusion import NoiseSchedule, tweedie_x0

LOSSES = ("dps", "dsm", "eps-norm")


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def dps_loss(eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Concept-TRAK training loss. eps, v: [B, C, H, W] -> [B]."""
    return _mean_per_sample(((eps - v).detach() - eps).pow(2))


def dsm_loss(eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Denoising score matching (TRAK). eps, noise: [B, C, H, W] -> [B]."""
    return _mean_per_sample((noise - eps).pow(2))


def eps_norm_loss(eps: torch.Tensor) -> torch.Tensor:
    """D-TRAK's output function. eps: [B, C, H, W] -> [B]."""
    return _mean_per_sample(eps.pow(2))


def slider_loss(eps_pos: torch.Tensor, d: torch.Tensor, w: float) -> torch.Tensor:
    """Concept-slider reward. eps_pos = eps(x_t, t, c+); d = eps(c+) - eps(c-), detached.

    eps_pos, d: [B, C, H, W] -> [B]."""
    return _mean_per_sample(((eps_pos + w * d).detach() - eps_pos).pow(2))


def dps_guidance(
    model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    x0: torch.Tensor,
) -> torch.Tensor:
    """DPS direction v_t = -grad_{x_t} mean((x0_hat(x_t) - x0)^2), theta frozen.

    x_t, x0: [B, C, H, W]; t: [B] int64; cond: [B, F] -> v: [B, C, H, W].
    Samples do not interact, so the gradient of the summed loss is each sample's own gradient.
    """
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        eps = model(x, t, cond)
        x0_hat = tweedie_x0(x, eps, t, schedule)
        loss = _mean_per_sample((x0_hat - x0).pow(2)).sum()
        (grad,) = torch.autograd.grad(loss, x)
    return -grad


def residual(
    loss: str,
    model,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual r of a training-side loss (see the module table) and the per-sample DSM loss.

    Returns (r [B, C, H, W], dsm [B]); dsm is NaN where no noise is given (it feeds DAS weights).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    if loss == "dsm" and noise is None:
        raise ValueError("the dsm loss needs the noise that made x_t")
    eps = None
    if loss != "dps" or noise is not None:
        with torch.no_grad():
            eps = model(x_t, t, cond)
    if loss == "dps":
        r = dps_guidance(model, schedule, x_t, t, cond, x0)
    else:
        r = eps - noise if loss == "dsm" else eps
    nan = torch.full(x_t.shape[:1], float("nan"), device=x_t.device)
    dsm = dsm_loss(eps, noise) if noise is not None else nan
    return r.detach(), dsm.detach()
