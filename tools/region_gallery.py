"""The README's region-query gallery: one query image holding two objects, asked about each part.

A red circle and a blue triangle are drawn side by side on one 16 x 16 canvas (each rendered at
8 x 8). The shipped demo model and its 420 training images are featurized once with
concept-trak-cond (k = 512); the image is then queried three times: the whole image under each
object's condition, and each object's half alone (`region=`). Rows: query (region outlined) |
top 10 | bottom 5.

    python tools/region_gallery.py [--out docs/images/region_gallery.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ctrak_fast.api import Attributor, shipped_dataset, shipped_model
from ctrak_fast.bench.report import gallery
from ctrak_fast.data.captions import caption
from ctrak_fast.data.synthetic import SyntheticConfig, render
from ctrak_fast.engine.projection import ProjectionSpec


def two_object_image() -> torch.Tensor:
    """[3, 16, 16] in [-1, 1]: a red circle (left half) and a blue triangle (right half)."""
    small = SyntheticConfig(image_size=8)
    canvas = torch.ones(3, 16, 16)
    canvas[:, 4:12, 0:8] = render("circle", "red", 1, seed=3, image_size=8, cfg=small)[0]
    canvas[:, 4:12, 8:16] = render("triangle", "blue", 1, seed=4, image_size=8, cfg=small)[0]
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/images/region_gallery.png")
    a = p.parse_args()
    torch.manual_seed(0)
    model, data = shipped_model(), shipped_dataset(per_combo=30)
    att = Attributor(model, "concept-trak-cond", projection=ProjectionSpec(k=512))
    image = two_object_image()
    left, right = (0, 4, 8, 12), (8, 4, 16, 12)
    asks = [
        ("shape=circle,colour=red", None, "whole image, asked: red circle"),
        ("shape=circle,colour=red", left, "left half only: red circle"),
        ("shape=triangle,colour=blue", right, "right half only: blue triangle"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = att.featurize(data, Path(tmp) / "store", batch_size=35)
        for concept, region, title in asks:
            q = att.query(concept, image=image, region=region, n_draws=2)
            res = att.attribute(q, store, k=len(data), tails="top", lambda_r=100.0)
            row_of = {int(i): n for n, i in enumerate(data.ids.tolist())}
            for r, label in enumerate(q.labels):
                scores = torch.zeros(len(data))
                rows_r = [row_of[int(i)] for i in res.top_ids[r]]
                scores[rows_r] = res.top_scores[r]
                rows.append({"title": f"{title} · {label}", "query": image, "scores": scores,
                             "region": list(region) if region else None})  # fmt: skip

    def describe(i: int) -> str:
        return caption(data.factors, data.values, data.labels[i].tolist()).removeprefix("a ")

    print(gallery(rows, data.images, describe, a.out))


if __name__ == "__main__":
    main()
