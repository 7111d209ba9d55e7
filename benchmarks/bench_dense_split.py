"""Dense featurization against the forward + backward floor, timed in one process on the same
batches, with the dense time split into per-sample gradients and the projection (docs/ENGINE.md,
featurization; issue #32 item 4).

    python benchmarks/bench_dense_split.py                  # 32 timed images, batch 16, k = 1024

bench_featurize.py runs each path in its own process, minutes apart; on a shared machine the load
between them moves the ratio. Here the floor and dense alternate batch by batch, CPU time of this
process (1 thread), after one warm-up batch of each. The bound printed is the floor's share of
floor + projection: what dense would reach if per-sample gradients cost nothing beyond the
floor's forward + backward.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_featurize import run_floor  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="timed images (after a warm-up batch)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--timesteps", default="99,199,299,399,499,599,699,799,899")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from ctrak_fast.api import shipped_dataset, shipped_model
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.method.diffusion import NoiseSchedule
    from ctrak_fast.method.featurize import FeatureSpec, Featurizer

    # bench_featurize's setting: the shipped model and data, DSM at fixed noise, no normalisation
    model, data = shipped_model(), shipped_dataset()
    idx = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))
    images, labels = data.images[idx], data.labels[idx]
    timesteps = [int(t) for t in args.timesteps.split(",")]
    spec = FeatureSpec.baseline("dsm", timesteps=timesteps, normalize=False)
    schedule = NoiseSchedule.for_model(model)
    fz = Featurizer(model, schedule, spec, ProjectionSpec(k=args.k), model.null_cond(1)[0])
    b = args.batch
    fz(images[:b], labels[:b])  # warm-up of both paths
    run_floor(model, schedule, spec, images[:b], labels[:b], b)
    floor = grads = proj = 0.0
    n = 0
    for i in range(b, b + args.n, b):
        x, c = images[i : i + b], labels[i : i + b]
        t0 = time.process_time()
        run_floor(model, schedule, spec, x, c, b)
        t1 = time.process_time()
        blocks, _ = fz.gradient_sum(x, c)
        t2 = time.process_time()
        fz.features(blocks)
        t3 = time.process_time()
        floor, grads, proj, n = floor + t1 - t0, grads + t2 - t1, proj + t3 - t2, n + len(x)
    ms = {k: 1e3 * v / n for k, v in (("floor", floor), ("grads", grads), ("proj", proj))}
    dense = ms["grads"] + ms["proj"]
    print(
        f"per sample: floor {ms['floor']:.1f} ms, dense {dense:.1f} ms (per-sample gradients "
        f"{ms['grads']:.1f}, projection {ms['proj']:.1f}); dense at {ms['floor'] / dense:.2f} of "
        f"the floor; projection alone {ms['proj'] / ms['floor']:.0%} of the floor, bound "
        f"{ms['floor'] / (ms['floor'] + ms['proj']):.2f}"
    )


if __name__ == "__main__":
    main()
