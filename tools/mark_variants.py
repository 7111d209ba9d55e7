"""Variants of the uncaptioned-mark benchmark (`ctrak bench mark`), for docs/RESULTS_LOG.md.

Each variant is one run of bench/mark.py with one knob changed; the rows' lambda_r is chosen on the
validation queries and the variant is judged on its validation AP. Variants that change only the
query reuse the default run's stores (same folder, resumed).

    python tools/mark_variants.py --stores-from out/mark_bench pad0 pad2 layer cond-all

Variants: pad0 / pad2 (the region: the judge's box grown by 0 or 2 pixels instead of 1);
layer (concept-trak and d-trak features normalised layer by layer, every parameter: the content
path with concept-trak-cond's normalisation); cond-all (concept-trak-cond's recipe without its
condition-path filter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctrak_fast.bench.mark import MarkConfig, run_mark
from ctrak_fast.bench.mark_scoring import mark_table
from ctrak_fast.method.methods import METHODS
from ctrak_fast.models.factor_unet import load_model
from ctrak_fast.models.shipped import ASSETS, MARKED, asset_dataset, shipped


def variant(name: str) -> tuple[dict, bool]:
    """(MarkConfig overrides, whether it featurizes as the default run does)."""
    if name in ("pad0", "pad2"):
        return {"pad": int(name[-1])}, True
    if name == "layer":
        feats = {m: METHODS[m].feature_spec(normalize="layer") for m in ("concept-trak", "d-trak")}
        return {"features": feats, "methods": ("concept-trak", "d-trak", "pixel")}, False
    if name == "cond-all":
        spec = METHODS["concept-trak-cond"].feature_spec(param_filter=None)
        return {"features": {"concept-trak-cond": spec}, "methods": ("concept-trak-cond",)}, False
    raise SystemExit(f"unknown variant {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--name", default=MARKED)
    p.add_argument("--out", default="out/mark_variants")
    p.add_argument(
        "--stores-from", help="a default run's --out: variants that featurize alike read its stores"
    )
    a = p.parse_args()
    assets = Path(a.assets)
    model, _, spec = shipped(a.name, assets)
    mark_judge = load_model(assets / f"markjudge_{a.name}.safetensors")
    data = asset_dataset(spec, model)
    summary = {}
    for name in a.variants:
        overrides, same_stores = variant(name)
        out_dir = Path(a.out) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        if same_stores and a.stores_from and not (out_dir / "stores").exists():
            (out_dir / "stores").symlink_to(Path(a.stores_from).resolve() / "stores")
        res = run_mark(model, mark_judge, data, MarkConfig(**overrides), out_dir)
        print(f"\n## variant {name}\n\n{mark_table(res)}")
        summary[name] = {
            row: {"validation_ap": r["validation"]["ap"], "test_ap": r["test"]["ap"][0]}
            for row, r in res["rows"].items()
        }
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
