"""THE table of attribution methods (METHOD.md §3-6). Every front reads it: the Attributor, the
CLI (`ctrak featurize|query|attribute`, `ctrak t2i`) and both benchmarks. A new method is one row
here.

| method | training features | query |
|---|---|---|
| concept-trak-cond | concept-trak's on the condition path, per-layer norm | its slider, same |
| | | parameters and norm, averaged over the concept's contexts |
| concept-trak-complete | concept-trak-cond's, each image under its caption as the | the same |
| | model completes it (completion.py: a left-out factor -> its best-denoising value) | |
| concept-trak | DPS loss, DDIM inversion, per-t norm | concept slider: c+ vs c- (concept out) |
| trak | DSM loss at fixed noise | the same loss on the query image |
| d-trak | mean(eps^2) at fixed noise | the same on the query image |
| das | d-trak rows x summed DSM loss | d-trak query |
| pixel | - (cosine similarity of pixels) | the query image |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on use: the CLI parser reads this table without importing torch
    from .featurize import FeatureSpec
    from .query import ConceptQuerySpec

QUERY_KINDS = ("concept", "image", "pixel")
CONDITION_PATH = "@condition"  # = grads.layout.CONDITION_PATH (not imported: no torch here)


@dataclass(frozen=True)
class Method:
    """One attribution method.

    name: what users type. loss: training-side loss of FeatureSpec (None: no gradient features).
    inversion: training x_t from DDIM inversion (else one fixed noise per timestep).
    query: "concept" (concept slider, METHOD.md §5), "image" (the training recipe applied to the
        query image) or "pixel" (cosine similarity of pixels, no model).
    das: scores are D-TRAK scores times the sample's summed DSM loss (rows of a second store).
    store: the method whose training store this one reads (das: d-trak's, with its DAS rows).
    feature: further FeatureSpec defaults; concept: ConceptQuerySpec defaults of concept queries.
    complete_captions: the training side conditions each image on its caption as the model
        completes it (method/completion.py) rather than as written; with complete captions it
        is the method without completion.

    Examples:
        >>> METHODS["concept-trak"].feature_spec().loss, METHODS["das"].store
        ('dps', 'd-trak')
    """

    name: str
    loss: str | None
    inversion: bool
    query: str
    das: bool = False
    store: str | None = None
    summary: str = ""
    feature: dict[str, Any] = field(default_factory=dict)
    concept: dict[str, Any] = field(default_factory=dict)
    complete_captions: bool = False

    def __post_init__(self) -> None:
        if self.query not in QUERY_KINDS:
            raise ValueError(f"query kind must be one of {QUERY_KINDS}, got {self.query!r}")

    @property
    def has_features(self) -> bool:
        """False for methods that need no gradient features (pixel)."""
        return self.loss is not None

    @property
    def store_method(self) -> str:
        """The method whose featurization this one's store comes from."""
        return self.store or self.name

    def feature_spec(self, **overrides: Any) -> FeatureSpec:
        """This method's FeatureSpec: its defaults, then `overrides` (FeatureSpec fields)."""
        from .featurize import FeatureSpec

        if not self.has_features:
            raise ValueError(f"method {self.name!r} has no gradient features")
        kw = {"loss": self.loss, "inversion": self.inversion, **self.feature, **overrides}
        return FeatureSpec(**kw)

    def query_spec(self, **overrides: Any) -> ConceptQuerySpec:
        """This method's concept-query settings: its defaults, then `overrides`."""
        from .query import ConceptQuerySpec

        return ConceptQuerySpec(**{**self.concept, **overrides})

    def check_spec(self, spec: FeatureSpec) -> FeatureSpec:
        """`spec` if this method can use it, else ValueError naming the mismatch."""
        if spec.loss != self.loss:
            raise ValueError(
                f"method {self.name!r} uses loss {self.loss!r}, the spec has {spec.loss!r}"
            )
        if self.das and spec.inversion:
            raise ValueError(
                f"method {self.name!r} needs fixed-noise features (FeatureSpec(inversion=False))"
            )
        return spec


# concept-trak-cond's knobs (ours), shared by the rows built on it
COND_FEATURE: dict[str, Any] = {"normalize": "layer", "param_filter": CONDITION_PATH}
COND_QUERY: dict[str, Any] = {
    "normalize": "layer",
    "contexts": True,
    "negative": "flip",
    "draw_cfg": "null",
}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "concept-trak-cond",
            "dps",
            True,
            "concept",
            summary="Concept-TRAK on the condition path (ours): the paper's DPS features at "
            "DDIM-inverted x_t and its concept slider, both restricted to the modules that read "
            "the condition, normalised layer by layer, the slider averaged over the contexts "
            "that share the concept",
            feature=COND_FEATURE,
            concept=COND_QUERY,
        ),
        Method(
            "concept-trak-complete",
            "dps",
            True,
            "concept",
            summary="concept-trak-cond with each training image conditioned on its caption as "
            "the model completes it: a factor the caption leaves out gets the value under which "
            "the model denoises the image best",
            feature=COND_FEATURE,
            concept=COND_QUERY,
            complete_captions=True,
        ),
        Method(
            "concept-trak",
            "dps",
            True,
            "concept",
            summary="Concept-TRAK as published: DPS loss at DDIM-inverted x_t, concept slider",
        ),
        Method("trak", "dsm", False, "image", summary="TRAK: DSM loss at fixed noise"),
        Method("d-trak", "eps-norm", False, "image", summary="D-TRAK: mean(eps^2) at fixed noise"),
        Method(
            "das",
            "eps-norm",
            False,
            "image",
            das=True,
            store="d-trak",
            summary="DAS: D-TRAK scores times the summed DSM loss",
        ),
        Method("pixel", None, False, "pixel", summary="cosine similarity of pixels"),
    )
}
"""Every method, in table order."""

GRADIENT_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.has_features)
"""The methods with gradient features (what an Attributor implements)."""
FEATURIZE_METHODS: tuple[str, ...] = tuple(m for m in GRADIENT_METHODS if METHODS[m].store is None)
"""The methods that make their own training store (das reads d-trak's, with its DAS rows)."""


def get_method(name: str, allowed: tuple[str, ...] | None = None) -> Method:
    """The table row `name`; ValueError naming the choices otherwise."""
    choices = allowed or tuple(METHODS)
    if name not in choices:
        raise ValueError(f"unknown method {name!r}; expected one of {list(choices)}")
    return METHODS[name]


def parse_methods(text: str, what: str = "--methods") -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each a row of the table; ValueError naming the unknown ones."""
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown} in {what}; choose from {list(METHODS)}")
    return names


__all__ = [
    "CONDITION_PATH",
    "FEATURIZE_METHODS",
    "GRADIENT_METHODS",
    "METHODS",
    "Method",
    "get_method",
    "parse_methods",
]
