"""Query-side features: the concept slider of Concept-TRAK (METHOD.md §5).

A concept query is (c+, c-, w, draws): c+ holds the concept, c- is c+ with the concept removed
(a factor set to its null token, or another value). At each draw point (x_t, t):

    d = eps(x_t, t, c+) - eps(x_t, t, c-)                     (detached)
    g = grad_theta mean((sg[eps(c+) + w d] - eps(c+))^2) = -(2w/D) J(c+)^T d

Each point's gradient is normalised to unit norm, the points are averaged, and the mean is projected
with the same projector as the training features. Draws:

- local: stochastic DDIM inversion (eta) of one generated query image under c+ — the concept as it
  appears in that image;
- global: DDIM samples from x_T ~ N(0, I) with CFG (c+ vs c-) — the concept as the model makes it.

Every draw contributes its x_t at all timesteps of the spec.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ctrak_fast.method import diffusion
from ctrak_fast.method.eps_memo import EpsMemo, shared_eps_memo
from ctrak_fast.method.featurize import PAPER_TIMESTEPS, Featurizer
from ctrak_fast.method.grads.layout import Blocks, add_blocks
from ctrak_fast.method.negatives import DrawnNegative, sample_seed


@dataclass(frozen=True)
class ConceptQuerySpec:
    """Options of a concept query (paper defaults where the paper states one).

    weight: slider weight w (7.5 synthetic, 3 text-to-image). draws: "local" or "global".
    n_draws: independent draws, each used at every timestep (or at one, see `points`).
    eta: stochasticity of local inversion.
    guidance: CFG scale of the draws (local: inversion under c+ vs `draw_cfg`; global: c+ vs c-).
    The authors' recipe (recipes.py) sets draw_cfg, negative, sampler and points otherwise.

    Examples:
        >>> spec = ConceptQuerySpec(draws="global", n_draws=64)
        >>> spec.weight, len(spec.timesteps)
        (7.5, 9)
    """

    weight: float = 7.5
    draws: str = "local"
    n_draws: int = 4
    eta: float = 0.1
    guidance: float = 7.5
    steps: int = 50
    timesteps: tuple[int, ...] = PAPER_TIMESTEPS
    normalize: bool | str = True  # True, False or "layer" (see FeatureSpec.normalize)
    seed: int = 0
    # Average each concept's slider over the contexts that share it (the concept with every value
    # of the other factors, or the other words of a prompt): what one context carries cancels.
    contexts: bool = False
    # c- of a factor concept (factor models): the factor set to its null token, or flipped to
    # each of its other values (eps averaged), as the paper's synthetic queries do.
    # "random": one other value per draw (negatives.DrawnNegative, the authors' code; with two
    # values the single flipped c-).
    negative: str = "null"
    # CFG negative of local draws (the inversion): the null token (ours) or the query's c-
    # ("negative", the authors'); global draws always guide against c-.
    draw_cfg: str = "null"
    # Global draws: DDIM (ours) or ancestral DDPM (eta = 1, the authors'); each draw used at every
    # timestep ("all", ours) or stopped at one random timestep of the set ("random", theirs).
    sampler: str = "ddim"
    points: str = "all"

    def __post_init__(self) -> None:
        choices = {
            "draws": ("local", "global"),
            "negative": ("null", "flip", "random"),
            "draw_cfg": ("null", "negative"),
            "sampler": ("ddim", "ddpm"),
            "points": ("all", "random"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.n_draws < 1:
            raise ValueError("n_draws must be >= 1")
        if self.points == "random" and self.draws != "global":
            raise ValueError("points='random' stops global draws early: it needs draws='global'")
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d


# one c-, several whose eps are averaged, or one drawn per draw
Negative = torch.Tensor | Sequence[torch.Tensor] | DrawnNegative


@dataclass(frozen=True)
class PointNegatives:
    """One c- per draw point, [n_points, ...] (a DrawnNegative's draws, spread over points)."""

    conds: torch.Tensor


def _batched(cond: torch.Tensor, n: int) -> torch.Tensor:
    """One condition (factor indices [F], or an embedding such as text states [L, D]) -> [n,...]."""
    return cond.unsqueeze(0).expand(n, *cond.shape)


def point_draws(spec: ConceptQuerySpec) -> torch.Tensor:
    """The draw each point of draw_points comes from, int64 [n_points]: points are timestep-major
    (all draws at t_1, then at t_2, ...), or one per draw with points="random"."""
    draws = torch.arange(spec.n_draws)
    return draws if spec.points == "random" else draws.repeat(len(spec.timesteps))


def draw_points(
    featurizer: Featurizer,
    spec: ConceptQuerySpec,
    cond_pos: torch.Tensor,
    cond_neg: torch.Tensor | PointNegatives | None = None,
    image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw points (x_t [n, C, H, W], t [n]) for a query; n = n_draws * len(timesteps), or
    n_draws with points="random" (point_draws gives each point's draw).

    cond_neg: the CFG negative of the draws, one c- or PointNegatives with one per draw; global
    draws and local draws with draw_cfg="negative" use it (None: the null token)."""
    model, sch = featurizer.model, featurizer.schedule
    gen = torch.Generator().manual_seed(spec.seed)
    n = spec.n_draws
    pos = _batched(cond_pos, n)
    neg = None
    if cond_neg is not None and (spec.draws == "global" or spec.draw_cfg == "negative"):
        neg = cond_neg.conds if isinstance(cond_neg, PointNegatives) else _batched(cond_neg, 1)
    cache, key = featurizer.inversion_cache, None
    if spec.draws == "local":
        if image is None:
            raise ValueError("local query draws need the query image")
        if spec.draw_cfg == "negative" and neg is None:
            raise ValueError("draw_cfg='negative' needs the query's c- for the inversion")
        if cache is not None:  # concept methods of one model that draw alike share the draws
            settings: tuple[object, ...] = (id(model), "local", n, spec.eta, spec.guidance)
            settings += (spec.steps, spec.timesteps, spec.seed)
            settings += (None if neg is None else sample_seed(0, neg),)
            key = cache.key(settings, image, cond_pos, featurizer.null_cond)
            if key in cache:
                hit: tuple[torch.Tensor, torch.Tensor] = cache[key]
                return hit
        traj = diffusion.ddim_invert_stochastic(
            model,
            image.reshape(1, *image.shape[-3:]).expand(n, -1, -1, -1),
            pos,
            neg_cond=_batched(featurizer.null_cond, 1) if neg is None else neg,
            guidance=spec.guidance,
            steps=spec.steps,
            record_timesteps=spec.timesteps,
            eta=spec.eta,
            generator=gen,
            schedule=sch,
        )
    else:
        stops = None
        if spec.points == "random":  # each draw stopped at one random timestep of the set
            stops = torch.tensor(spec.timesteps)[
                torch.randint(len(spec.timesteps), (n,), generator=gen)
            ]
        _, traj = diffusion.ddim_sample(
            model,
            pos,
            neg_cond=neg,
            guidance=spec.guidance,
            steps=spec.steps,
            eta=1.0 if spec.sampler == "ddpm" else 0.0,  # DDIM at eta = 1 is ancestral DDPM
            generator=gen,
            record_timesteps=spec.timesteps,
            stop_at=min(spec.timesteps) if stops is None else int(stops.min()),
            schedule=sch,
            # x0 estimates are clamped to [-1, 1] only where the model says x0 lives there
            # (pixels); a latent model's x0 is not confined.
            clip_x0=getattr(model, "clip_sample", True),
        )
        if stops is not None:
            x = torch.stack([traj[int(ts)][i] for i, ts in enumerate(stops)])
            return x, stops.to(device=x.device, dtype=torch.long)
    x = torch.cat([traj[t] for t in spec.timesteps])
    t = torch.tensor(spec.timesteps, dtype=torch.long, device=x.device).repeat_interleave(n)
    if cache is not None and key is not None:
        cache[key] = (x, t)
    return x, t


def draw_negatives(
    spec: ConceptQuerySpec, cond_neg: Negative
) -> tuple[torch.Tensor | PointNegatives | None, Negative | PointNegatives]:
    """(CFG negative of the draws, c- of the slider at the points) of one query row.

    A DrawnNegative is drawn once per draw (seeded by spec.seed and its choices) and both use it;
    one c- is both; several c- (eps averaged) leave the draws to the null token, except a single
    one, which is one c-."""
    if isinstance(cond_neg, DrawnNegative):
        gen = torch.Generator().manual_seed(sample_seed(spec.seed, *cond_neg.choices))
        per_draw = cond_neg.draw(spec.n_draws, gen)
        return PointNegatives(per_draw), PointNegatives(per_draw[point_draws(spec)])
    if isinstance(cond_neg, torch.Tensor):
        return cond_neg, cond_neg
    negs = list(cond_neg)
    if len(negs) == 1:
        return negs[0], negs[0]
    if spec.draws == "local" and spec.draw_cfg == "negative":
        raise ValueError(
            "draw_cfg='negative' inverts under one c- per draw: use negative='random' (or a "
            "two-valued factor), not several c- averaged"
        )
    return None, negs


def concept_query_features(
    featurizer: Featurizer,
    spec: ConceptQuerySpec,
    cond_pos: torch.Tensor,
    cond_negs: Sequence[Negative],
    image: torch.Tensor | None = None,
    batch_size: int = 32,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concept-slider query features for one c+ and several c- (e.g. one per factor).

    cond_pos: one condition (int64 [F] factor indices, or an embedding); cond_negs: one c- per
    output row, each a condition of the same shape, a list of them (then eps(c-) is their mean:
    the concept flipped to each of its other values) or a DrawnNegative (one per draw);
    image: [C,H,W] (local draws).
    Local draws under CFG vs null depend only on c+, so all c- share them; otherwise (global
    draws, draw_cfg="negative") draws are made per c-. region: a weight [1, 1, h, w]
    (losses.region_weight) restricting the slider loss to a region of the image.
    Returns: [len(cond_negs), k] float32.
    """
    out = []
    shared = spec.draws == "local" and spec.draw_cfg == "null"
    points = draw_points(featurizer, spec, cond_pos, None, image) if shared else None
    memo = shared_eps_memo(featurizer, *points, batch_size) if points else None
    for neg in cond_negs:
        draw_neg, slider_neg = draw_negatives(spec, neg)
        x, t = points or draw_points(featurizer, spec, cond_pos, draw_neg, image)
        out.append(
            slider_features(featurizer, spec, cond_pos, slider_neg, x, t, batch_size, region, memo)
        )
    return torch.stack(out)


def slider_features(
    featurizer: Featurizer,
    spec: ConceptQuerySpec,
    cond_pos: torch.Tensor,
    cond_neg: Negative | PointNegatives,
    x: torch.Tensor,
    t: torch.Tensor,
    batch_size: int = 32,
    region: torch.Tensor | None = None,
    memo: EpsMemo | None = None,
) -> torch.Tensor:
    """Concept-slider feature [k] at given draw points (METHOD.md §5): per point the gradient of
    mean((sg[eps(c+) + w d] - eps(c+))^2), d = eps(c+) - eps(c-), unit-normalised, averaged over
    the points, projected. cond_pos: one condition; cond_neg: one condition, a list whose eps
    are averaged, or PointNegatives (one c- per point); x [n,C,h,w], t [n]; region: a weight
    [1, 1, h, w] (losses.region_weight): the mean over the region only (residual -w d weight);
    memo: the EpsMemo of these points and batches, which the no-grad eps calls read."""
    if isinstance(cond_neg, DrawnNegative):
        raise ValueError("a DrawnNegative is drawn per draw first (draw_negatives)")
    if len(x) == 0:
        raise ValueError("a concept query needs at least one draw point")
    per_point: torch.Tensor | None = None
    negs: list[torch.Tensor] = []
    if isinstance(cond_neg, PointNegatives):
        per_point = cond_neg.conds
        if len(per_point) != len(x):
            raise ValueError(f"{len(per_point)} point negatives for {len(x)} draw points")
    elif isinstance(cond_neg, torch.Tensor):
        negs = [cond_neg]
    else:
        negs = list(cond_neg)
    model = featurizer.model
    if memo is not None and not memo.covers(model, x, t, batch_size):
        raise ValueError("the eps memo was made for other draw points, batches or model")
    acc: Blocks = []
    for i in range(0, len(x), batch_size):
        xb, tb = x[i : i + batch_size], t[i : i + batch_size]
        pos_b = _batched(cond_pos, len(xb))

        def eps(c: Tensor, i: int = i, xb: Tensor = xb, tb: Tensor = tb) -> Tensor:
            return model(xb, tb, _batched(c, len(xb))) if memo is None else memo.eps(i, c)

        with torch.no_grad():
            if per_point is not None:
                eps_neg = model(xb, tb, per_point[i : i + batch_size].to(xb.device))
            else:
                eps_neg = sum(eps(c) for c in negs) / len(negs)
            d = eps(cond_pos) - eps_neg
        r = -spec.weight * d
        if region is not None:  # the slider's mean over the region only
            r = r * region.to(r.device)
        terms = featurizer.terms(xb, tb, pos_b, r, spec.normalize)
        acc = add_blocks(acc or None, [(off, b.sum(0, keepdim=True)) for off, b in terms])
    return featurizer.features([(off, b / len(x)) for off, b in acc])[0]


def concept_contexts(
    cond: torch.Tensor, factor: int, n_values: Sequence[int]
) -> list[torch.Tensor]:
    """The conditions that share cond's value of `factor`: cond [F] with every other factor set
    to each of its values (all combinations; cond itself is one of them)."""
    others = [f for f in range(len(n_values)) if f != factor]
    out = []
    for vals in itertools.product(*(range(n_values[f]) for f in others)):
        c = cond.clone()
        for f, v in zip(others, vals, strict=True):
            c[f] = v
        out.append(c)
    return out


def context_concept_features(
    featurizer: Featurizer,
    spec: ConceptQuerySpec,
    cond_pos: torch.Tensor,
    contexts: Sequence[Sequence[tuple[torch.Tensor, Negative]]],
    image: torch.Tensor | None = None,
    batch_size: int = 32,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Context-averaged concept slider: row i is the mean slider feature over the (c+, c-) pairs
    of contexts[i] (e.g. the concept paired with each value of the other factors, c- the concept
    removed in that context). The draw points are the local draws of the query image under its
    own condition cond_pos, shared by every context. region: see slider_features.
    Returns [len(contexts), k] float32."""
    if spec.draws != "local" or spec.draw_cfg != "null":
        raise ValueError(
            "context-averaged concept queries share local draws of the query image under CFG vs "
            "null (draws='local', draw_cfg='null')"
        )
    x, t = draw_points(featurizer, spec, cond_pos, None, image)
    memo = shared_eps_memo(featurizer, x, t, batch_size)  # the contexts share their conditions
    rows = []
    for pairs in contexts:
        if not pairs:
            raise ValueError("a concept needs at least one context")
        feats = [
            slider_features(
                featurizer, spec, c, draw_negatives(spec, n)[1], x, t, batch_size, region, memo
            )
            for c, n in pairs
        ]
        rows.append(torch.stack(feats).mean(0))
    return torch.stack(rows)


def image_query_features(
    featurizer: Featurizer,
    images: torch.Tensor,
    conds: torch.Tensor,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whole-image query features (TRAK / D-TRAK / DAS): the training-side recipe applied to the
    query images. images [Q,C,H,W], conds [Q,F] -> [Q,k]; region: a weight [1, 1, h, w]
    (losses.region_weight) restricting the loss to a region of the images."""
    phi, _ = featurizer(images, conds, region)
    return phi
