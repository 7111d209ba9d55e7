"""The uncaptioned-mark benchmark (`ctrak bench mark`): which training images taught the model to
draw a mark that no caption names?

A model is trained on the synthetic shapes with a small glyph stamped on part of its images
(data/marks.py: never captioned, its position, size and tint jittered). Queries are the model's
own samples in which an independent detector (train/mark_judge.py) finds the mark; the concept is
given as the region the detector boxes. Ground truth: the stamped training images.

Every gradient method is asked twice: with its loss restricted to the region (the concept as
given), and on the whole image (the method as published). Three pixel rows calibrate what plain
pixels can do: the whole image, the same region of every training image (a fixed place: the mark
moves, so this cannot find it), and the region's patch searched at every place of every training
image (normalised cross-correlation: template matching, which a stamped mark invites). A caption
lookup has nothing to read (no caption names the mark): its row is a random ranking.
lambda_r is chosen per row on validation queries (by AP), reported on disjoint test queries.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctrak_fast.bench.harness import (
    TOP,
    MethodSettings,
    chosen_row,
    factor_featurizers,
    featurize_methods,
    pixel_cosine,
    top_entries,
)
from ctrak_fast.bench.mark_scoring import (
    MARK_METRICS,
    mark_metrics,
    patch_search,
    row_results,
)
from ctrak_fast.bench.protocol import LAMBDAS
from ctrak_fast.bench.report import gallery
from ctrak_fast.data import ConceptDataset
from ctrak_fast.data.dataset import images_tensor
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.method import diffusion
from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.method.losses import region_mask, region_weight
from ctrak_fast.method.methods import METHODS as TABLE
from ctrak_fast.method.query import ConceptQuerySpec, image_query_features
from ctrak_fast.progress import progress as show_progress

MARK_METHODS = ("concept-trak-cond", "concept-trak", "trak", "d-trak", "das", "pixel")
REGION, WHOLE = "region", "whole image"
GALLERY_ROWS = (
    "concept-trak · region",
    "concept-trak-cond · region",
    "d-trak · region",
    "d-trak · whole image",
    "das · whole image",
    "pixel · patch search (any place)",
)


@dataclass
class MarkConfig(MethodSettings):
    """Settings of the mark benchmark. Defaults are sized for 2 cores (about 10 minutes)."""

    per_combo: int = 30  # training images per seen combination that are featurized
    k: int = 2048
    projection_seed: int = 0
    candidates: int = 320  # generated query candidates; the mark judge keeps those with a mark
    queries: int = 24  # kept (alternately validation and test)
    # samples without the mark, asked about a region of a query's size: a method that finds the
    # stamped images whatever it is asked (they are harder to denoise) scores high on them too
    controls: int = 12
    control_below: float = 0.05  # the mark judge's score a control must stay under
    min_test_queries: int = 8
    guidance: float = 2.0  # CFG of the generated candidates
    threshold: float = 0.5  # the mark judge's per-pixel probability a query needs
    pad: int = 1  # the region: the judge's box grown by this many pixels
    lambda_r: float = 1.0
    select_lambda_by: str = "ap"
    lambdas: tuple[float, ...] = LAMBDAS
    batch_size: int = 50
    store_dtype: str = "float32"
    seed: int = 0
    top: int = TOP  # each query's top ids and scores kept in results.json, per row
    methods: tuple[str, ...] = MARK_METHODS
    dps: FeatureSpec = field(default_factory=FeatureSpec)
    concept: ConceptQuerySpec = field(default_factory=ConceptQuerySpec)
    grad_backend: str = "hooks"
    features: dict[str, FeatureSpec] = field(default_factory=dict)

    def __post_init__(self):
        if self.queries < 2 * self.min_test_queries:
            raise ValueError(
                f"{self.queries} queries cannot hold {self.min_test_queries} test queries "
                "beside as many validation queries"
            )
        self.check_methods()

    def to_dict(self) -> dict:
        return {**asdict(self), **self.specs_dict()}


def draw_mark_queries(model, mark_judge, combos, cfg: MarkConfig, progress: bool = True):
    """Generate cfg.candidates samples (cycling over `combos`) and keep the first cfg.queries in
    which the mark judge finds the mark ({"combo", "image", "box", "score"}), the first
    cfg.controls in which it sees none (score below cfg.control_below; their box: a found
    query's box size at a random place), and the count found among the candidates."""
    found, queries, plain = 0, [], []
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    batches = range(0, cfg.candidates, 64)
    for start in show_progress(batches, desc="mark queries", unit="batch", enabled=progress):
        n = min(64, cfg.candidates - start)
        cond = torch.tensor([combos[(start + i) % len(combos)] for i in range(n)])
        x0, _ = diffusion.ddim_sample(model, cond, guidance=cfg.guidance, generator=gen)
        x0 = x0.clamp(-1, 1)
        score, boxes = mark_judge.detect(x0, cfg.threshold)
        size = x0.shape[-1]
        for i in range(n):
            q = {"combo": tuple(cond[i].tolist()), "image": x0[i], "score": float(score[i])}
            if score[i] < cfg.control_below and len(plain) < cfg.controls:
                plain.append(q)
            if score[i] < cfg.threshold:
                continue
            found += 1
            x0_, y0, x1, y1 = boxes[i].tolist()
            q["box"] = [max(0, x0_ - cfg.pad), max(0, y0 - cfg.pad)]
            q["box"] += [min(size, x1 + cfg.pad), min(size, y1 + cfg.pad)]
            if len(queries) < cfg.queries:
                queries.append(q)
    where = torch.Generator().manual_seed(cfg.seed * 7919 + 29)  # the control regions' places
    for i, q in enumerate(plain if queries else []):
        x0_, y0, x1, y1 = queries[i % len(queries)]["box"]
        w, h, size = x1 - x0_, y1 - y0, q["image"].shape[-1]
        x = int(torch.randint(size - w + 1, (1,), generator=where))
        y = int(torch.randint(size - h + 1, (1,), generator=where))
        q["box"] = [x, y, x + w, y + h]
    return queries, plain, found


def query_scores(trained, cfg: MarkConfig, train, q) -> dict[str, torch.Tensor]:
    """Scores of one query for every row: {row: [n_lambda, N]} (pixel rows: [1, N])."""
    image, box = q["image"], q["box"]
    cond = torch.tensor(q["combo"], dtype=torch.long)[None]
    size = tuple(image.shape[-2:])  # a factor model's loss is on the pixels' grid
    weight = region_weight(region_mask(box, *size), size)
    out: dict[str, torch.Tensor] = {}
    for name in cfg.methods:
        row = TABLE[name]
        if not row.has_features:
            x0, y0, x1, y1 = box
            out[f"{name} · {WHOLE}"] = pixel_cosine(train.images, image).T
            crop = train.images[:, :, y0:y1, x0:x1]
            out[f"{name} · {REGION} (fixed place)"] = pixel_cosine(crop, image[:, y0:y1, x0:x1]).T
            out[f"{name} · patch search (any place)"] = patch_search(train.images, image, box)[None]
            continue
        fz = trained.featurizers[row.store_method]
        for what, region in ((REGION, weight), (WHOLE, None)):
            qf = image_query_features(fz, image[None], cond, region=region)
            out[f"{name} · {what}"] = trained.scores(name, qf, cfg.lambdas)[:, :, 0]
    return out


def run_mark(
    model, mark_judge, data: ConceptDataset, cfg: MarkConfig, out_dir, progress=True
) -> dict:
    """Run the benchmark; returns the results dict (also written to out_dir/results.json)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data.marks is None:
        raise ValueError("the data set has no stamped marks (train with --mark-fraction)")
    model.eval()
    train = data.train_subset(cfg.per_combo)
    truth = train.marked
    seen = [c for c in data.combos() if c not in set(data.heldout)]
    tic = time.time()
    queries, controls, found = draw_mark_queries(model, mark_judge, seen, cfg, progress)
    roles = ["validation" if i % 2 == 0 else "test" for i in range(len(queries))]
    if roles.count("test") < cfg.min_test_queries:  # refused before any featurization
        raise ValueError(
            f"the mark judge found the mark in {found} of {cfg.candidates} samples: "
            f"{roles.count('test')} test queries, below the floor of {cfg.min_test_queries} "
            "(generate more with --candidates, or train the model longer)"
        )
    timings = {"queries": time.time() - tic}

    trained = featurize_methods(
        cfg, factor_featurizers(model, cfg), images_tensor(train.images), train.captions,
        train.ids, out_dir,
        progress,
    )  # fmt: skip
    timings.update(trained.timings)
    tic = time.time()
    per_row: dict[str, list[np.ndarray]] = {}
    per_control: dict[str, list[np.ndarray]] = {}
    kept: list[dict[str, torch.Tensor]] = []
    asked = [(q, per_row) for q in queries] + [(q, per_control) for q in controls]
    for q, log in show_progress(asked, desc="attribute", unit="query", enabled=progress):
        scores = query_scores(trained, cfg, train, q)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + len(kept))
        # no caption names the mark: a lookup ranks every image equal, ties broken at random
        scores["caption lookup"] = torch.rand(1, len(truth), generator=gen)
        scores["random"] = torch.rand(1, len(truth), generator=gen)
        for name, loss in trained.row_scale.items():  # das: each image's summed DSM loss
            # images the model denoises worst rank first whatever the query: what DAS's weight
            # alone finds (a stamped image is harder to denoise)
            scores[f"{name} weight alone (no query)"] = loss[None]
        for row, s in scores.items():
            log.setdefault(row, []).append(
                np.array([[mark_metrics(si, truth)[m] for m in MARK_METRICS] for si in s])
            )
        kept.append(scores)
    timings["attribution"] = time.time() - tic
    lambdas = list(cfg.lambdas)
    rows, chosen = row_results(per_row, roles, lambdas, cfg.select_lambda_by, per_control)
    results = {
        "benchmark": "mark",
        "rows": rows,
        "lambda_r": chosen,
        "n_train": len(truth),
        "n_marked": int(truth.sum()),
        "n_queries": {
            "validation": roles.count("validation"),
            "test": roles.count("test"),
            "control": len(controls),
        },
        "candidates": cfg.candidates,
        "found": found,
        "queries": [
            {
                "role": r,
                "combo": list(q["combo"]),
                "box": q["box"],
                "judge_score": q["score"],
                "top": top_entries(kept[i], chosen, lambdas, train.ids, top=cfg.top),
            }
            for i, (q, r) in enumerate(
                zip(queries + controls, roles + ["control"] * len(controls), strict=True)
            )
        ],
        "judge": getattr(mark_judge, "validation", None),
        "lambdas": lambdas,
        "k": cfg.k,
        "config": cfg.to_dict(),
        "seconds": time.time() - t0,
        "timings": timings,
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    results["_gallery"] = [
        {"query": q, "scores": {r: chosen_row(r, chosen, lambdas, s) for r, s in sc.items()}}
        for q, sc in zip(queries, kept[: len(queries)], strict=True)
        if q is queries[roles.index("test")]
    ]
    results["_train"] = train
    return results


def write_mark_gallery(results: dict, path, rows=GALLERY_ROWS) -> Path:
    """PNG: the first test query with its region outlined, and the top-10 training images of
    each of `rows` (those the run has) at its chosen lambda_r; stamped images are labelled."""
    entry = results["_gallery"][0]
    train = results["_train"]
    q = entry["query"]
    marked = train.marked
    shown = [
        {
            "title": row,
            "query": q["image"],
            "scores": entry["scores"][row],
            "region": q["box"],
        }  # fmt: skip
        for row in rows
        if row in entry["scores"]
    ]
    return gallery(shown, train.images, lambda i: "MARK" if marked[i] else "", path, 10, 0)


__all__ = ["MARK_METHODS", "MarkConfig", "draw_mark_queries", "run_mark", "write_mark_gallery"]
