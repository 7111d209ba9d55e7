"""The factor-conditioned kind (FactorUNet, or any model with `n_values`): conditions are factor
value indices int64 [F]; removing a concept sets its factor to the null token (or flips it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ctrak_fast.method.featurize import Featurizer
from ctrak_fast.method.negatives import DrawnNegative
from ctrak_fast.method.query import (
    ConceptQuerySpec,
    Negative,
    concept_contexts,
    context_concept_features,
)
from ctrak_fast.models.base import Condition, Conditions, ModelKind
from ctrak_fast.models.factor_unet import drop_factor, flip_factor

__all__ = ["FactorConditions", "FactorKind", "factor_negative"]


def factor_negative(cond: Tensor, f: int, n_values: Sequence[int], how: str) -> Negative:
    """c- of factor f's concept in cond [F]: the factor nulled ("null"), flipped to each of its
    other values ("flip", eps averaged: the paper's synthetic queries), or set to one random other
    value per draw ("random", the authors' code; two values: the single flipped c-)."""
    if how == "flip":
        return flip_factor(cond, f, list(n_values))
    if how == "random":
        return DrawnNegative(tuple(flip_factor(cond, f, list(n_values))))
    if how != "null":
        raise ValueError(f"a factor's c- is 'null', 'flip' or 'random', got {how!r}")
    return drop_factor(cond[None], f, list(n_values))[0]


class FactorConditions(Conditions):
    """ "shape=triangle,colour=red", {"shape": "triangle"} or int64 [F] value indices; factors
    not named get their null token (index n_values[f])."""

    def __init__(self, model: nn.Module) -> None:
        cfg = getattr(model, "config", {})
        self.n_values = [int(n) for n in model.n_values]  # type: ignore[union-attr]
        self.factors: list[str] = list(
            cfg.get("factors") or [f"factor{i}" for i in range(len(self.n_values))]
        )
        self.values: dict[str, list[str]] = dict(cfg.get("values") or {})

    def _factor(self, name: str) -> int:
        if name not in self.factors:
            raise ValueError(f"unknown factor {name!r}; the model has {self.factors}")
        return self.factors.index(name)

    def one(self, concept: Condition) -> Tensor:
        if isinstance(concept, Tensor):
            if concept.shape != (len(self.n_values),) or concept.is_floating_point():
                raise ValueError(
                    f"a condition is int64 [{len(self.n_values)}], got {list(concept.shape)}"
                )
            return concept.to(torch.int64)
        if isinstance(concept, str):
            pairs: dict[str, str | int] = {}
            for part in (p.strip() for p in concept.split(",")):
                if "=" not in part:  # "" too: "shape=circle,," is a typo, not a condition
                    raise ValueError(
                        f"bad condition {concept!r}: expected factor=value, got {part!r}"
                    )
                key, val = (s.strip() for s in part.split("=", 1))
                if key in pairs:  # the last would silently win
                    raise ValueError(f"bad condition {concept!r}: factor {key!r} given twice")
                pairs[key] = val
            concept = pairs
        if not isinstance(concept, Mapping):
            raise TypeError(f"a factor condition is a str, a mapping or a tensor, not {concept!r}")
        cond = list(self.n_values)  # null token everywhere, then the named factors
        for name, value in concept.items():
            f = self._factor(name)
            if isinstance(value, int):
                idx = value
            else:
                names = self.values.get(name, [])
                if value not in names:
                    raise ValueError(
                        f"unknown value {value!r} of factor {name!r}; expected one of {names}"
                    )
                idx = names.index(value)
            if not 0 <= idx < self.n_values[f]:
                raise ValueError(f"value index {idx} of {name!r} out of [0, {self.n_values[f]})")
            cond[f] = idx
        return torch.tensor(cond, dtype=torch.int64)

    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        names = [remove] if isinstance(remove, str) else list(remove or ())
        if not names:  # default: every factor the condition sets, in turn
            names = [f for i, f in enumerate(self.factors) if int(pos[i]) != self.n_values[i]]
        out = []
        for name in names:
            f = self._factor(name)
            if int(pos[f]) == self.n_values[f]:
                raise ValueError(f"factor {name!r} is not set in the condition: nothing to remove")
            out.append((f"-{name}", self.removed(pos, f, how)))
        return out

    def removed(self, cond: Tensor, f: int, how: str) -> Negative:
        """c- of factor f's concept in cond (factor_negative)."""
        return factor_negative(cond, f, self.n_values, how)

    def contexts(
        self, pos: Tensor, label: str, neg: Negative, how: str = "null"
    ) -> list[tuple[Tensor, Negative]]:
        """(c+, c-) pairs of the concept that `neg` removes from `pos`, in every context that
        shares it: a removed factor ("-name") with each value of every other set factor, c- the
        factor removed there as `how` says; an explicit c- ("vs ...") is its one context."""
        if not label.startswith("-"):
            return [(pos, neg)]
        f = self._factor(label[1:])
        out: list[tuple[Tensor, Negative]] = []
        for c in concept_contexts(pos, f, self.n_values):
            # a context keeps the query's unset factors unset (null stays null)
            c = torch.where(pos == torch.tensor(self.n_values), pos, c)
            if any(torch.equal(c, seen) for seen, _ in out):
                continue
            out.append((c, self.removed(c, f, how)))
        return out


class FactorKind(ModelKind):
    """Models conditioned on one value per factor (`n_values`): FactorUNet."""

    name = "factor"
    conditions: FactorConditions

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return hasattr(model, "n_values")

    def make_conditions(self) -> FactorConditions:
        return FactorConditions(self.model)

    def complete(self, images: Any, conds: Tensor) -> Tensor:
        from ctrak_fast.method.completion import complete_captions

        n_values = [int(n) for n in self.model.n_values]  # type: ignore[union-attr]
        return complete_captions(self.model, images, conds, n_values)

    def concept_features(
        self,
        featurizer: Featurizer,
        spec: ConceptQuerySpec,
        pos: Tensor,
        negatives: list[tuple[str, Negative]],
        x0: Tensor | None,
        region: Tensor | None,
        how: str,
    ) -> Tensor:
        if not spec.contexts:
            return super().concept_features(featurizer, spec, pos, negatives, x0, region, how)
        # Each removed factor's concept in every context that shares it (other factors at each
        # of their values), c- the factor removed there; explicit c- keep one context.
        ctx = [self.conditions.contexts(pos, label, c, how) for label, c in negatives]
        return context_concept_features(featurizer, spec, pos, ctx, image=x0, region=region)
