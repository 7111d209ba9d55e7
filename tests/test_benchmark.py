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
    assert set(saved["chance"]) == {"shape", "colour"}
    assert saved["n_train"] == 14 and saved["k"] == 32 and saved["seconds"] > 0
    assert saved["config"]["negative"] == negative
    assert res["n_queries"]["in_distribution"] >= 1
