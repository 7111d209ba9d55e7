"""The synthetic concept benchmark end to end on the shipped model, at toy size: the results.json
schema of the demo issue, every method, both query negatives."""

from __future__ import annotations

import json

import pytest
import torch

from ctrak_fast.bench.quality import METHODS, QualityConfig, run_quality
from ctrak_fast.data import make_dataset
from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.method.query import ConceptQuerySpec
from ctrak_fast.models.shipped import shipped

TS = (299, 699)


def toy_config(**kw) -> QualityConfig:
    """The benchmark at toy size (a handful of queries: no query floor)."""
    base = dict(
        per_combo=1,
        k=32,
        queries_per_combo=1,
        heldout_queries_per_combo=2,
        query_candidates=2,
        min_test_queries=0,
        dps=FeatureSpec(timesteps=TS, inversion_steps=10),
        concept=ConceptQuerySpec(timesteps=TS, steps=10, n_draws=1),
    )
    return QualityConfig(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("negative", ["flip", "null"])
def test_quality_results_schema(tmp_path, negative):
    model, judge, data_cfg = shipped()
    cfg = toy_config(negative=negative)
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
    # each query's top ids: the pixel row's are the pixel ranking of that query (N = 14 < 100)
    q = saved["queries"][0]
    assert {q["split"], q["role"]} <= {"in_distribution", "heldout", "validation", "test"}
    pixel = q["top"]["pixel"]["shape"]
    assert len(pixel["ids"]) == 14 and pixel["scores"] == sorted(pixel["scores"], reverse=True)
    train = res["_train"]
    first = next(g for g in res["_gallery"] if g["split"] == q["split"])
    want = torch.argsort(first["scores"]["pixel"][:, 0], descending=True, stable=True)
    assert pixel["ids"][:3] == train.ids[want[:3]].tolist()


@pytest.mark.slow
def test_incomplete_captions_benchmark(tmp_path):
    """Half of each factor's captions dropped: the training side reads the captions, the metrics
    what the images show; the caption-lookup rows, AP and the uncaptioned recall are reported."""
    import torch

    from ctrak_fast.bench.protocol import CAPTION_LOOKUP, COMPLETED_LOOKUP
    from ctrak_fast.bench.tables import format_table
    from ctrak_fast.data import SyntheticConfig

    model, judge, data_cfg = shipped()
    data = make_dataset(SyntheticConfig(**{**data_cfg.to_dict(), "caption_drop": 0.5}))
    methods = ("concept-trak-cond", "concept-trak-complete", "d-trak", "pixel")
    cfg = toy_config(per_combo=3, methods=methods, select_lambda_by="ap")
    res = run_quality(model, judge, data, cfg, tmp_path, progress=False)
    train = res["_train"]
    assert train.uncaptioned.any() and not torch.equal(train.captions, train.labels)
    assert "complete captions" in res["timings"]
    assert (tmp_path / "stores" / "concept-trak-complete").is_dir()  # its own conditions
    for name in (CAPTION_LOOKUP, COMPLETED_LOOKUP):
        cell = res["calibration"][name]["heldout"]["colour"]
        assert 0.0 <= cell["ap"] <= 1.0 and 0.0 <= cell["recall_uncaptioned"] <= 1.0
    cell = res["methods"]["concept-trak-cond"]["heldout"]["colour"]
    assert 0.0 <= cell["recall_uncaptioned"] <= 1.0 and "recall_uncaptioned_ci" in cell
    assert res["select_lambda_by"] == "ap"
    assert "concept-trak-complete - caption-lookup" in res["paired_ap"]
    table = format_table(res)
    assert "| caption-lookup |" in table and "Recall of the uncaptioned carriers" in table


@pytest.mark.slow
def test_complete_captions_share_the_store(tmp_path):
    """With every caption complete, completion changes nothing: concept-trak-complete reads
    concept-trak-cond's store and scores the same."""
    model, judge, data_cfg = shipped()
    cfg = toy_config(methods=("concept-trak-cond", "concept-trak-complete"))
    res = run_quality(model, judge, make_dataset(data_cfg), cfg, tmp_path, progress=False)
    assert not (tmp_path / "stores" / "concept-trak-complete").exists()
    a, b = res["methods"]["concept-trak-cond"], res["methods"]["concept-trak-complete"]
    assert a == b
    lookup = res["calibration"]["caption-lookup"]["heldout"]["shape"]
    assert lookup["ap"] == 1.0  # every carrier first (P@10 is bounded by 3 carriers here)


def test_too_few_test_queries_are_refused_before_featurizing(tmp_path):
    model, judge, data_cfg = shipped()
    cfg = toy_config(min_test_queries=8)
    with pytest.raises(
        ValueError,
        match="only 2 judge-confirmed test queries in the heldout split, below the floor of 8",
    ):
        run_quality(model, judge, make_dataset(data_cfg), cfg, tmp_path, progress=False)
    assert not (tmp_path / "stores").exists()
