"""How each model kind spells a condition c, and what "the concept removed" (c-) is for it.

- factor models (FactorUNet): "shape=triangle,colour=red", {"shape": "triangle"} or int64 [F]
  value indices; removing a concept sets its factor to the null token;
- text-to-image adapters: a prompt (or an embedding [L, D]); removing a concept deletes its phrase;
- class-conditional diffusers pipelines: a class index; removing it gives the null class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from ctrak_fast.method.negatives import DrawnNegative
from ctrak_fast.method.query import Negative, concept_contexts
from ctrak_fast.models.factor_unet import drop_factor, flip_factor

Condition: TypeAlias = Tensor | str | Mapping[str, str | int] | int
"""One condition c of the model, in any of the spellings its kind accepts.

Factor models: "shape=triangle,colour=red", {"shape": "triangle"} or an int64 [F] tensor of value
indices (factors not named get their null token). Text-to-image models: a prompt or an embedding
[L, D]. Class-conditional pipelines: a class index."""


def describe(cond: Condition) -> str:
    """A short printable form of a condition."""
    return str(cond.tolist()) if isinstance(cond, Tensor) else repr(cond)


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


class Conditions(ABC):
    """How one model kind spells conditions; subclasses per kind."""

    @abstractmethod
    def one(self, concept: Condition) -> Tensor:
        """One condition as the model's cond tensor."""

    @abstractmethod
    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        """(label, c-) of each concept removed from `pos` (`how`: factor models only)."""

    def batch(self, conds: Any, n: int) -> Tensor:
        """Training conditions of n samples as the model's cond tensor [n, ...]."""
        if isinstance(conds, Tensor):
            return conds
        return torch.stack([self.one(c) for c in conds])


class FactorConditions(Conditions):
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


class TextConditions(Conditions):
    """Text-to-image adapters: prompts become the adapter's condition kind, prompt ids int64 [1]
    (its default) or embeddings [L, D] (adapters given embeddings with set_null_cond)."""

    def __init__(self, adapter: Any, null_cond: Tensor) -> None:
        self.adapter = adapter
        self.ids = not null_cond.is_floating_point()

    def one(self, concept: Condition) -> Tensor:
        if isinstance(concept, Tensor):
            return concept
        if not isinstance(concept, str):
            raise TypeError(f"a text-to-image condition is a prompt or a tensor: {concept!r}")
        return self.batch([concept], 1)[0]

    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        if not isinstance(concept, str):
            raise ValueError("removing a phrase needs the prompt as text; or pass negatives=")
        from ctrak_fast.models.prompts import remove_phrase

        phrases = [remove] if isinstance(remove, str) else list(remove or ())
        if not phrases:
            raise ValueError("a prompt query needs remove= (the concept's phrase) or negatives=")
        return [(f"-{p}", self.one(remove_phrase(concept, p))) for p in phrases]

    def batch(self, conds: Any, n: int) -> Tensor:
        if isinstance(conds, Tensor):
            return conds
        captions = [str(c) for c in conds]
        if self.ids:
            return self.adapter.prompt_ids(captions)  # type: ignore[no-any-return]
        unique = sorted(set(captions))
        emb = self.adapter.encode_prompts(unique)
        row = {c: i for i, c in enumerate(unique)}
        return emb[torch.tensor([row[c] for c in captions])]  # type: ignore[no-any-return]


class ClassConditions(Conditions):
    """UNet2DModel pipelines: int64 [1] class index, or [0] for unconditional models."""

    def __init__(self, n_classes: int | None) -> None:
        self.n_classes = n_classes

    def one(self, concept: Condition) -> Tensor:
        if self.n_classes is None:
            if isinstance(concept, Tensor) and concept.numel() == 0:
                return concept.reshape(0).to(torch.int64)
            raise ValueError("an unconditional model takes no condition (pass an empty tensor)")
        if isinstance(concept, Tensor):
            return concept.reshape(1).to(torch.int64)
        if not isinstance(concept, int) or not 0 <= concept < self.n_classes:
            raise ValueError(f"a condition is a class index in [0, {self.n_classes}): {concept!r}")
        return torch.tensor([concept], dtype=torch.int64)

    def negatives(
        self,
        concept: Condition,
        pos: Tensor,
        remove: str | Sequence[str] | None,
        how: str = "null",
    ) -> list[tuple[str, Negative]]:
        raise ValueError(
            "a class-conditional or unconditional model has no concept to remove: pass "
            "negatives=[another class] (the concept flipped), or use image_query"
        )

    def batch(self, conds: Any, n: int) -> Tensor:
        if conds is None:
            return torch.zeros(n, 0 if self.n_classes is None else 1, dtype=torch.int64)
        if isinstance(conds, Tensor):
            return conds.reshape(n, -1).to(torch.int64)
        return super().batch(conds, n)


__all__ = [
    "ClassConditions",
    "Condition",
    "Conditions",
    "FactorConditions",
    "TextConditions",
    "describe",
]
