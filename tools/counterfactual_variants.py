"""Which measured output do the methods predict? LDS of every method against each output the
ground truth records (the concept slider loss, the concept gap, the whole-image loss), lambda_r
chosen per output on the validation queries. Reads the shipped ground truth; the stores of a
previous `ctrak bench counterfactual --out OUT` are reused.

    python tools/counterfactual_variants.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ctrak_fast.bench.counterfactual.bench import all_scores, lds_rows, lds_summaries
from ctrak_fast.bench.counterfactual.ground_truth import lds_jobs
from ctrak_fast.bench.counterfactual.probes import Probes
from ctrak_fast.bench.counterfactual.queue import read_outputs
from ctrak_fast.bench.counterfactual.setting import CounterfactualSetting, mask_from_text
from ctrak_fast.bench.quality import QualityConfig
from ctrak_fast.models.factor_unet import load_model
from ctrak_fast.models.shipped import COUNTERFACTUAL


def main(out: Path) -> None:
    setting = CounterfactualSetting.load(COUNTERFACTUAL / "setting.json")
    data = setting.dataset()
    probes = Probes.load(COUNTERFACTUAL / "probes.safetensors")
    jobs = lds_jobs(COUNTERFACTUAL)
    done = read_outputs(COUNTERFACTUAL / "outputs", [j.name for j in jobs])
    jobs = [j for j in jobs if j.name in done]
    masks = torch.stack([mask_from_text(j.mask, len(data)) for j in jobs])
    cfg = QualityConfig()
    model = load_model(COUNTERFACTUAL / "unet_full.safetensors").eval()
    scores, _ = all_scores(model, data, probes, cfg, out, progress=False)
    roles = [r for r in probes.roles for _ in range(probes.combos.shape[1])]
    outputs = {
        "− slider loss (shipped)": torch.tensor([done[j.name]["slider"] for j in jobs]),
        "+ concept gap": torch.tensor([done[j.name]["gap"] for j in jobs]),
        "− concept gap": -torch.tensor([done[j.name]["gap"] for j in jobs]),
    }
    for name, measured in outputs.items():
        rows = lds_rows(scores, masks, measured.flatten(1), roles, cfg.lambdas, True)
        print(f"\n{name}: test LDS [95% CI] (lambda_r on validation)")
        for m, r in sorted(lds_summaries(rows, "concept-trak-cond").items()):
            ci = f"{r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"
            print(f"  {m:24s} {ci}  λ_r={r['lambda_r']:g}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/counterfactual"))
