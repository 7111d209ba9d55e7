"""`ctrak demo`: the concept benchmark on the shipped model: table, results.json, gallery."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ctrak_fast.bench.quality import QualityConfig, run_quality
from ctrak_fast.bench.report import bar_plot, gallery
from ctrak_fast.bench.tables import format_table
from ctrak_fast.data.captions import caption
from ctrak_fast.method.methods import METHODS
from ctrak_fast.models.shipped import ASSETS, SHIPPED, asset_dataset, shipped


def write_gallery(results: dict, data_values, factors, path) -> Path:
    """One row per (gallery query, method): query | top-10 | bottom-5. Concept methods get a row
    per concept asked for (titled with it); D-TRAK and TRAK one whole-image row."""
    train = results["_train"]

    def describe(i: int) -> str:  # what image i shows; [-f]: its caption leaves f out
        shown = caption(factors, data_values, train.labels[i].tolist()).removeprefix("a ")
        gaps = [f for f, gap in zip(factors, train.uncaptioned[i].tolist(), strict=True) if gap]
        return shown + (f" [{','.join('-' + f for f in gaps)}]" if gaps else "")

    rows = []
    for g in results["_gallery"]:
        name = caption(factors, data_values, g["combo"]).removeprefix("a ")
        tag = "held-out" if g["split"] == "heldout" else "seen"
        for m, scores in g["scores"].items():
            if METHODS[m].query == "concept":
                for f, fname in enumerate(factors):
                    value = data_values[fname][g["combo"][f]]
                    title = f"{tag} {name} · {m}: {fname}={value}"
                    rows.append({"title": title, "query": g["image"], "scores": scores[:, f]})
            elif m in ("d-trak", "trak"):
                rows.append(
                    {"title": f"{tag} {name} · {m}", "query": g["image"], "scores": scores[:, 0]}
                )
    return gallery(rows, train.images, describe, path)


def run_demo(
    out_dir="demo_out",
    cfg: QualityConfig | None = None,
    progress: bool = True,
    assets: str | Path = ASSETS,
    name: str = SHIPPED,
) -> dict:
    """The benchmark on the model, judge and data `name` of `assets` (default: the shipped
    shapes16; or the --out folder and --name of `ctrak train`)."""
    model, judge, data_spec = shipped(name, assets=Path(assets))
    return run_benchmark(model, judge, asset_dataset(data_spec, model), out_dir, cfg, progress)


def run_benchmark(
    model, judge, data, out_dir, cfg: QualityConfig | None = None, progress: bool = True
) -> dict:
    """The benchmark of a model, its judge and its training data (any labelled data set, any
    number of factors): results.json, gallery.png and heldout_p10.png in out_dir."""
    torch.manual_seed(0)
    out = Path(out_dir)
    cfg = cfg or QualityConfig()
    results = run_quality(model, judge, data, cfg, out, progress=progress)
    write_gallery(results, data.values, data.factors, out / "gallery.png")
    heldout_plot(results, out / "heldout_p10.png")
    return {k: v for k, v in results.items() if not k.startswith("_")}


def heldout_plot(results: dict[str, Any], path: str | PathLike[str]) -> Path:
    """The held-out P@10 of every method per factor, with its bootstrap 95% CI, from a
    benchmark's results (results.json, read back or fresh)."""
    methods = results["methods"]
    factors = list(next(iter(methods.values()))["heldout"])
    cells = {f: {m: methods[m]["heldout"][f] for m in methods} for f in factors}
    nan = float("nan")
    return bar_plot(
        {f: {m: c.get("p@10", nan) for m, c in row.items()} for f, row in cells.items()},
        "held-out combinations: P@10 per factor",
        path,
        intervals={
            f: {m: tuple(c.get("p@10_ci", (nan, nan))) for m, c in row.items()}
            for f, row in cells.items()
        },
    )


def summary(results: dict, out_dir) -> str:
    """What `ctrak demo` prints: the table, the files written and the time taken."""
    out = Path(out_dir)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items())
    return (
        f"{format_table(results)}\n\nwrote {out / 'results.json'}, {out / 'gallery.png'}, "
        f"{out / 'heldout_p10.png'}\ntotal {results['seconds']:.0f} s; {timings}"
    )


def load_results(path) -> dict:
    return json.loads(Path(path).read_text())
