"""What the ground truth measures on every retrained model, at draws fixed once on the full model.

- whole-image output (a), as D-TRAK measures it: minus the query image's denoising loss under
  its condition, at `whole_points` fixed (t, eps) pairs;
- concept output (b): minus the concept slider's loss, the quantity whose gradient a concept query
  is (method/query.py): at the query image's local draws x_t (stochastic DDIM inversion under c+,
  as the concept queries draw), mean((T - eps_theta(x_t, t, c+))^2) with the target fixed on the
  full model, T = eps(c+) + w (eps(c+) - eps(c-)), c- the concept flipped to each of its other
  values (eps averaged). A model that learnt more of the concept is nearer T: a larger output.
- the concept gap: mean ||eps_theta(c+) - eps_theta(c-)||^2 at the same points, for reading.

The draws are stored (probes.safetensors), so every retrained model is measured at the same x_t
whatever machine computes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctrak_fast.bench.queries import make_queries
from ctrak_fast.engine.atomic import atomic_path
from ctrak_fast.method import diffusion
from ctrak_fast.method.featurize import PAPER_TIMESTEPS
from ctrak_fast.models.factor import factor_negative

__all__ = ["Probes", "make_probes", "measure"]

SLIDER_WEIGHT = 7.5  # the concept queries' slider weight w (ConceptQuerySpec)
INVERSION_GUIDANCE = 7.5  # and the CFG scale of their local draws
FORMAT = "ctrak-probes/1"


@dataclass
class Probes:
    """The fixed draws. Q queries, F factors, P whole-image points, D concept points.

    images [Q,C,H,W], combos int64 [Q,F], roles ("validation"/"test") per query;
    whole_t int64 [Q,P], whole_eps [Q,P,C,H,W];
    concept_x [Q,D,C,H,W], concept_t int64 [Q,D], target [Q,F,D,C,H,W];
    negatives int64 [Q,F,V,F]: for factor f, the V = n_values[f] - 1 flipped conditions (padded
    by repetition to the largest V)."""

    images: torch.Tensor
    combos: torch.Tensor
    roles: list[str]
    whole_t: torch.Tensor
    whole_eps: torch.Tensor
    concept_x: torch.Tensor
    concept_t: torch.Tensor
    target: torch.Tensor
    negatives: torch.Tensor

    def save(self, path: str | os.PathLike) -> None:
        tensors = {k: getattr(self, k).contiguous() for k in self.tensor_names()}
        meta = {"format": FORMAT, "roles": json.dumps(self.roles)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Probes:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a probes file ({meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in cls.tensor_names()}
        return cls(roles=json.loads(meta["roles"]), **tensors)

    @staticmethod
    def tensor_names() -> tuple[str, ...]:
        return ("images", "combos", "whole_t", "whole_eps", "concept_x", "concept_t", "target",
                "negatives")  # fmt: skip

    @property
    def n_queries(self) -> int:
        return len(self.images)


def _flips(combo: torch.Tensor, n_values: list[int]) -> torch.Tensor:
    """[F, V, F]: per factor the condition with that factor flipped to each other value."""
    width = max(n_values) - 1
    rows = []
    for f in range(len(n_values)):
        negs = factor_negative(combo, f, n_values, "flip")
        negs = list(negs) if not isinstance(negs, torch.Tensor) else [negs]
        negs = (negs * width)[:width]  # repeat to a common width: the mean is unchanged
        rows.append(torch.stack([torch.as_tensor(n) for n in negs]))
    return torch.stack(rows)


@torch.no_grad()
def make_probes(model, judge, setting, progress: bool = True) -> Probes:
    """Judge-confirmed query images of every combination from the full model, and their draws."""
    model.eval()
    sch = diffusion.NoiseSchedule.for_model(model)
    n_values = list(model.n_values)
    combos = [(s, c) for s in range(len(setting.shapes)) for c in range(len(setting.colours))]
    queries, _ = make_queries(
        model, judge, combos, keep=setting.queries_per_combo,
        candidates=setting.query_candidates, guidance=setting.guidance,
        confirm=setting.confirm_queries, seed=setting.probe_seed, progress=progress,
    )  # fmt: skip
    missing = {c for c in combos} - {q["combo"] for q in queries}
    if missing:
        raise ValueError(f"the judge confirmed no sample of {sorted(missing)}: train longer")
    g = torch.Generator().manual_seed(setting.probe_seed * 7919 + 5)
    images = torch.stack([q["image"] for q in queries])
    conds = torch.tensor([q["combo"] for q in queries], dtype=torch.long)
    n_q, p = len(queries), setting.whole_points
    whole_t = torch.randint(0, sch.num_train_timesteps, (n_q, p), generator=g)
    whole_eps = torch.randn((n_q, p, *images.shape[1:]), generator=g)
    xs, ts, targets, negatives = [], [], [], []
    null = model.null_cond(1)
    for q in range(n_q):
        pos = conds[q][None].expand(setting.n_draws, -1)
        traj = diffusion.ddim_invert_stochastic(
            model, images[q][None].expand(setting.n_draws, -1, -1, -1), pos, neg_cond=null,
            guidance=INVERSION_GUIDANCE, record_timesteps=PAPER_TIMESTEPS, generator=g,
            schedule=sch,
        )  # fmt: skip
        x = torch.cat([traj[t] for t in PAPER_TIMESTEPS])
        t = torch.tensor(PAPER_TIMESTEPS).repeat_interleave(setting.n_draws)
        flips = _flips(conds[q], n_values)
        eps_pos = model(x, t, conds[q][None].expand(len(x), -1))
        per_factor = []
        for f in range(len(n_values)):
            eps_neg = torch.stack([model(x, t, n[None].expand(len(x), -1)) for n in flips[f]])
            per_factor.append(eps_pos + SLIDER_WEIGHT * (eps_pos - eps_neg.mean(0)))
        xs.append(x)
        ts.append(t)
        targets.append(torch.stack(per_factor))
        negatives.append(flips)
    roles = ["validation" if i % 2 == 0 else "test" for i in range(n_q)]
    return Probes(images, conds, roles, whole_t, whole_eps, torch.stack(xs), torch.stack(ts),
                  torch.stack(targets), torch.stack(negatives))  # fmt: skip


@torch.no_grad()
def measure(model, probes: Probes) -> dict[str, list]:
    """The outputs of one model: {"whole": [Q], "slider": [Q][F], "gap": [Q][F]} (larger =
    more of what the query asks, except the gap, which is a size)."""
    model.eval()
    sch = diffusion.NoiseSchedule.for_model(model)
    whole, slider, gap = [], [], []
    for q in range(probes.n_queries):
        c = probes.combos[q]
        eps = probes.whole_eps[q]
        x_t = diffusion.add_noise(
            probes.images[q][None].expand_as(eps), eps, probes.whole_t[q], sch
        )
        pred = model(x_t, probes.whole_t[q], c[None].expand(len(eps), -1))
        whole.append(-float((pred - eps).pow(2).mean()))
        x, t = probes.concept_x[q], probes.concept_t[q]
        eps_pos = model(x, t, c[None].expand(len(x), -1))
        row_s, row_g = [], []
        for f in range(probes.target.shape[1]):
            row_s.append(-float((probes.target[q, f] - eps_pos).pow(2).mean()))
            negs = probes.negatives[q, f]
            eps_neg = torch.stack([model(x, t, n[None].expand(len(x), -1)) for n in negs]).mean(0)
            row_g.append(float((eps_pos - eps_neg).pow(2).mean()))
        slider.append(row_s)
        gap.append(row_g)
    return {"whole": whole, "slider": slider, "gap": gap}
