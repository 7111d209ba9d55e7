"""The flow schedule (method/schedules.py) and the method in flow form: the flow-matching loss
and its gradient against a hand-computed step, the inversion and the sampler against hand-written
Euler loops of the flow ODE, the sigmas against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.method.diffusion import ddim_invert, ddim_sample, ddim_timesteps
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.losses import Residual
from ctrak_fast.method.schedules import FlowSchedule, NoiseSchedule, schedule_from_config


class Affine(nn.Module):
    """v = w * x + b on a one-pixel image (a 1x1 convolution), whatever t and cond."""

    def __init__(self, w: float, b: float):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(w)
            self.conv.bias.fill_(b)

    def forward(self, x, t, cond):
        return self.conv(x)


class TimeField(nn.Module):
    """A velocity field that depends on x, t and the condition: v = W x + t/1000 + cond."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv2d(2, 2, 1)

    def forward(self, x, t, cond):
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        return self.mix(x) + tt + cond.reshape(-1, 1, 1, 1).to(x.dtype)


def test_flow_sigmas_are_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowSchedule(1000, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[:1000].flip(0)
    torch.testing.assert_close(sch.sigmas.float(), reference)
    assert (
        float(sch.sigma(999, torch.zeros(1))) == 1.0 and float(sch.sigma(-1, torch.zeros(1))) == 0
    )
    assert isinstance(schedule_from_config(sch.config), FlowSchedule)
    assert schedule_from_config(sch.config).config == sch.config
    assert isinstance(schedule_from_config(None), NoiseSchedule)


def test_flow_matching_loss_and_gradient_by_hand():
    """T = 4, shift 1: sigma_1 = 0.5. x0 = 1, noise = 3 -> x_t = 0.5 * 1 + 0.5 * 3 = 2, target
    v* = noise - x0 = 2. The model v = 3 x + 0.5 = 6.5: loss (2 - 6.5)^2 = 20.25; gradient
    2 (v - v*) = 9 for the bias, 9 * x_t = 18 for the weight."""
    sch, model = FlowSchedule(4, shift=1.0), Affine(3.0, 0.5)
    x0, noise, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.0), torch.tensor([1])
    x_t = sch.add_noise(x0, noise, t)
    assert x_t.item() == 2.0 and sch.target(x0, noise).item() == 2.0
    res = Residual("dsm", sch, t, x0=x0, noise=noise)
    assert res.standalone(model, x_t, t, None).item() == 4.5  # r = v - v*
    assert res.dsm.item() == 20.25
    spec = FeatureSpec.baseline("dsm", timesteps=(1,), normalize=False)
    fz = Featurizer(model, sch, spec, ProjectionSpec(k=8), torch.zeros(1))
    blocks = fz.terms(x_t, t, torch.zeros(1, 1), Residual("dsm", sch, t, x0=x0, noise=noise), False)
    assert [b.flatten().tolist() for _, b in blocks] == [[18.0], [9.0]]  # weight, bias
    # the same through the featurizer's own x_t (fixed noise of its seed)
    n = fz.noise((1, 1, 1))[1]
    x_t = 0.5 * x0 + 0.5 * n
    v = 3 * x_t + 0.5
    phi_blocks, dsm = fz.gradient_sum(x0, torch.zeros(1, 1))
    r = v - (n - x0)
    assert dsm.item() == pytest.approx(r.pow(2).item(), rel=1e-6)
    got = [b.flatten().item() for _, b in phi_blocks]
    assert got == pytest.approx([2 * r.item() * x_t.item(), 2 * r.item()], rel=1e-6)


def test_flow_needs_x0_for_its_target():
    with pytest.raises(ValueError, match="needs the clean image"):
        Residual("dsm", FlowSchedule(), torch.tensor([1]), noise=torch.zeros(1, 1, 1, 1))


def test_inversion_and_sampling_are_euler_steps_of_the_flow_ode():
    sch, model = FlowSchedule(1000, shift=3.0), TimeField()
    x0 = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([[0.5], [-1.0]])
    grid = ddim_timesteps(10)[::-1]  # 99, 199, ..., 999
    traj = ddim_invert(model, x0, cond, steps=10, record_timesteps=grid, schedule=sch)
    with torch.no_grad():
        x, s_prev = x0.clone(), 0.0
        for t in grid:  # dx = (s_t - s_prev) v(x, t): eps at the target timestep ("next")
            s = sch.sigmas[t].item()
            x = x + (s - s_prev) * model(x, torch.full((2,), t), cond)
            s_prev = s
            torch.testing.assert_close(traj[t], x, rtol=1e-5, atol=1e-5)
        x_T = traj[999]
        out, _ = ddim_sample(model, cond, steps=10, x_T=x_T, schedule=sch, clip_x0=False)
        x = x_T.clone()
        for i, t in enumerate(grid[::-1]):  # 999 down to 99, then to the clean image
            s_next = sch.sigmas[grid[::-1][i + 1]].item() if i + 1 < len(grid) else 0.0
            x = x + (s_next - sch.sigmas[t].item()) * model(x, torch.full((2,), t), cond)
        torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_flow_split_and_move_are_consistent():
    sch = FlowSchedule(1000, shift=3.0)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([100, 500, 998])  # eps of x0 divides by sigma: not near t = 0
    x_t = sch.add_noise(x0, noise, t)
    x0_hat, eps_hat = sch.split(x_t, noise - x0, t)  # the exact velocity recovers both
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    torch.testing.assert_close(sch.eps_given_x0(x_t, x0, t), noise)
    torch.testing.assert_close(sch.move(x0, noise, t), x_t)
    std = sch.fresh_std(299, 499, 0.5, x0)
    assert 0 < std.item() < sch.sigma(499, x0).item()


def test_slider_in_flow_form_by_hand():
    """The slider on velocities: v(c) = 3 x + 0.5 + c at x_t = 2 gives v(c+=1) = 7.5,
    v(c-=0) = 6.5, d = 1; at w = 2 the residual is -w d = -2, so the gradient of
    mean((sg[v(c+) + w d] - v(c+))^2) is 2 * -2 * x_t = -8 (weight) and -4 (bias)."""
    from ctrak_fast.method.query import ConceptQuerySpec, slider_features

    class Shifted(Affine):
        def forward(self, x, t, cond):
            return self.conv(x) + cond.reshape(-1, 1, 1, 1)

    sch, model = FlowSchedule(4, shift=1.0), Shifted(3.0, 0.5)
    spec = FeatureSpec.baseline("dsm", timesteps=(1,), normalize=False)
    fz = Featurizer(model, sch, spec, ProjectionSpec(k=8), torch.zeros(1))
    q = ConceptQuerySpec(weight=2.0, timesteps=(1,), normalize=False)
    x_t, t = torch.full((1, 1, 1, 1), 2.0), torch.tensor([1])
    got = slider_features(fz, q, torch.ones(1), torch.zeros(1), x_t, t)
    want = fz.features([(0, torch.tensor([[-8.0]])), (1, torch.tensor([[-4.0]]))])[0]
    torch.testing.assert_close(got, want)
