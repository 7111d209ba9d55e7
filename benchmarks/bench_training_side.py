"""Which training-side recipe retrieves by concept? Whole-image queries, one recipe at a time.

    python benchmarks/bench_training_side.py                # shipped model, 10 images/combination
    python benchmarks/bench_training_side.py --per-combo 30 --json out/training_side.json

Concept-TRAK changes three things on the training side relative to D-TRAK (METHOD.md §4): the
loss (the DPS residual instead of ε_θ), where x_t comes from (DDIM inversion instead of one fixed
noise per timestep) and per-timestep normalisation. Here every recipe featurizes the same training
images and is queried with *its own* features of judge-confirmed generated images (a whole-image
query, as for the baselines), so the query side is the same for all and only the training-side
recipe differs. Rows: P@10 per factor over the queries (chance = the value's frequency).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import environment, format_table, write_json  # noqa: E402

PAPER_T = (99, 199, 299, 399, 499, 599, 699, 799, 899)


def recipes(filter_: str):
    from ctrak_fast.method.featurize import FeatureSpec

    return {
        "eps-norm, fixed noise (D-TRAK)": FeatureSpec.baseline("eps-norm"),
        "eps-norm, DDIM inversion": FeatureSpec(loss="eps-norm"),
        "DPS, fixed noise": FeatureSpec(loss="dps", inversion=False),
        "DPS, DDIM inversion (Concept-TRAK)": FeatureSpec(),
        "DPS, DDIM inversion, no normalisation": FeatureSpec(normalize=False),
        "DPS, DDIM inversion, CFG 1": FeatureSpec(inversion_guidance=1.0),
        f"DPS, DDIM inversion, filter {filter_}": FeatureSpec(param_filter=filter_),
        f"eps-norm, fixed noise, filter {filter_}": FeatureSpec.baseline(
            "eps-norm", param_filter=filter_
        ),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-combo", type=int, default=10)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--filter", default="time_emb_proj|factor_embeddings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ctrak_fast.bench.metrics import factor_metrics
    from ctrak_fast.bench.quality import QualityConfig, data_combos, draw_split
    from ctrak_fast.data import make_dataset
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.engine.scoring import Preconditioner
    from ctrak_fast.method.diffusion import NoiseSchedule
    from ctrak_fast.method.featurize import Featurizer
    from ctrak_fast.method.query import image_query_features
    from ctrak_fast.models.shipped import shipped

    model, judge, data_cfg = shipped()
    data = make_dataset(data_cfg)
    train = data.train_subset(args.per_combo)
    schedule, null = NoiseSchedule.for_model(model), model.null_cond(1)[0]
    combos = data_combos(data, "seen")
    queries, _, _ = draw_split(
        model, judge, "seen", combos, QualityConfig(queries_per_combo=1), progress=False
    )
    q_img = torch.stack([q["image"] for q in queries])
    q_cond = torch.tensor([q["combo"] for q in queries])
    print(f"{len(train)} training images, {len(queries)} in-distribution queries", flush=True)
    rows, shared = [], None
    for name, spec in recipes(args.filter).items():
        proj = ProjectionSpec(k=args.k)
        fz = Featurizer(model, schedule, spec, proj, null, shared_projector=shared)
        shared = shared or fz.projector
        batches = zip(train.images.split(35), train.labels.split(35), strict=True)
        phi = torch.cat([fz(x, c)[0] for x, c in batches])
        pre = Preconditioner(phi.double().T @ phi.double(), 1.0)
        scores = phi @ pre.solve(image_query_features(fz, q_img, q_cond)).T
        row = {"recipe": name}
        for f, factor in enumerate(data.factors):
            p10 = [
                factor_metrics(scores[:, j], train.labels, tuple(q_cond[j].tolist()), f)["p@10"]
                for j in range(len(queries))
            ]
            row[f"{factor} P@10"] = sum(p10) / len(p10)
        rows.append(row)
        print(format_table([row]), flush=True)
    print()
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"environment": environment(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
