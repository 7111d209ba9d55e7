"""docs/images/paper2x2_samples.png and the judge's acceptance of each query sampler on the 2 x 2
replica: every combination under plain CFG, then the held-out red triangle under contrast
guidance (bench/queries.py), the sampler `ctrak bench paper` draws its queries with.

    python tools/paper2x2_samples.py [--assets DIR] [--n 160]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctrak_fast.bench.paper import PAPER_NAME
from ctrak_fast.bench.queries import ContrastGuided, judge_confirms
from ctrak_fast.cli.app import PAPER_QUERIES
from ctrak_fast.figures import image_rows
from ctrak_fast.method.diffusion import ddim_sample
from ctrak_fast.models.shipped import ASSETS, shipped
from ctrak_fast.train.judge import combo_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=str(ASSETS))
    ap.add_argument("--n", type=int, default=160, help="samples judged per sampler")
    ap.add_argument("--out", default="docs/images/paper2x2_samples.png")
    a = ap.parse_args()
    model, judge, cfg = shipped(PAPER_NAME, assets=Path(a.assets))
    values = {"shape": list(cfg.shapes), "colour": list(cfg.colours)}
    held = tuple(cfg.heldout[0])
    samplers = {
        "CFG 1": (model, 1.0),
        "CFG 2": (model, 2.0),
        f"contrast {PAPER_QUERIES['contrast']:g}": (
            ContrastGuided(model, PAPER_QUERIES["contrast"]),
            PAPER_QUERIES["guidance"],
        ),
    }
    rows, labels, report = [], [], {}
    for combo in cfg.combos("all"):
        g = torch.Generator().manual_seed(0)
        x, _ = ddim_sample(
            model, torch.tensor(combo)[None].expand(8, -1), guidance=2.0, generator=g
        )
        rows.append(x)
        labels.append(
            combo_name(["shape", "colour"], values, combo) + (" *" if combo == held else "")
        )
    for name, (sampler, guidance) in samplers.items():
        g = torch.Generator().manual_seed(1)
        cond = torch.tensor(held)[None].expand(a.n, -1)
        x, _ = ddim_sample(sampler, cond, guidance=guidance, generator=g)
        x = x.clamp(-1, 1)
        right = judge_confirms(judge, x, cond)
        sure = judge_confirms(judge, x, cond, PAPER_QUERIES["confidence"])
        report[name] = {
            "judge_argmax": right.float().mean().item(),
            "confirmed": sure.float().mean().item(),
        }
        if name.startswith("contrast"):
            rows += [x[:8], x[sure][:8]]
            labels += [f"* {name}", f"* {name}, confirmed"]
    image_rows(rows, labels, a.out)
    print(
        json.dumps(
            {"heldout": combo_name(["shape", "colour"], values, held), "n": a.n, **report}, indent=1
        )
    )


if __name__ == "__main__":
    main()
