"""Generated query images of the concept benchmark, confirmed by the judge.

Queries are samples of the model for each combination, kept only where the judge (an independent
classifier) sees what was asked (METHOD.md §9). Two sampler options exist for models that do not
compose a held-out combination on plain CFG (the 2 x 2 replica, where "triangle" was only ever
seen blue):

- contrast guidance (`ContrastGuided`): eps(c) + w * sum_f mean_{v != c_f} (eps(c) - eps(c, f=v)),
  which pushes each factor away from its other values, as negative prompts do;
- a confidence floor: the judge's softmax must reach it on every factor, which drops near-blank
  samples that an argmax would accept.

Both default to off (w = 0, floor 0), the samplers of the shipped results.
"""

from __future__ import annotations

import torch
from torch import nn

from ctrak_fast.method import diffusion
from ctrak_fast.progress import progress as show_progress

__all__ = ["ContrastGuided", "judge_confirms", "make_queries"]


class ContrastGuided(nn.Module):
    """A FactorUNet whose eps is contrast-guided: eps(c) + weight * sum over the factors f of c
    that are not null of the mean over the other values v of (eps(c) - eps(c with f = v)).

    One batched forward per call (the condition and every flip). Factors at their null token are
    not contrasted, so the all-null condition of CFG gives the plain unconditional eps. Sample
    from it with `diffusion.ddim_sample(ContrastGuided(model, w), cond, guidance=...)`.
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        super().__init__()
        self.model, self.weight = model, float(weight)
        self.config = model.config
        self.n_values = list(model.n_values)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def null_cond(self, batch: int, device=None) -> torch.Tensor:
        return self.model.null_cond(batch, device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # The k-th other value of factor f is (c_f + k) mod n_f, k = 1..n_f-1: every other value
        # once per sample, also in a batch of mixed conditions, in one batched forward.
        conds, owner = [cond], []
        for f, n in enumerate(self.n_values):
            for k in range(1, n):
                c = cond.clone()
                c[:, f] = torch.where(cond[:, f] < n, (cond[:, f] + k) % n, cond[:, f])
                conds.append(c)
                owner.append(f)
        m = len(conds)
        eps = self.model(torch.cat([x] * m), torch.cat([t] * m), torch.cat(conds))
        eps = eps.view(m, *x.shape)
        out = eps[0].clone()
        for i, f in enumerate(owner):  # a null factor's rows equal eps(c): they add 0
            out = out + self.weight / (self.n_values[f] - 1) * (eps[0] - eps[i + 1])
        return out


def judge_confirms(
    judge, images: torch.Tensor, cond: torch.Tensor, min_confidence: float = 0.0
) -> torch.Tensor:
    """bool [B]: the judge's argmax is cond [B, F] on every factor, softmax ≥ min_confidence."""
    pred, conf = judge.predict_with_confidence(images)
    return ((pred == cond) & (conf >= min_confidence)).all(1)


def make_queries(
    model,
    judge,
    combos,
    keep: int,
    candidates: int,
    guidance: float,
    contrast: float = 0.0,
    min_confidence: float = 0.0,
    confirm: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Generate max(candidates, 2 * keep) images per combination and keep the first `keep` the
    judge confirms (every factor's argmax right and its softmax ≥ min_confidence; confirm=False
    keeps the first ones whatever the judge says).

    Returns a list of dicts {combo: value indices, image: [C,H,W]} and per-combo acceptance counts.
    """
    sampler = ContrastGuided(model, contrast) if contrast else model
    queries, accepted = [], {}
    n = max(candidates, 2 * keep)
    for ci, combo in enumerate(
        show_progress(combos, desc="queries", unit="combination", enabled=progress)
    ):
        gen = torch.Generator().manual_seed(seed * 7919 + ci)
        cond = torch.tensor(combo, dtype=torch.long)[None].expand(n, -1)
        x0, _ = diffusion.ddim_sample(sampler, cond, guidance=guidance, generator=gen)
        x0 = x0.clamp(-1, 1)
        ok = judge_confirms(judge, x0, cond, min_confidence)
        accepted[tuple(combo)] = (int(ok.sum()), n)
        keep_ok = ok if confirm else torch.ones_like(ok)
        for i in keep_ok.nonzero().flatten()[:keep].tolist():
            queries.append({"combo": tuple(combo), "image": x0[i]})
    return queries, accepted
