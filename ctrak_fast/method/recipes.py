"""Named recipes: the knobs where our Concept-TRAK and the authors' synthetic-benchmark code differ
(METHOD.md §10), as FeatureSpec / ConceptQuerySpec overrides. A flag per knob overrides a recipe.

- ours: eps of the inversion step at t_{i+1}; inversion and local draws guided against the null
  token; global draws by DDIM, each used at every timestep.
- paper: eps at t_i; the training inversion guided against a random other condition redrawn every
  step; the query's c- one random other value per draw (two values: the flipped one), which also
  guides the local inversion; global draws by ancestral DDPM, each stopped at one random timestep
  of the set (36 draws: the 4 x 9 points of ours, so both cost the same gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INVERSION_NEGATIVES = ("null", "random", "flip")  # FeatureSpec.inversion_negative
FEATURE_KNOBS = ("inversion_eps", "inversion_negative")
CONCEPT_KNOBS = ("negative", "draw_cfg", "sampler", "points", "n_draws")


@dataclass(frozen=True)
class Recipe:
    name: str
    feature: dict[str, Any] = field(default_factory=dict)
    concept: dict[str, Any] = field(default_factory=dict)  # every draw kind
    global_concept: dict[str, Any] = field(default_factory=dict)  # draws="global" only

    def concept_overrides(self, draws: str) -> dict[str, Any]:
        return {**self.concept, **(self.global_concept if draws == "global" else {})}


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("ours"),
        Recipe(
            "paper",
            feature={"inversion_eps": "current", "inversion_negative": "random"},
            concept={"negative": "random", "draw_cfg": "negative"},
            global_concept={"sampler": "ddpm", "points": "random", "n_draws": 36},
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {list(RECIPES)}")
    return RECIPES[name]


def recipe_options(
    name: str, draws: str, knobs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(FeatureSpec overrides, ConceptQuerySpec overrides) of recipe `name` for `draws`, each knob
    of `knobs` that is not None (a flag given) replacing the recipe's value."""
    unknown = set(knobs) - set(FEATURE_KNOBS) - set(CONCEPT_KNOBS)
    if unknown:
        raise ValueError(f"not recipe knobs: {sorted(unknown)}")
    r = get_recipe(name)
    feature, concept = dict(r.feature), r.concept_overrides(draws)
    for key, value in knobs.items():
        if value is not None:
            (feature if key in FEATURE_KNOBS else concept)[key] = value
    return feature, concept
