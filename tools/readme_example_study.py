"""The README's ten-line example, measured on every (shape, colour) concept rather than one.

Prompt-only queries (`att.query(concept)`: the Attributor generates the query image, as the
README does) against image-anchored ones (`att.query(concept, image=...)` with a sample the
judge confirms, as the benchmarks do), at the README's size (4 images per combination, k = 256),
at 12 per combination, and at the demo's size (30, k = 2048), over the lambda_r sweep. lambda_r
is chosen per (size, query kind) on the validation queries (seed 0) and reported on the test
queries (seed 1); the README's fixed lambda_r = 1000 is shown beside it.

    python tools/readme_example_study.py --out out/readme_study   # ~15 min on 2 cores

Writes out/readme_study/results.json and prints the table (P@10 of each factor's row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctrak_fast import Attributor, ProjectionSpec, shipped_dataset, shipped_model
from ctrak_fast.bench.protocol import LAMBDAS
from ctrak_fast.bench.queries import judge_confirms
from ctrak_fast.bench.stats import bootstrap_ci, choose_lambda_on_validation, format_ci
from ctrak_fast.engine.sweep import LambdaSweep
from ctrak_fast.method import diffusion
from ctrak_fast.models.shipped import shipped

SIZES = ((4, 256), (12, 256), (30, 2048))  # (images per combination, k)
README_LAMBDA = 1000.0
KINDS = ("prompt-only", "image-anchored")


def confirmed_image(model, judge, combo, seed: int, n: int = 8):
    """The first of n CFG-2 samples of `combo` the judge confirms (the benchmark's queries)."""
    cond = torch.tensor(combo)[None].expand(n, -1)
    gen = torch.Generator().manual_seed(seed * 7919 + 31 * combo[0] + combo[1])
    x0, _ = diffusion.ddim_sample(model, cond, guidance=2.0, generator=gen)
    ok = judge_confirms(judge, x0.clamp(-1, 1), cond).nonzero().flatten()
    return x0[ok[0]].clamp(-1, 1) if len(ok) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/readme_study")
    a = p.parse_args()
    out = Path(a.out)
    model = shipped_model()
    _, judge, _ = shipped()
    lambdas = list(LAMBDAS)
    combos = [(s, c) for s in range(4) for c in range(4)]
    results: dict = {"lambdas": lambdas, "sizes": {}}
    for per_combo, k in SIZES:
        data = shipped_dataset(per_combo=per_combo)
        att = Attributor(model, "concept-trak-cond", projection=ProjectionSpec(k=k))
        store = att.featurize(data, out / f"store_{per_combo}_{k}")
        sweep = LambdaSweep(store.read_all()[0].double())
        order = store.read_all()[1]  # the store's ids, in its row order
        labels = torch.stack([data.labels[data.ids == i][0] for i in order.tolist()])
        p10: dict = {kind: {"validation": [], "test": []} for kind in KINDS}
        for seed, split in ((0, "validation"), (1, "test")):
            for combo in combos:
                concept = {"shape": data.values["shape"][combo[0]]}
                concept["colour"] = data.values["colour"][combo[1]]
                image = confirmed_image(model, judge, combo, seed)
                for kind in KINDS:
                    if kind == "image-anchored" and image is None:
                        continue
                    q = att.query(concept, seed=seed, image=image if kind != KINDS[0] else None)
                    s = sweep.scores(q.features, lambdas)  # [n_lambda, N, 2 rows]
                    top = s.topk(10, dim=1).indices  # [n_lambda, 10, 2]
                    hit = [(labels[top[:, :, f], f] == combo[f]).float().mean(1) for f in (0, 1)]
                    p10[kind][split].append(torch.stack(hit, 1).numpy())  # [n_lambda, 2]
        size = {}
        for kind in KINDS:
            val, test = (np.stack(p10[kind][s]) for s in ("validation", "test"))  # [Q, nl, 2]
            lam = choose_lambda_on_validation(val.mean(2).T, lambdas)
            li, fixed = lambdas.index(lam), lambdas.index(README_LAMBDA)
            factors = list(enumerate(data.factors))
            size[kind] = {
                "lambda_r": lam,
                "n_test": len(test),
                "test": {f: list(bootstrap_ci(test[:, li, i])) for i, f in factors},
                "test_at_1000": {f: float(test[:, fixed, i].mean()) for i, f in factors},
            }
        results["sizes"][f"{per_combo}x{k}"] = {"n_train": len(data), "k": k, **size}
        print(f"done {per_combo} per combination, k = {k}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        "| training set | k | query | λ_r (validation) | P@10 shape | P@10 colour "
        "| at λ_r = 1000: shape | colour |\n|---|---|---|---|---|---|---|---|"
    )
    for r in results["sizes"].values():
        for kind in KINDS:
            c = r[kind]
            cells = [format_ci(*c["test"][f]) for f in ("shape", "colour")]
            cells += [f"{c['test_at_1000'][f]:.2f}" for f in ("shape", "colour")]
            head = f"| {r['n_train']} | {r['k']} | {kind} | {c['lambda_r']:g} | "
            print(head + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
