"""`--recipe paper`: each knob where the authors' synthetic-benchmark code departs from ours
(method/recipes.py, METHOD.md §10), checked against a step computed by hand on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCondUNet
from helpers import NULL, small_featurizer

from ctrak_fast.method.diffusion import (
    NoiseSchedule,
    ddim_invert_stochastic,
    ddim_sample,
    ddim_timesteps,
)
from ctrak_fast.method.negatives import DrawnNegative, InversionNegatives, other_values
from ctrak_fast.method.query import (
    ConceptQuerySpec,
    PointNegatives,
    concept_query_features,
    draw_negatives,
    draw_points,
    point_draws,
    slider_features,
)
from ctrak_fast.method.recipes import recipe_options
from ctrak_fast.models.factor import factor_negative

SCH = NoiseSchedule()


def _eps(model, x, t, cond):
    return model(x, torch.full((len(x),), t, dtype=torch.long), cond)


def test_random_other_values_differ_per_factor_and_are_uniform():
    cond = torch.tensor([[0, 1], [2, 0]])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    draws = torch.stack([other_values(cond, [3, 2], gens) for _ in range(600)])
    assert (draws != cond).all()  # every factor takes another value, every draw
    assert (draws[:, :, 1] == 1 - cond[:, 1]).all()  # two values: the flipped one
    counts = torch.bincount(draws[:, 0, 0], minlength=3)  # sample 0 has value 0: 1 and 2 remain
    assert counts[0] == 0 and 240 < counts[1] < 360 and 240 < counts[2] < 360


def test_inversion_negatives_redrawn_per_step_and_independent_of_the_batch():
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    cond = torch.tensor([[0, 1], [2, 0], [1, 1]])
    negs = InversionNegatives("random", x0, cond, [3, 2], seed=0)
    steps = torch.stack([negs(i) for i in range(20)])
    assert (steps != cond).all()
    assert len({tuple(s[:, 0].tolist()) for s in steps}) > 1  # redrawn at every step
    alone = InversionNegatives("random", x0[1:2], cond[1:2], [3, 2], seed=0)
    assert torch.equal(torch.stack([alone(i) for i in range(20)])[:, 0], steps[:, 1])
    with pytest.raises(ValueError, match="two-valued"):
        InversionNegatives("flip", x0, cond, [3, 2], seed=0)
    flip = InversionNegatives("flip", x0, torch.tensor([[0, 1]] * 3), [2, 2], seed=0)
    assert torch.equal(flip(0), torch.tensor([[1, 0]] * 3)) and torch.equal(flip(7), flip(0))


@pytest.mark.parametrize("how", ["random", "flip"])
def test_training_inversion_against_redrawn_negatives_by_hand(how):
    torch.manual_seed(0)
    model = TinyCondUNet(n_values=(2, 2)).eval()
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    cond = torch.tensor([[0, 1], [1, 1]])
    fz = small_featurizer(
        model,
        timesteps=(99, 199),
        inversion_eps="current",
        inversion_negative=how,
        inversion_guidance=3.0,
    )
    fz.null_cond = torch.tensor([2, 2])
    traj = fz.trajectory(x0, cond)
    # by hand: 10 steps on the grid 99, 199, ...; eps of step t_i -> t_i+1 at t_i (first: t_1),
    # CFG against the negative of that step
    negs = InversionNegatives(how, x0, cond, [2, 2], seed=0)
    grid = ddim_timesteps(10)[::-1]
    with torch.no_grad():
        x, t_cur = x0, -1
        for step, t in enumerate(grid[:2]):
            t_eps = t if t_cur < 0 else t_cur
            e_c, e_n = _eps(model, x, t_eps, cond), _eps(model, x, t_eps, negs(step))
            e = e_n + 3.0 * (e_c - e_n)
            ab = SCH.alpha_bar(t, x)
            x0_hat = (
                x
                if t_cur < 0
                else (x - (1 - SCH.alpha_bar(t_cur, x)).sqrt() * e)
                / (SCH.alpha_bar(t_cur, x).sqrt())
            )
            x = ab.sqrt() * x0_hat + (1 - ab).sqrt() * e
            torch.testing.assert_close(traj[t], x, atol=1e-5, rtol=1e-5)
            t_cur = t
    # a null-token inversion is another trajectory
    fz_null = small_featurizer(model, timesteps=(99, 199), inversion_eps="current")
    fz_null.null_cond = torch.tensor([2, 2])
    assert not torch.allclose(fz_null.trajectory(x0, cond)[199], traj[199])


def test_ddpm_global_draw_step_is_the_ancestral_posterior_by_hand(tiny_unet):
    """DDIM at eta = 1 is the DDPM posterior step: mean and variance of q(x_prev | x_t, x0)."""
    cond = torch.tensor([[0, 1]])
    x_t = torch.randn(1, 3, 8, 8)
    grid = ddim_timesteps(10)
    t, t_prev = grid[0], grid[1]
    gen = torch.Generator().manual_seed(5)
    _, traj = ddim_sample(
        tiny_unet,
        cond,
        steps=10,
        eta=1.0,
        x_T=x_t,
        generator=gen,
        record_timesteps=[t_prev],
        stop_at=t_prev,
        clip_x0=False,
    )
    with torch.no_grad():
        e = _eps(tiny_unet, x_t, t, cond)
    ab, ab_prev = SCH.alpha_bar(t, x_t), SCH.alpha_bar(t_prev, x_t)
    alpha, beta = ab / ab_prev, 1 - ab / ab_prev
    x0 = (x_t - (1 - ab).sqrt() * e) / ab.sqrt()
    mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * x_t
    std = ((1 - ab_prev) / (1 - ab) * beta).sqrt()
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(traj[t_prev], mean + std * z, atol=1e-5, rtol=1e-5)


def test_global_draws_stopped_at_one_random_timestep(tiny_unet):
    tiny_unet.config = {"image_size": 8, "in_channels": 3}  # x_T's shape
    fz = small_featurizer(tiny_unet)
    ts = (99, 299, 499)
    spec = ConceptQuerySpec(
        draws="global", n_draws=6, steps=10, timesteps=ts, sampler="ddpm", points="random"
    )
    pos, neg = torch.tensor([0, 1]), torch.tensor([2, 1])
    x, t = draw_points(fz, spec, pos, neg)
    assert x.shape == (6, 3, 8, 8) and set(t.tolist()) <= set(ts) and len(set(t.tolist())) > 1
    assert torch.equal(point_draws(spec), torch.arange(6))
    # by hand: the same generator draws the stops, then x_T and the DDPM noise of all draws
    gen = torch.Generator().manual_seed(spec.seed)
    stops = torch.tensor(ts)[torch.randint(3, (6,), generator=gen)]
    assert torch.equal(stops, t)
    _, traj = ddim_sample(
        tiny_unet, pos[None].expand(6, -1), neg[None], guidance=spec.guidance, steps=10,
        eta=1.0, generator=gen, record_timesteps=ts, stop_at=int(stops.min()),
    )  # fmt: skip
    for i, s in enumerate(stops.tolist()):
        torch.testing.assert_close(x[i], traj[s][i])
    with pytest.raises(ValueError, match="points"):
        ConceptQuerySpec(points="random")  # local draws are whole trajectories


def test_local_draws_guided_by_the_drawn_negative(tiny_unet):
    fz = small_featurizer(tiny_unet)
    spec = ConceptQuerySpec(
        n_draws=3, steps=10, timesteps=(99, 499), negative="random", draw_cfg="negative"
    )
    pos, image = torch.tensor([0, 1]), torch.rand(3, 8, 8) * 2 - 1
    neg = factor_negative(pos, 0, [3, 2], "random")
    assert isinstance(neg, DrawnNegative) and len(neg.choices) == 2
    draw_neg, slider_neg = draw_negatives(spec, neg)
    per_draw = draw_neg.conds
    assert per_draw.shape == (3, 2) and (per_draw[:, 0] != 0).all() and (per_draw[:, 1] == 1).all()
    assert torch.equal(slider_neg.conds, per_draw.repeat(2, 1))  # points are timestep-major
    x, t = draw_points(fz, spec, pos, draw_neg, image)
    by_hand = ddim_invert_stochastic(
        tiny_unet, image[None].expand(3, -1, -1, -1), pos[None].expand(3, -1), per_draw,
        guidance=spec.guidance, steps=10, record_timesteps=(99, 499), eta=spec.eta,
        generator=torch.Generator().manual_seed(spec.seed),
    )  # fmt: skip
    torch.testing.assert_close(x, torch.cat([by_hand[99], by_hand[499]]))
    # the slider at each point uses that point's own c-: the mean of one-point sliders
    got = concept_query_features(fz, spec, pos, [neg], image)[0]
    one = [
        slider_features(fz, spec, pos, slider_neg.conds[i], x[i : i + 1], t[i : i + 1])
        for i in range(len(x))
    ]
    torch.testing.assert_close(got, torch.stack(one).mean(0), atol=1e-5, rtol=1e-4)
    # several c- averaged cannot guide one inversion
    flips = factor_negative(pos, 0, [3, 2], "flip")
    with pytest.raises(ValueError, match="one c- per draw"):
        concept_query_features(fz, spec, pos, [flips], image)
    with pytest.raises(ValueError, match="point negatives"):
        slider_features(fz, spec, pos, PointNegatives(per_draw), x, t)


def test_two_valued_factor_random_negative_is_the_single_flip():
    pos = torch.tensor([1, 0])
    neg = factor_negative(pos, 1, [2, 2], "random")
    assert len(neg.choices) == 1 and torch.equal(neg.choices[0], torch.tensor([1, 1]))
    draw, _ = draw_negatives(ConceptQuerySpec(n_draws=4), neg)
    assert torch.equal(draw.conds, torch.tensor([[1, 1]] * 4))
    assert torch.equal(NULL, torch.tensor([3, 2]))  # the tiny model's null token, for the others


def test_recipe_options_and_flags():
    feature, concept = recipe_options("paper", "global", {"inversion_eps": None})
    assert feature == {"inversion_eps": "current", "inversion_negative": "random"}
    assert concept == {
        "negative": "random", "draw_cfg": "negative", "sampler": "ddpm", "points": "random",
        "n_draws": 36,
    }  # fmt: skip
    _, local = recipe_options("paper", "local", {"draw_cfg": "null"})  # a flag wins
    assert local == {"negative": "random", "draw_cfg": "null"}
    assert recipe_options("ours", "local", {}) == ({}, {})
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_options("theirs", "local", {})


def test_bench_cli_recipe_paper_sets_concept_trak_only():
    from ctrak_fast.bench.quality import QualityConfig
    from ctrak_fast.cli.app import build_parser
    from ctrak_fast.cli.bench import method_options
    from ctrak_fast.method.methods import METHODS

    a = build_parser().parse_args(["bench", "quality", "--recipe", "paper", "--draws", "global"])
    cfg = QualityConfig(**method_options(a))
    assert cfg.dps.inversion_eps == "current" and cfg.dps.inversion_negative == "random"
    paper = cfg.query_spec(METHODS["concept-trak"])
    assert (paper.negative, paper.sampler, paper.points, paper.n_draws) == (
        "random", "ddpm", "random", 36,
    )  # fmt: skip
    ours = build_parser().parse_args(["bench", "quality", "--inversion-negative", "random"])
    cfg = QualityConfig(**method_options(ours))
    assert cfg.dps.inversion_eps == "next" and cfg.dps.inversion_negative == "random"
    assert cfg.query_spec(METHODS["concept-trak"]).negative == "flip"
    cond = QualityConfig(**method_options(a)).query_spec(METHODS["concept-trak-cond"])
    assert (cond.negative, cond.draw_cfg, cond.contexts) == ("flip", "null", True)
