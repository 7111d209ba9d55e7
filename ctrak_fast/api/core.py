"""The Attributor's steps behind its public methods (api/__init__.py keeps those, their
signatures and docstrings): the method's specs, generation, the concept and whole-image queries
and attribution, as functions of the Attributor's parts (its model kind, featurizer and method).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from ctrak_fast.engine.store import FORMAT_VERSION, FeatureStore
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.losses import region_meta, region_on_grid
from ctrak_fast.method.methods import GRADIENT_METHODS, get_method
from ctrak_fast.method.pipeline import PreconditionerCache, scored_store, search
from ctrak_fast.method.query import ConceptQuerySpec, image_query_features
from ctrak_fast.models.base import Condition, ModelKind
from ctrak_fast.results import Attribution, Query, check_query_store, check_store_readable

# Up to this k the Attributor keeps the Gram (k^2 doubles: 0.5 GB) for cheap lambda changes.
KEEP_GRAM_MAX_K = 8192


def method_spec(method: str, spec: FeatureSpec | None) -> FeatureSpec:
    """The method's feature spec (its paper settings), or `spec` checked against the method."""
    row = get_method(method, GRADIENT_METHODS)
    return row.feature_spec() if spec is None else row.check_spec(spec)


def default_query_spec(kind: ModelKind, fz: Featurizer, method: str) -> ConceptQuerySpec:
    """The kind's slider weight at the feature timesteps, with the method's concept settings."""
    base = {"weight": kind.query_weight, "timesteps": fz.spec.timesteps}
    return ConceptQuerySpec(**{**base, **get_method(method).concept})


def generate(
    kind: ModelKind,
    concept: Condition,
    n: int = 1,
    *,
    seed: int = 0,
    guidance: float | None = None,
    steps: int = 50,
) -> Tensor:
    """Images of a condition with DDIM and CFG (guidance: the kind's default when None)."""
    guidance = kind.guidance if guidance is None else guidance
    cond = kind.conditions.one(concept)
    return kind.generate(cond, n, seed=seed, guidance=guidance, steps=steps)


def query(
    kind: ModelKind,
    fz: Featurizer,
    method: str,
    qspec: ConceptQuerySpec,
    concept: Condition,
    remove: str | Sequence[str] | None,
    negatives: Sequence[Condition],
    image: Tensor | None,
    region: Any,
) -> Query:
    """Attributor.query with the spec overrides applied: the concept slider, or the whole-image
    query of the baselines."""
    pos = kind.conditions.one(concept)
    if region is not None and qspec.draws != "local":
        raise ValueError("a region points into the query image: it needs draws='local'")
    if get_method(method).query != "concept":
        if remove or negatives:
            raise ValueError(f"{method} queries are whole-image: nothing to remove")
        if image is None:
            image = generate(kind, concept, seed=qspec.seed)[0]
        q = image_query(kind, fz, image[None], pos[None], ("image",), region)
        return Query(q.features, q.labels, {**q.meta, "query": qspec.to_dict()}, image)
    negs = kind.removals(concept, pos, remove, negatives, qspec.negative)
    if image is None and qspec.draws == "local":
        image = generate(kind, concept, seed=qspec.seed)[0]
    feats = kind.concept_query(fz, qspec, pos, negs, image, region)
    meta = {**fz.meta(), "kind": "concept", "query": qspec.to_dict(), "concept": str(concept)}
    if region is not None:
        meta["region"] = region_meta(region)
    return Query(feats, tuple(label for label, _ in negs), meta, image)


def image_query(
    kind: ModelKind,
    fz: Featurizer,
    images: Tensor,
    conds: Tensor,
    labels: tuple[str, ...],
    region: Any = None,
) -> Query:
    """Whole-image query features of images [Q, C, H, W] under their condition tensor."""
    x0 = kind.encode(images)
    weight = region_on_grid(region, images[0], x0[0])
    feats = image_query_features(fz, x0, conds, weight)
    meta = {**fz.meta(), "kind": "image"}
    if region is not None:
        meta["region"] = region_meta(region)
    return Query(feats, labels, meta, images[0] if len(images) == 1 else None)


def attribute(
    fz: Featurizer,
    method: str,
    pre: PreconditionerCache,
    query: Query | Tensor,
    store: FeatureStore | str | os.PathLike[str],
    k: int,
    *,
    lambda_r: float,
    tails: Literal["top", "bottom", "both"],
    backend: Literal["auto", "cpu", "cuda", "reference"],
) -> Attribution:
    """Attributor.attribute: the store checked against the featurizer, solved, searched."""
    st = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    check_store(fz, st)
    feats = query.features if isinstance(query, Query) else query
    feats = feats.reshape(-1, feats.shape[-1]) if feats.dim() == 1 else feats
    if feats.shape[-1] != st.k:
        raise ValueError(f"query features have k={feats.shape[-1]}, the store k={st.k}")
    if isinstance(query, Query):
        check_query_store(st, query.meta)
        labels = query.labels
    else:
        labels = tuple(f"query {i}" for i in range(len(feats)))
    u = pre.get(st, lambda_r).solve(feats)
    scored = scored_store(st, get_method(method).das)  # DAS: D-TRAK's u, DAS rows
    if scored is not st:
        check_store(fz, scored, das=scored.meta["das"])
    res = search(scored, u, k, tails=tails, backend=backend)
    return Attribution.from_topk(res, labels, lambda_r)


def check_store(fz: Featurizer, st: FeatureStore, das: Any = None) -> None:
    """The store is readable by this build and made with the featurizer's specs (and `das`)."""
    check_store_readable(st, FORMAT_VERSION)
    st.check_compatible(fz.meta() if das is None else {**fz.meta(), "das": das})
