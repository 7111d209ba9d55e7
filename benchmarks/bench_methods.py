"""Featurization cost of every method of the method table, side by side in one run.

    python benchmarks/bench_methods.py                      # 70 shipped images, k = 2048
    python benchmarks/bench_methods.py --n 140 --k 2048 --threads 1 --json out/methods.json

Each method featurizes the same shipped training images with its own recipe (method/methods.py:
concept-trak-cond = the paper's DPS features at DDIM-inverted x_t on the condition path with
per-layer normalisation; concept-trak = the paper's, every parameter; trak; d-trak) through the
Attributor, after one warm-up batch; samples/s is the median over --repeat runs. Query cost is
reported too: one concept query (the method's own query spec) or one whole-image query.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import environment, format_table, write_json  # noqa: E402


def run(n: int, k: int, batch: int, repeat: int) -> list[dict]:
    from ctrak_fast import Attributor, ProjectionSpec, shipped_dataset, shipped_model
    from ctrak_fast.method.methods import FEATURIZE_METHODS, METHODS

    model = shipped_model()
    data = shipped_dataset()
    data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n])
    rows = []
    for name in FEATURIZE_METHODS:
        att = Attributor(model, name, projection=ProjectionSpec(k=k))
        att.featurize((data.images[:batch], data.labels[:batch], data.ids[:batch]),
                      tempfile.mkdtemp() + "/warm", batch_size=batch, progress=False)  # fmt: skip
        times = []
        for _ in range(repeat):
            tic = time.perf_counter()
            att.featurize(data, tempfile.mkdtemp() + "/s", batch_size=batch, progress=False)
            times.append(time.perf_counter() - tic)
        t = sorted(times)[len(times) // 2]
        tic = time.perf_counter()
        if METHODS[name].query == "concept":
            att.query("shape=triangle,colour=red", remove="shape", n_draws=4)
        else:
            att.image_query(data.images[:1], data.labels[:1])
        q = time.perf_counter() - tic
        rows.append({
            "method": name,
            "parameters": att.featurizer.grads.n_selected,
            "samples_per_s": n / t,
            "featurize_s": t,
            "query_s": q,
        })  # fmt: skip
        print(f"{name}: {n / t:.2f} samples/s, query {q:.2f} s", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=70, help="training images")
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--batch", type=int, default=35)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the rows and the machine here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(a.n, a.k, a.batch, a.repeat)
    paper = next(r for r in rows if r["method"] == "concept-trak")
    for r in rows:
        r["vs_concept_trak"] = r["samples_per_s"] / paper["samples_per_s"]
    print(format_table(rows))
    if a.json:
        write_json(a.json, {"environment": environment({"n": a.n, "k": a.k}), "rows": rows})


if __name__ == "__main__":
    main()
