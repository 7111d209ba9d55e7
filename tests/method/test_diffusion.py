"""Schedule, DDIM sampling and inversion, checked against an analytic noise predictor.

For data x0 ~ N(mu, s^2 I) the optimal eps-predictor is known in closed form:
x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I) and
E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
Its DDIM ODE is non-trivial, so inversion followed by sampling must come back to x0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrak_fast.method.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_invert,
    ddim_invert_stochastic,
    ddim_sample,
    ddim_timesteps,
    tweedie_x0,
)

SCHED = NoiseSchedule()
GRID_T = list(range(99, 900, 100))


class GaussianEps(nn.Module):
    """Exact eps-prediction for x0 ~ N(mu_c, s^2 I); mu depends on the condition (factor 0)."""

    def __init__(self, s: float = 0.5, size: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.mus = nn.Parameter(
            torch.rand(3, 3, size, size, generator=g) * 2 - 1, requires_grad=False
        )
        self.s = s
        self.config = {"image_size": size, "in_channels": 3, "schedule": SCHED.config}

    def null_cond(self, b, device=None):
        return torch.full((b, 1), 2, dtype=torch.int64, device=device)

    def forward(self, x, t, cond):
        a = SCHED.alpha_bar(t, x)
        mu = self.mus[cond[:, 0]]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.s**2 + 1 - a)


def test_grid_contains_method_timesteps():
    grid = ddim_timesteps(50)
    assert grid[0] == 999 and grid[-1] == 19 and len(grid) == 50
    assert set(GRID_T) <= set(grid)
    assert set(GRID_T) <= set(ddim_timesteps(10)) and set(GRID_T) <= set(ddim_timesteps(100))
    with pytest.raises(ValueError):
        ddim_timesteps(30)


def test_add_noise_tweedie_consistent():
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 99, 500, 999])
    xt = add_noise(x0, eps, t, SCHED)
    assert torch.allclose(tweedie_x0(xt[:3], eps[:3], t[:3], SCHED), x0[:3], atol=1e-4)
    # At t = 999 float32 rounding of x_t is amplified by 1 / sqrt(alpha_bar) ~ 160.
    assert torch.allclose(tweedie_x0(xt, eps, t, SCHED), x0, atol=1e-3)
    ab = SCHED.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    want = ab[250].sqrt().float() * x0 + (1 - ab[250]).sqrt().float() * eps
    assert torch.allclose(add_noise(x0, eps, 250, SCHED), want, atol=1e-6)


def test_invert_then_sample_reconstructs():
    model = GaussianEps()
    cond = torch.tensor([[0], [1], [0], [1]])
    g = torch.Generator().manual_seed(0)
    x0 = model.mus[cond[:, 0]] + 0.5 * torch.randn(4, 3, 8, 8, generator=g)
    # Inversion uses eps(x_{t_prev}, t) for eps(x_t, t): a first-order error, so the reconstruction
    # error must shrink ~ 1/steps. Mean abs error measured: guidance 1: 0.033 (50 steps), 0.009
    # (200 steps); guidance 2: 0.098, 0.026.
    for guidance in (1.0, 2.0):
        errs = []
        for steps in (50, 200):
            traj = ddim_invert(
                model, x0, cond, guidance=guidance, steps=steps, record_timesteps=[999]
            )
            rec, _ = ddim_sample(
                model, cond, guidance=guidance, steps=steps, x_T=traj[999], clip_x0=False
            )
            errs.append((rec - x0).abs().mean().item())
        assert errs[0] < 0.12 and errs[1] < errs[0] / 3, (guidance, errs)
    # A different start does not come back to x0 (the test has teeth).
    other, _ = ddim_sample(model, cond, x_T=torch.randn(4, 3, 8, 8, generator=g), clip_x0=False)
    assert (other - x0).abs().max() > 0.3


def test_record_timesteps_exact_and_consistent():
    model = GaussianEps()
    cond = torch.tensor([[0], [1]])
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x0, traj = ddim_sample(
        model, cond, guidance=1.5, x_T=x_T, record_timesteps=GRID_T + [999], clip_x0=False
    )
    assert sorted(traj) == sorted(GRID_T + [999])
    assert torch.equal(traj[999], x_T)
    # stop_at returns the same trajectory prefix.
    _, part = ddim_sample(
        model, cond, guidance=1.5, x_T=x_T, record_timesteps=[899, 499], stop_at=499, clip_x0=False
    )
    assert torch.equal(part[499], traj[499]) and torch.equal(part[899], traj[899])
    inv = ddim_invert(model, x0, cond, guidance=1.5, record_timesteps=GRID_T)
    assert sorted(inv) == GRID_T
    # Inverting the sample walks back along the sampling trajectory.
    for t in (99, 499):
        assert (inv[t] - traj[t]).abs().mean() < 0.1  # measured 0.072 at t = 499
    with pytest.raises(ValueError, match="not on the DDIM grid"):
        ddim_sample(model, cond, x_T=x_T, record_timesteps=[100])
    with pytest.raises(ValueError, match="not on the DDIM grid"):
        ddim_invert(model, x0, cond, record_timesteps=[98])


def test_stochastic_inversion_and_eta_sampling():
    model = GaussianEps()
    cond = torch.tensor([[0], [1]])
    x0 = model.mus[cond[:, 0]]
    det = ddim_invert(model, x0, cond, record_timesteps=[499])[499]
    a = ddim_invert_stochastic(
        model, x0, cond, record_timesteps=[499], generator=torch.Generator().manual_seed(0)
    )
    b = ddim_invert_stochastic(
        model, x0, cond, record_timesteps=[499], generator=torch.Generator().manual_seed(1)
    )
    assert not torch.equal(a[499], b[499])
    assert (a[499] - det).abs().mean() < 0.2
    s1, _ = ddim_sample(model, cond, eta=1.0, generator=torch.Generator().manual_seed(0))
    s2, _ = ddim_sample(model, cond, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and s1.shape == (2, 3, 8, 8)


def test_guidance_one_matches_cond_only():
    model = GaussianEps()
    cond = torch.tensor([[0]])
    x_T = torch.randn(1, 3, 8, 8)
    a, _ = ddim_sample(model, cond, x_T=x_T)
    b, _ = ddim_sample(model, cond, neg_cond=torch.tensor([[1]]), guidance=1.0, x_T=x_T)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("eps_at", ["next", "current"])
def test_inversion_step_convention_by_hand(eps_at):
    """Two DDIM inversion steps x0 -> t1 -> t2 computed by hand: "next" evaluates eps at the
    target timestep, "current" (the authors' code) at the current one (from x0: at t1)."""
    model = GaussianEps()
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = torch.tensor([[0], [1]])
    grid = ddim_timesteps(10, SCHED.num_train_timesteps)[::-1]
    t1, t2 = grid[0], grid[1]
    traj = ddim_invert(model, x0, cond, steps=10, record_timesteps=[t1, t2], eps_at=eps_at)

    def eps(x, t):
        return model(x, torch.full((2,), t), cond)

    a1, a2 = SCHED.alpha_bar(t1, x0), SCHED.alpha_bar(t2, x0)
    x1 = a1.sqrt() * x0 + (1 - a1).sqrt() * eps(x0, t1)  # the first step is the same for both
    e = eps(x1, t2 if eps_at == "next" else t1)
    x2 = a2.sqrt() * tweedie_x0(x1, e, t1, SCHED) + (1 - a2).sqrt() * e
    torch.testing.assert_close(traj[t1], x1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traj[t2], x2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eps_at"):
        ddim_invert(model, x0, cond, steps=10, eps_at="previous")


def test_feature_spec_records_the_inversion_convention():
    from ctrak_fast.method.featurize import FeatureSpec

    spec = FeatureSpec(inversion_eps="current")
    assert FeatureSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["inversion_eps"]
    with pytest.raises(ValueError, match="inversion_eps"):
        FeatureSpec(inversion_eps="t_i")
