"""The synthetic concept benchmark with prompt queries, on a text-to-image model (issue #7).

Same data, metrics and table as benchmark.py (the factor-token benchmark), but every condition is a
caption embedded by the model's text encoder ("a red triangle"), and a concept query is a prompt
and the phrase to attribute: c+ = "a red triangle", c- = remove_phrase(c+, "red") = "a triangle"
for the colour, "a red" for the shape. Query images are sampled from the prompt through the
diffusers scheduler API and kept when the ConceptJudge confirms them.

| method       | training features (attn2 parameters) | query                               |
|--------------|--------------------------------------|-------------------------------------|
| concept-trak | DPS loss, DDIM inversion, per-t norm | slider: c+ prompt vs phrase removed |
| trak         | DSM loss at fixed noise              | same loss on the query image        |
| d-trak       | mean(eps^2) at fixed noise           | same on the query image             |
| das          | d-trak rows x summed DSM loss        | d-trak query                        |
| pixel        | -                                    | cosine similarity of pixels         |

    python -m ctrak_fast.text_benchmark --out out/t2i_quality
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters.text2image import (
    T2I_PARAM_FILTER,
    TextToImageAdapter,
    encode_images_cached,
    make_featurizer,
    prompt_query_features,
    remove_phrase,
)
from .adapters.tiny import caption
from .benchmark import METHODS, _mean, _metrics_for, data_combos, format_table, train_subset
from .data import ConceptDataset
from .featurize import FeatureSpec, featurize_dataset
from .projection import ProjectionSpec
from .query import ConceptQuerySpec, image_query_features
from .scoring import Preconditioner, gram, score_dense
from .store import FeatureStore

__all__ = ["T2IQualityConfig", "run_t2i_quality", "make_prompt_queries"]


@dataclass
class T2IQualityConfig:
    """Benchmark settings (defaults sized for a ~20 minute run on 2 CPU cores)."""

    per_combo: int = 50
    k: int = 512
    projection_seed: int = 0
    queries_per_combo: int = 2
    query_guidance: float = 3.0
    query_candidates: int = 8
    query_steps: int = 50
    lambda_r: float = 1.0
    batch_size: int = 32
    store_dtype: str = "float32"
    param_filter: str = T2I_PARAM_FILTER
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    dps: FeatureSpec = field(default_factory=FeatureSpec)
    concept: ConceptQuerySpec = field(default_factory=ConceptQuerySpec)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dps"] = self.dps.to_dict()
        d["concept"] = self.concept.to_dict()
        return d


def _prompt(data: ConceptDataset, combo) -> str:
    return caption(data.factors, data.values, combo)


def make_prompt_queries(adapter, judge, data, combos, cfg: T2IQualityConfig, progress=True):
    """Sample `query_candidates` images per combination from its prompt (DDIM through the
    scheduler API, CFG against ""), keep the judge-confirmed ones.

    Returns ([{combo, prompt, seed, x0 [C,h,w], image [3,H,W]}], {combo: (accepted, tried)}).
    """
    queries, accepted = [], {}
    for ci, combo in enumerate(tqdm(combos, desc="queries", disable=not progress)):
        prompt = _prompt(data, combo)
        seed = cfg.seed * 7919 + ci
        x0 = adapter.generate(
            prompt, "", cfg.query_guidance, cfg.query_steps, seed=seed, n=cfg.query_candidates
        )
        images = adapter.decode_latents(x0)
        if not adapter.latent:  # a pixel model's query image is the clamped sample
            x0 = images
        ok = (judge.predict(images) == torch.tensor(combo)).all(1)
        accepted[tuple(combo)] = (int(ok.sum()), cfg.query_candidates)
        for i in ok.nonzero().flatten()[: cfg.queries_per_combo].tolist():
            q = {"combo": tuple(combo), "prompt": prompt, "seed": seed, "x0": x0[i]}
            queries.append({**q, "image": images[i]})
    return queries, accepted


def run_t2i_quality(
    adapter: TextToImageAdapter,
    judge,
    data: ConceptDataset,
    cfg: T2IQualityConfig,
    out_dir,
    progress: bool = True,
) -> dict:
    """Run the prompt benchmark; results dict shaped like benchmark.run_quality's (also written
    to out_dir/results.json), so benchmark.format_table and demo.write_gallery apply."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = train_subset(data, cfg.per_combo)
    labels = train.labels
    captions = [_prompt(data, row) for row in labels.tolist()]
    conds = adapter.prompt_ids(captions)  # int64 [N, 1]
    proj = ProjectionSpec(k=cfg.k, seed=cfg.projection_seed)
    filt = {"param_filter": cfg.param_filter}
    specs = {
        "concept-trak": FeatureSpec.from_dict({**cfg.dps.to_dict(), **filt}),
        "trak": FeatureSpec.baseline("dsm", **filt),
        "d-trak": FeatureSpec.baseline("eps-norm", **filt),
    }
    need = {m for m in cfg.methods if m != "pixel"}
    if "das" in need:
        need.add("d-trak")
    feats, stores, precond, timings = {}, {}, {}, {}
    x0_train = None
    for name in ("concept-trak", "trak", "d-trak"):
        if name not in need:
            continue
        feats[name] = make_featurizer(adapter, specs[name], proj)
        path = out_dir / "stores" / name
        if x0_train is None:  # latents cached next to the first store, reused by the others
            x0_train = encode_images_cached(adapter, train.images, train.ids, path)
        das = out_dir / "stores" / "das" if (name == "d-trak" and "das" in need) else None
        tic = time.time()
        stores[name] = featurize_dataset(
            feats[name],
            x0_train,
            conds,
            train.ids,
            path,
            batch_size=cfg.batch_size,
            shard_rows=cfg.batch_size * 16,
            dtype=cfg.store_dtype,
            das_path=das,
            progress=progress,
        )
        timings[f"featurize {name}"] = time.time() - tic
        if das is not None:
            stores["das"] = FeatureStore.open(das)
    for name in stores:
        base = "d-trak" if name == "das" else name
        precond[name] = precond.get(base) or Preconditioner(gram(stores[base]), cfg.lambda_r)

    seen = [tuple(c) for c in data_combos(data, "seen")]
    splits = {"in_distribution": seen, "heldout": list(data.heldout)}
    per_query = {m: {s: {f: [] for f in data.factors} for s in splits} for m in cfg.methods}
    gallery, acceptance, n_factors = [], {}, len(data.factors)
    tic = time.time()
    for split, combos in splits.items():
        queries, accepted = make_prompt_queries(adapter, judge, data, combos, cfg, progress)
        acceptance[split] = {",".join(map(str, c)): v for c, v in accepted.items()}
        for qi, q in enumerate(tqdm(queries, desc=f"attribute {split}", disable=not progress)):
            combo, prompt = q["combo"], q["prompt"]
            scores: dict[str, torch.Tensor] = {}
            if "concept-trak" in cfg.methods:
                words = [data.values[f][v] for f, v in zip(data.factors, combo, strict=True)]
                negs = [remove_phrase(prompt, w) for w in words]
                qf = prompt_query_features(
                    feats["concept-trak"], cfg.concept, prompt, negs, q["x0"]
                )
                u = precond["concept-trak"].solve(qf)
                scores["concept-trak"] = score_dense(stores["concept-trak"], u)  # [N, F]
            cond_q = adapter.prompt_ids([prompt])
            for m, fz in (("trak", "trak"), ("d-trak", "d-trak"), ("das", "d-trak")):
                if m in cfg.methods:
                    qf = image_query_features(feats[fz], q["x0"][None], cond_q)
                    s = score_dense(stores[m], precond[m].solve(qf))
                    scores[m] = s.expand(-1, n_factors)
            if "pixel" in cfg.methods:
                a = torch.nn.functional.normalize(train.images.flatten(1), dim=1)
                b = torch.nn.functional.normalize(q["image"].flatten()[None], dim=1)
                scores["pixel"] = (a @ b.T).expand(-1, n_factors)
            for m, s in scores.items():
                for f, fname in enumerate(data.factors):
                    per_query[m][split][fname].append(_metrics_for(s[:, f], labels, combo, f))
            if qi == 0:
                gallery.append(
                    {"split": split, "combo": combo, "image": q["image"], "scores": scores}
                )
    timings["queries + attribution"] = time.time() - tic
    first = cfg.methods[0]
    results = {
        "methods": {
            m: {s: {f: _mean(per_query[m][s][f]) for f in data.factors} for s in splits}
            for m in cfg.methods
        },
        "chance": {
            f: {v: (labels[:, i] == j).float().mean().item() for j, v in enumerate(data.values[f])}
            for i, f in enumerate(data.factors)
        },
        "n_queries": {s: len(per_query[first][s][data.factors[0]]) for s in splits},
        "query_acceptance": acceptance,
        "n_train": len(train),
        "k": cfg.k,
        "seconds": time.time() - t0,
        "timings": timings,
        "config": cfg.to_dict(),
        "model": {"text2image": adapter.describe(), "param_filter": cfg.param_filter},
        "heldout_combos": [
            {f: data.values[f][v] for f, v in zip(data.factors, c, strict=True)}
            for c in data.heldout
        ],
    }
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")
    results["_gallery"] = gallery
    results["_train"] = train
    return results


def run_from_args(a: argparse.Namespace) -> dict:
    """The benchmark on the shipped tiny model and judge: table.md, results.json, gallery.png."""
    from .adapters.tiny import ASSETS, load_t2i
    from .data import SyntheticConfig, make_dataset
    from .demo import write_gallery
    from .models import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = T2IQualityConfig(
        per_combo=a.per_combo,
        k=a.k,
        queries_per_combo=a.queries_per_combo,
        query_candidates=a.query_candidates,
        query_guidance=a.query_guidance,
        param_filter=a.param_filter,
        methods=tuple(a.methods.split(",")),
        lambda_r=a.lambda_r,
        dps=FeatureSpec(inversion_steps=a.inversion_steps, inversion_guidance=a.inversion_guidance),
        concept=ConceptQuerySpec(
            draws=a.draws,
            n_draws=a.n_draws,
            steps=a.inversion_steps,
            guidance=a.inversion_guidance,
        ),
    )
    data = make_dataset(SyntheticConfig.load_json(a.data or ASSETS / "shapes16.json"))
    judge = load_model(a.judge or ASSETS / "judge_shapes16.safetensors")
    res = run_t2i_quality(load_t2i(a.model), judge, data, cfg, a.out, not a.quiet)
    table = format_table(res)
    print(table)
    (Path(a.out) / "table.md").write_text(table + "\n")
    write_gallery(res, data.values, data.factors, Path(a.out) / "gallery.png")
    return res


def main(argv=None) -> dict:
    from .adapters.cli import add_bench_arguments

    p = argparse.ArgumentParser(description="Prompt-query concept benchmark on the tiny T2I model.")
    add_bench_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
