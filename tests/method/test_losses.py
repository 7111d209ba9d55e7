"""Each formula of METHOD.md §4-5 checked against an independent computation on a tiny UNet."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from ctrak_fast.engine.projection import FactorizedSpec
from ctrak_fast.method.diffusion import NoiseSchedule, tweedie_x0
from ctrak_fast.method.grads.factorized import FactorizedGrads
from ctrak_fast.method.grads.layout import flatten_blocks
from ctrak_fast.method.grads.per_sample import PerSampleGrads
from ctrak_fast.method.losses import (
    Residual,
    dps_guidance,
    dps_loss,
    dsm_loss,
    eps_norm_loss,
    residual,
    slider_loss,
)

B, TOL = 3, 2e-5  # float32 gradients of a ~45k-parameter model: agreement to ~1e-6 relative


def _inputs(model):
    x = torch.randn(B, 3, 8, 8)
    t = torch.tensor([99, 499, 899])
    cond = torch.tensor([[0, 1], [2, 0], [1, 1]])
    return x, t, cond


def _literal_grads(model, loss_of_eps, x, t, cond, extra):
    """Per-sample gradient of a literal loss(eps, extra) with torch.func (no residual trick)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xx, tt, cc, ee):
        eps = functional_call(model, p, (xx[None], tt[None], cc[None]))
        return loss_of_eps(eps, ee[None]).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0, 0, 0))(params, x, t, cond, extra)
    return torch.cat([g[n].flatten(1) for n in params], 1)


def _jt_loop(model, x, t, cond, r):
    """J^T r per sample by a loop of single-sample backward passes."""
    rows = []
    for b in range(len(x)):
        model.zero_grad()
        eps = model(x[b : b + 1], t[b : b + 1], cond[b : b + 1])
        eps.backward(r[b : b + 1])
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_dps_gradient_is_2_over_d_jt_v(tiny_unet):
    x, t, cond = _inputs(tiny_unet)
    v = torch.randn_like(x)
    literal = _literal_grads(tiny_unet, lambda eps, vv: dps_loss(eps, vv), x, t, cond, v)
    expected = _jt_loop(tiny_unet, x, t, cond, v) * 2 / x[0].numel()
    torch.testing.assert_close(literal, expected, atol=TOL, rtol=1e-4)
    fast = flatten_blocks(PerSampleGrads(tiny_unet, backend="hooks")(x, t, cond, v))
    torch.testing.assert_close(fast, expected, atol=TOL, rtol=1e-4)


def test_slider_gradient_is_minus_2w_over_d_jt_d(tiny_unet):
    x, t, cond = _inputs(tiny_unet)
    neg = cond.clone()
    neg[:, 0] = 3  # factor 0 removed (its null token)
    with torch.no_grad():
        d = tiny_unet(x, t, cond) - tiny_unet(x, t, neg)
    w = 7.5
    literal = _literal_grads(tiny_unet, lambda eps, dd: slider_loss(eps, dd, w), x, t, cond, d)
    expected = _jt_loop(tiny_unet, x, t, cond, -w * d) * 2 / x[0].numel()
    torch.testing.assert_close(literal, expected, atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("loss", ["dsm", "eps-norm"])
def test_baseline_losses_match_their_residuals(tiny_unet, loss):
    x, t, cond = _inputs(tiny_unet)
    noise = torch.randn_like(x)
    sch = NoiseSchedule()
    r, dsm = residual(loss, tiny_unet, sch, x, t, cond, noise=noise)
    if loss == "dsm":
        literal = _literal_grads(tiny_unet, lambda eps, n: dsm_loss(eps, n), x, t, cond, noise)
    else:
        literal = _literal_grads(tiny_unet, lambda eps, n: eps_norm_loss(eps), x, t, cond, noise)
    fast = flatten_blocks(PerSampleGrads(tiny_unet, backend="hooks")(x, t, cond, r))
    torch.testing.assert_close(fast, literal, atol=TOL, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(dsm, dsm_loss(tiny_unet(x, t, cond), noise))


@pytest.mark.parametrize("loss", ["dps", "dsm", "eps-norm"])
def test_residual_on_the_gradients_forward_equals_its_own_forward(tiny_unet, loss):
    # The featurizer evaluates r on the forward whose Jacobian it takes (one forward, not two).
    x, t, cond = _inputs(tiny_unet)
    sch, noise, x0 = NoiseSchedule(), torch.randn_like(x), torch.rand_like(x) * 2 - 1
    r, dsm = residual(loss, tiny_unet, sch, x, t, cond, x0=x0, noise=noise)
    for backend in ("hooks", "func"):
        grads = PerSampleGrads(tiny_unet, backend=backend)
        res = Residual(loss, sch, t, x0=x0, noise=noise)
        shared = flatten_blocks(grads(x, t, cond, res))
        torch.testing.assert_close(
            shared, flatten_blocks(grads(x, t, cond, r)), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(res.dsm, dsm)
    fg = FactorizedGrads(tiny_unet, None, FactorizedSpec(k_in=2, k_out=3))
    phi, sq = fg(x, t, cond, Residual(loss, sch, t, x0=x0, noise=noise), 0.5)
    want_phi, want_sq = fg(x, t, cond, r, 0.5)
    torch.testing.assert_close(phi, want_phi, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sq, want_sq, atol=1e-9, rtol=1e-5)


def test_residual_refuses_missing_inputs():
    t = torch.tensor([1])
    with pytest.raises(ValueError, match="noise"):
        Residual("dsm", NoiseSchedule(), t)
    with pytest.raises(ValueError, match="x0"):
        Residual("dps", NoiseSchedule(), t)
    with pytest.raises(ValueError, match="unknown loss"):
        Residual("l2", NoiseSchedule(), t)


def test_dps_guidance_matches_finite_differences(tiny_unet):
    model = tiny_unet.double()
    sch = NoiseSchedule()
    x0 = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    x_t = torch.randn_like(x0)
    t = torch.tensor([199, 699])
    cond = torch.tensor([[0, 1], [2, 0]])
    v = dps_guidance(model, sch, x_t, t, cond, x0)

    def objective(x):
        with torch.no_grad():
            return (tweedie_x0(x, model(x, t, cond), t, sch) - x0).pow(2).flatten(1).mean(1)

    # Central differences in float64; the attention softmax runs in float32 inside diffusers, so h
    # must stay large enough that its rounding (~1e-7) is small against h.
    h = 1e-3
    for idx in [(0, 0, 3, 4), (1, 2, 7, 0), (0, 1, 5, 5)]:
        e = torch.zeros_like(x_t)
        e[idx] = h
        fd = (objective(x_t + e) - objective(x_t - e))[idx[0]] / (2 * h)
        assert torch.isclose(-v[idx], fd, rtol=2e-3, atol=1e-7), (idx, v[idx].item(), fd.item())
