"""Recipe variants on the incomplete-caption benchmark (`ctrak bench partial`), for the results log.

Each variant is a concept-trak configuration run through the same benchmark (same model, data,
queries and projection) as `ctrak bench partial`; the recipe is chosen on the VALIDATION queries
(AP, uncaptioned recall), and the test figures are reported beside them. Baselines are not rerun:
they are in `ctrak bench partial`'s own results.json.

    python tools/partial_variants.py --out out/partial_variants [--assets DIR] [--only NAME,...]

Writes OUT/<variant>/results.json and OUT/variants.json, and prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ctrak_fast.bench.demo import run_benchmark
from ctrak_fast.bench.quality import QualityConfig
from ctrak_fast.engine.atomic import atomic_write_text
from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.method.query import ConceptQuerySpec
from ctrak_fast.models.shipped import ASSETS, PARTIAL, asset_dataset, shipped

# concept-trak-cond's query settings, for the variants that change only the parameters
COND_QUERY = {"normalize": "layer", "contexts": True, "draw_cfg": "null"}
# the parameters that read the image and not the condition (every weight but the condition path)
CONTENT = r"^(?!.*(time_emb_proj|factor_embeddings)).*(conv|attentions|to_q|to_k|to_v|to_out)"

VARIANTS = {
    # the method table's rows, as shipped
    "table": {"methods": ("concept-trak-cond", "concept-trak-complete")},
    # every parameter (condition and content paths), per-layer normalisation, contexts
    "all-params": {
        "methods": ("concept-trak",),
        "dps": FeatureSpec(normalize="layer"),
        "concept": ConceptQuerySpec(**COND_QUERY),
    },
    # the content path alone: the parameters that read the image, not the condition
    "content-path": {
        "methods": ("concept-trak",),
        "dps": FeatureSpec(normalize="layer", param_filter=CONTENT),
        "concept": ConceptQuerySpec(**COND_QUERY),
    },
    # the paper's Concept-TRAK on every parameter (per-timestep norm, no contexts)
    "paper-all": {"methods": ("concept-trak",)},
    # every training image featurized under the null condition (no caption read at all), on the
    # condition path and on every parameter
    "null-captions": {"methods": ("concept-trak-cond", "concept-trak"), "null_captions": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/partial_variants")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--only", help="comma-separated variant names")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    model, judge, spec = shipped(PARTIAL, assets=Path(a.assets))
    data = asset_dataset(spec, model)
    summary_path = Path(a.out) / "variants.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in names:
        knobs = dict(VARIANTS[name])
        data_v = data
        if knobs.pop("null_captions", False):  # the captions replaced by the null token
            null = torch.tensor(data.n_values).expand_as(data.labels).clone()
            data_v = dataclasses.replace(data, captions=null)
        cfg = QualityConfig(select_lambda_by="ap", **knobs)
        res = run_benchmark(model, judge, data_v, Path(a.out) / name, cfg, progress=False)
        for m in cfg.methods:
            summary[f"{name}: {m}"] = {
                "lambda_r": res["lambda_r"][m],
                "validation": res["validation"][m],
                "test": {
                    s: {f: {k: c[k] for k in ("p@10", "ap", "recall_uncaptioned")}
                        for f, c in by.items()}
                    for s, by in res["methods"][m].items()
                },
            }  # fmt: skip
        Path(a.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps(summary, indent=2))
    print("| variant | lambda_r | split | factor | val AP | val recall | test AP | test recall |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in summary.items():
        for s, by in r["test"].items():
            for f, c in by.items():
                v = r["validation"].get(s, {}).get(f, {})
                print(
                    f"| {key} | {r['lambda_r']:g} | {s} | {f} | {v.get('ap', float('nan')):.2f} "
                    f"| {v.get('recall_uncaptioned', float('nan')):.2f} | {c['ap']:.2f} "
                    f"| {c['recall_uncaptioned']:.2f} |"
                )


if __name__ == "__main__":
    main()
