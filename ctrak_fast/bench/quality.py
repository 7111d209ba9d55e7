"""The synthetic concept benchmark (METHOD.md §9, BENCHMARKS.md §1).

Featurize a training set with every method of the method table (method/methods.py), generate
judge-confirmed query images for seen (in-distribution) and held-out (shape, colour) combinations,
attribute each query, and score the rankings against the exact labels: P@1/5/10, AP over the full
ranking, and specificity (how many of the top-10 also carry the query's other factor values), per
factor and split. A concept method's c- is the factor flipped to each other value (the paper's
synthetic setting) or set to its null token (`negative`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ctrak_fast.bench.harness import (
    MethodSettings,
    featurize_methods,
    method_scores,
    new_per_query,
    pixel_cosine,
    record_query,
    summarize,
)
from ctrak_fast.data import ConceptDataset
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.method import diffusion
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.method.methods import METHODS as TABLE
from ctrak_fast.method.query import ConceptQuerySpec, concept_query_features, image_query_features
from ctrak_fast.models.factor_unet import drop_factor, flip_factor

METHODS = tuple(TABLE)
METRICS = ("p@1", "p@5", "p@10", "ap", "specificity")


@dataclass
class QualityConfig(MethodSettings):
    """Benchmark settings. Defaults are sized for the 2-core demo (see README)."""

    per_combo: int = 30  # training images per seen combination that are featurized
    k: int = 512
    projection_seed: int = 0
    queries_per_combo: int = 2
    query_guidance: float = 2.0  # CFG of the generated query images (judge accuracy is best at 2)
    query_candidates: int = 8  # generated per combination; the judge keeps the correct ones
    lambda_r: float = 1.0
    batch_size: int = 50
    store_dtype: str = "float32"
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    dps: FeatureSpec = field(default_factory=FeatureSpec)
    concept: ConceptQuerySpec = field(default_factory=ConceptQuerySpec)
    grad_backend: str = "hooks"
    # c- of a concept query: the factor flipped to each other value (eps averaged), as the
    # paper does on its synthetic data (METHOD.md §5), or set to its null token.
    negative: str = "flip"
    # FeatureSpec per method where it departs from the method table's (dps: concept-trak's).
    features: dict[str, FeatureSpec] = field(default_factory=dict)

    def __post_init__(self):
        if self.negative not in ("null", "flip"):
            raise ValueError(f"negative must be 'null' or 'flip', got {self.negative!r}")
        self.check_methods()

    def to_dict(self) -> dict:
        return {**asdict(self), **self.specs_dict()}


def make_queries(model, judge, combos, cfg: QualityConfig, progress=True):
    """Generate query images per combination and keep those the judge confirms.

    Returns a list of dicts {combo: (s, c), image: [C,H,W], seed} and per-combo acceptance counts.
    """
    queries, accepted = [], {}
    for ci, combo in enumerate(tqdm(combos, desc="queries", disable=not progress)):
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + ci)
        cond = torch.tensor(combo, dtype=torch.long)[None].expand(cfg.query_candidates, -1)
        x0, _ = diffusion.ddim_sample(model, cond, guidance=cfg.query_guidance, generator=gen)
        x0 = x0.clamp(-1, 1)
        ok = (judge.predict(x0) == cond).all(1)
        accepted[tuple(combo)] = (int(ok.sum()), cfg.query_candidates)
        for i in ok.nonzero().flatten()[: cfg.queries_per_combo].tolist():
            queries.append({"combo": tuple(combo), "image": x0[i]})
    return queries, accepted


def run_quality(
    model, judge, data: ConceptDataset, cfg: QualityConfig, out_dir, progress=True
) -> dict:
    """Run the benchmark; returns the results dict (also written to out_dir/results.json)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    sch = diffusion.NoiseSchedule.for_model(model)
    train = data.train_subset(cfg.per_combo)
    labels, null = train.labels, model.null_cond(1)[0]
    proj = ProjectionSpec(k=cfg.k, seed=cfg.projection_seed)

    def make_featurizer(spec: FeatureSpec, first: Featurizer | None) -> Featurizer:
        return Featurizer(
            model,
            sch,
            spec,
            proj,
            null,
            grad_backend=cfg.grad_backend,
            shared_projector=first.projector if first else None,  # one projection matrix
        )

    trained = featurize_methods(
        cfg.methods,
        cfg.feature_spec,
        make_featurizer,
        train.images,
        train.labels,
        train.ids,
        out_dir,
        batch_size=cfg.batch_size,
        dtype=cfg.store_dtype,
        lambda_r=cfg.lambda_r,
        progress=progress,
    )
    timings = dict(trained.timings)
    splits = {
        "in_distribution": [tuple(c) for c in data_combos(data, "seen")],
        "heldout": list(data.heldout),
    }
    n_factors = len(data.factors)
    per_query = new_per_query(cfg.methods, data.factors)
    gallery, acceptance = [], {}
    tic = time.time()
    for split, combos in splits.items():
        queries, accepted = make_queries(model, judge, combos, cfg, progress)
        for qi, q in enumerate(tqdm(queries, desc=f"attribute {split}", disable=not progress)):
            combo, image = q["combo"], q["image"]
            cond = torch.tensor(combo, dtype=torch.long)

            def concept(row, fz, cond=cond, image=image):
                negs = [negative(cond, f, model, cfg.negative) for f in range(n_factors)]
                return concept_query_features(fz, cfg.query_spec(row), cond, negs, image=image)

            scores = method_scores(
                trained,
                cfg.methods,
                concept,
                lambda fz, cond=cond, image=image: image_query_features(
                    fz, image[None], cond[None]
                ),
                lambda image=image: pixel_cosine(train.images, image),
                n_factors,
            )
            record_query(per_query, scores, labels, combo, split, data.factors)
            if qi == 0:
                gallery.append({"split": split, "combo": combo, "image": image, "scores": scores})
        acceptance[split] = {f"{s},{c}": v for (s, c), v in accepted.items()}
    timings["queries + attribution"] = time.time() - tic

    results = {
        **summarize(per_query, labels, data.factors, data.values),
        "query_acceptance": acceptance,
        "k": cfg.k,
        "seconds": time.time() - t0,
        "timings": timings,
        "config": cfg.to_dict(),
        "heldout_combos": [
            {f: data.values[f][v] for f, v in zip(data.factors, c, strict=True)}
            for c in data.heldout
        ],
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    results["_gallery"] = gallery
    results["_train"] = train
    return results


def negative(cond: torch.Tensor, f: int, model, how: str):
    """c- of a concept query for factor f: the factor flipped to each of its other values (eps
    averaged; the paper's synthetic setting) or set to its null token."""
    return flip_factor(cond, f, model) if how == "flip" else drop_factor(cond[None], f, model)[0]


def data_combos(data: ConceptDataset, which: str) -> list[tuple[int, int]]:
    combos = sorted({tuple(r) for r in data.labels.tolist()})
    if which == "seen":
        return [c for c in combos if c not in set(data.heldout)]
    return combos


def format_table(results: dict) -> str:
    """Markdown table: P@10 / AP per method, split and factor, with chance."""
    factors = list(results["chance"])
    head = "| method | " + " | ".join(
        f"{s} {f} P@10 / AP" for s in ("in_distribution", "heldout") for f in factors
    )
    lines = [head + " |", "|---" * (1 + 2 * len(factors)) + "|"]
    for m, by_split in results["methods"].items():
        cells = []
        for s in ("in_distribution", "heldout"):
            for f in factors:
                r = by_split.get(s, {}).get(f, {})
                cells.append(f"{r['p@10']:.2f} / {r['ap']:.2f}" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    chance = ", ".join(
        f"{f}: {min(v.values()):.2f}-{max(v.values()):.2f}" for f, v in results["chance"].items()
    )
    lines.append(
        f"\nchance P@10 (value frequency): {chance}; n_train={results['n_train']}, k={results['k']}"
    )
    return "\n".join(lines)


def gallery_entries(results: dict):
    """(split, combo, image, scores) entries kept for the PNG gallery."""
    return results.get("_gallery", [])


__all__ = ["QualityConfig", "run_quality", "format_table", "METHODS"]
