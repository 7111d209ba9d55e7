"""What both concept benchmarks (factor tokens: quality.py; prompts: text_quality.py) share: one
loop over the method table that featurizes the training set per method, scores each query with
every method, and turns per-query metrics into the results dict.

A benchmark supplies how its model makes featurizers and query features (a factor model's c- flips
or nulls a factor; a prompt's c- deletes a phrase); everything else is here, so a method added to
method/methods.py appears in both benchmarks without an edit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctrak_fast.bench.protocol import QueryLog, expected_random, summarize_protocols
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.store import FeatureStore
from ctrak_fast.engine.sweep import LambdaSweep
from ctrak_fast.method import diffusion
from ctrak_fast.method.featurize import FeatureSpec, Featurizer, InversionCache
from ctrak_fast.method.methods import METHODS, Method, get_method
from ctrak_fast.method.pipeline import das_row_scale, featurize
from ctrak_fast.method.query import ConceptQuerySpec

SPLITS = ("in_distribution", "heldout")


class MethodSettings:
    """Per-method specs of a benchmark config (a dataclass with `methods`, `dps`, `features` and
    `concept` fields): the method table's defaults unless the config overrides them."""

    # the validation metric that chooses lambda_r (a config may make it a field: QualityConfig)
    select_lambda_by: str = "p@10"

    def feature_spec(self, method: str) -> FeatureSpec:
        """The training features of `method` in this run (dps: concept-trak's)."""
        if method in self.features:
            spec = self.features[method]
        else:
            spec = self.dps if method == "concept-trak" else METHODS[method].feature_spec()
        return self.adjust_spec(spec)

    def adjust_spec(self, spec: FeatureSpec) -> FeatureSpec:
        """Hook for settings every method of a benchmark shares (e.g. a parameter filter)."""
        return spec

    def query_spec(self, row: Method) -> ConceptQuerySpec:
        """Concept-query settings of a concept method: `concept`, then the method's own."""
        return ConceptQuerySpec(**{**self.concept.to_dict(), **row.concept})

    def check_methods(self) -> None:
        """Every method is a table row; the fixed lambda_r is one of the sweep (checked before
        any work)."""
        for m in self.methods:
            get_method(m)
        if self.lambda_r not in self.lambdas:
            raise ValueError(f"lambda_r {self.lambda_r:g} is not in the sweep {list(self.lambdas)}")

    def specs_dict(self) -> dict:
        """The spec fields of to_dict()."""
        return {
            "dps": self.dps.to_dict(),
            "concept": self.concept.to_dict(),
            "features": {m: spec.to_dict() for m, spec in self.features.items()},
        }


@dataclass
class TrainedMethods:
    """Training-side state of every method of a run: featurizers and stores by the method that
    made them, preconditioners by method (das shares d-trak's)."""

    featurizers: dict[str, Featurizer] = field(default_factory=dict)
    stores: dict[str, FeatureStore] = field(default_factory=dict)
    sweeps: dict[str, LambdaSweep] = field(default_factory=dict)  # by store method
    row_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # das: [N] DSM weights
    timings: dict[str, float] = field(default_factory=dict)
    completed: torch.Tensor | None = None  # the captions as the model completed them

    def scores(self, method: str, q: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
        """Scores [n_lambda, N, m] of query features q [m, k] under `method` (its store's
        sweep; DAS: D-TRAK's scores times each sample's DAS weight)."""
        s = self.sweeps[METHODS[method].store_method].scores(q, lambdas)
        return s * self.row_scale[method][None, :, None] if method in self.row_scale else s


def factor_featurizers(model, cfg) -> Callable[[FeatureSpec, Featurizer | None], Featurizer]:
    """featurize_methods' make_featurizer for a factor model: its schedule and null token, the
    run's projection (cfg.k, cfg.projection_seed) and gradient backend, one projection matrix
    shared by every featurizer of the run."""
    sch = diffusion.NoiseSchedule.for_model(model)
    proj = ProjectionSpec(k=cfg.k, seed=cfg.projection_seed)
    null = model.null_cond(1)[0]

    def make_featurizer(spec: FeatureSpec, first: Featurizer | None) -> Featurizer:
        shared = first.projector if first else None
        return Featurizer(
            model, sch, spec, proj, null, grad_backend=cfg.grad_backend, shared_projector=shared
        )

    return make_featurizer


def featurize_methods(
    cfg: MethodSettings,
    make_featurizer: Callable[[FeatureSpec, Featurizer | None], Featurizer],
    x0: torch.Tensor,
    conds: torch.Tensor,
    ids: torch.Tensor,
    out_dir: Path,
    progress: bool = True,
    complete: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainedMethods:
    """Featurize x0 [N,...] / conds [N,...] / ids [N] once per store the methods need (in table
    order; stores under out_dir/stores/<method>, resumed when present) and factor each Gram.

    make_featurizer(spec, first): a featurizer for `spec`; `first` is the run's first featurizer
    (None for the first), whose projector the others should share (one projection matrix).
    cfg: a benchmark config (methods, feature_spec(), batch_size, store_dtype).
    complete(x0, conds): the captions as the model completes them (method/completion.py), the
    conditions of the methods with `complete_captions`; None: conds. A method whose spec and
    conditions equal an earlier method's shares its store (no second featurization)."""
    methods, spec_for, batch_size, dtype = (
        cfg.methods,
        cfg.feature_spec,
        cfg.batch_size,
        cfg.store_dtype,
    )
    rows = [METHODS[m] for m in methods]
    need = {r.store_method for r in rows if r.has_features}
    das_for = {r.store_method for r in rows if r.das}
    out = TrainedMethods()
    first: Featurizer | None = None
    completed = None
    if complete is not None and any(METHODS[n].complete_captions for n in need):
        tic = time.time()
        completed = complete(x0, conds)
        out.timings["complete captions"] = time.time() - tic
    if completed is not None and not torch.equal(completed, conds):  # else nothing to complete
        out.completed = completed
    made: dict[tuple, str] = {}  # (spec, completed?) -> the method whose store holds it
    alias: dict[str, str] = {}
    for name in (n for n in METHODS if n in need):
        own = completed if METHODS[name].complete_captions and completed is not None else conds
        key = (json.dumps(spec_for(name).to_dict(), sort_keys=True), torch.equal(own, conds))
        if key in made and name not in das_for:
            alias[name] = made[key]
            out.featurizers[name] = out.featurizers[made[key]]
            out.stores[name] = out.stores[made[key]]
            continue
        made[key] = name
        fz = make_featurizer(spec_for(name), first)
        # one cache of DDIM inversions and query draws for every method of the run
        fz.inversion_cache = first.inversion_cache if first else InversionCache()
        first = first or fz
        out.featurizers[name] = fz
        das = out_dir / "stores" / "das" if name in das_for else None
        tic = time.time()
        out.stores[name] = featurize(
            fz,
            x0,
            own,
            ids,
            out_dir / "stores" / name,
            batch_size=batch_size,
            dtype=dtype,
            das_path=das,
            progress=progress,
        )
        out.timings[f"featurize {name}"] = time.time() - tic
        if das is not None:
            for r in rows:
                if r.das and r.store_method == name:
                    out.stores[r.name] = FeatureStore.open(das)
    # One eigendecomposition per store serves every lambda_r of the sweep.
    for name in out.featurizers:
        if name in alias:
            out.sweeps[name] = out.sweeps[alias[name]]
            continue
        phi = out.stores[name].read_all()[0].double()
        out.sweeps[name] = LambdaSweep(phi)
        for r in rows:
            if r.das and r.store_method == name:
                das = out.stores[r.name].read_all()[0].double()
                out.row_scale[r.name] = das_row_scale(phi, das)
    return out


def method_scores(
    trained: TrainedMethods,
    methods: Sequence[str],
    concept_features: Callable[[Method, Featurizer], torch.Tensor],
    image_features: Callable[[Featurizer], torch.Tensor],
    pixel_scores: Callable[[], torch.Tensor],
    n_factors: int,
    lambdas: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Scores of one query for every method: [n_lambda, N, n_factors] (pixel: [1, N, n_factors]);
    column f ranks the training set for the query's factor f (whole-image methods give every
    factor the same column).

    concept_features(row, featurizer) -> [n_factors, k]: one concept query per factor;
    image_features(featurizer) -> [1, k]: the query image under the training recipe;
    pixel_scores() -> [N, 1]."""
    scores: dict[str, torch.Tensor] = {}
    made: dict[tuple, torch.Tensor] = {}  # one query per featurizer and query recipe
    for name in methods:
        row = METHODS[name]
        if row.query == "pixel":
            scores[name] = pixel_scores()[None].expand(-1, -1, n_factors)
            continue
        fz = trained.featurizers[row.store_method]
        key = (id(fz), row.query, json.dumps(row.concept, sort_keys=True))
        if key not in made:
            made[key] = concept_features(row, fz) if row.query == "concept" else image_features(fz)
        s = trained.scores(name, made[key], lambdas)  # [n_lambda, N, m]
        scores[name] = s if row.query == "concept" else s.expand(-1, -1, n_factors)
    return scores


def pixel_cosine(train_images: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of pixels: train_images [N,C,H,W], image [C,H,W] -> [N, 1]."""
    a = torch.nn.functional.normalize(train_images.flatten(1), dim=1)
    b = torch.nn.functional.normalize(image.flatten()[None], dim=1)
    return a @ b.T


def summarize(log: QueryLog, cfg, labels: torch.Tensor, data, splits: dict) -> dict:
    """The results fields both benchmarks share: the three lambda protocols with CIs and the
    calibration rows (protocol.py), the expected random ranking, chance, query counts, the
    configuration and the held-out combinations. splits: {split: its combinations}."""
    factors = list(data.factors)
    out = summarize_protocols(log, cfg.methods, cfg.lambda_r, cfg.select_lambda_by)
    out["expected_random"] = {
        split: {f: expected_random(labels, combos, i) for i, f in enumerate(factors)}
        for split, combos in splits.items()
    }
    out["chance"] = {
        f: {v: (labels[:, i] == j).float().mean().item() for j, v in enumerate(data.values[f])}
        for i, f in enumerate(factors)
    }
    out["n_train"] = len(labels)
    out["lambdas"] = list(log.lambdas)
    out["k"] = cfg.k
    out["config"] = cfg.to_dict()
    out["heldout_combos"] = [
        {f: data.values[f][v] for f, v in zip(factors, c, strict=True)} for c in data.heldout
    ]
    return out


def at_chosen_lambda(gallery: list[dict], lambda_r: dict[str, float], lambdas) -> list[dict]:
    """Gallery entries with each method's scores [N, F] at its chosen lambda_r (pixel: its one
    ranking)."""
    return [
        {**g, "scores": {m: chosen_row(m, lambda_r, lambdas, s) for m, s in g["scores"].items()}}
        for g in gallery
    ]


TOP = 100  # each query's top training ids and scores kept in results.json, per method


def chosen_row(method: str, lambda_r: dict, lambdas, scores: torch.Tensor) -> torch.Tensor:
    """`method`'s scores [N, ...] at its chosen lambda_r (a one-row ranking: that row)."""
    return scores[list(lambdas).index(lambda_r[method])] if len(scores) > 1 else scores[0]


def top_entries(
    scores: dict[str, torch.Tensor], lambda_r: dict, lambdas, ids: torch.Tensor, factors=None,
    top: int = TOP,
) -> dict:  # fmt: skip
    """Each method's `top` training ids and scores at its chosen lambda_r, so that a new baseline
    or metric can be scored later without recomputing: {method: {"ids", "scores"}} for scores
    [n_lambda, N]; {method: {factor: {...}}} for scores [n_lambda, N, F] and `factors`."""

    def best(v: torch.Tensor) -> dict:
        t = torch.topk(v.float(), min(top, len(v)))
        return {
            "ids": ids[t.indices].tolist(),
            "scores": [float(f"{x:.5g}") for x in t.values.tolist()],
        }

    out = {}
    for m, s in scores.items():
        v = chosen_row(m, lambda_r, lambdas, s)
        out[m] = best(v) if factors is None else {f: best(v[:, i]) for i, f in enumerate(factors)}
    return out


__all__ = [
    "TOP",
    "at_chosen_lambda",
    "chosen_row",
    "top_entries",
    "SPLITS",
    "MethodSettings",
    "TrainedMethods",
    "factor_featurizers",
    "featurize_methods",
    "method_scores",
    "pixel_cosine",
    "summarize",
]
