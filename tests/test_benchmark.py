"""The synthetic concept benchmark end to end on the shipped model, at toy size: the results.json
schema of the demo issue, every method, both query negatives."""

from __future__ import annotations

import json

import pytest

from ctrak_fast.bench.quality import METHODS, QualityConfig, run_quality
from ctrak_fast.data import make_dataset
from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.method.query import ConceptQuerySpec
from ctrak_fast.models.shipped import shipped

TS = (299, 699)


@pytest.mark.slow
@pytest.mark.parametrize("negative", ["flip", "null"])
def test_quality_results_schema(tmp_path, negative):
    model, judge, data_cfg = shipped()
    cfg = QualityConfig(
        per_combo=1,
        k=32,
        queries_per_combo=1,
        heldout_queries_per_combo=2,
        query_candidates=2,
        negative=negative,
        dps=FeatureSpec(timesteps=TS, inversion_steps=10),
        concept=ConceptQuerySpec(timesteps=TS, steps=10, n_draws=1),
    )
    res = run_quality(model, judge, make_dataset(data_cfg), cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["methods"]) == set(METHODS)
    for by_split in saved["methods"].values():
        assert set(by_split) == {"in_distribution", "heldout"}
        for by_factor in by_split.values():
            assert set(by_factor) == {"shape", "colour"}
            for m in by_factor.values():
                assert 0.0 <= m["p@10"] <= 1.0 and 0.0 <= m["ap"] <= 1.0
                for key in ("p@10_ci", "ap_ci"):  # NaN-free where there are test queries
                    lo, hi = m[key]
                    assert lo <= hi
                assert 0.0 <= m["p@10_fixed"] <= m["p@10_oracle"] <= 1.0
    assert set(saved["chance"]) == {"shape", "colour"}
    assert saved["n_train"] == 14 and saved["k"] == 32 and saved["seconds"] > 0
    assert saved["config"]["negative"] == negative
    assert res["n_queries"]["in_distribution"] >= 1
    # the calibration rows and the lambda chosen on validation queries
    for name in ("random", "random_oracle"):
        for split in ("in_distribution", "heldout"):
            assert set(saved["calibration"][name][split]) == {"shape", "colour"}
    assert set(saved["lambda_r"]) == set(METHODS) - {"pixel"}
    assert all(lam in saved["lambdas"] for lam in saved["lambda_r"].values())
    assert "concept-trak - d-trak" in saved["paired"]
