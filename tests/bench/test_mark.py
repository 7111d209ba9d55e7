"""The uncaptioned-mark benchmark (bench/mark.py, mark_scoring.py, mark_judge.py): the detector's
boxes, the patch-search baseline against a loop, the metrics by hand, lambda_r chosen on the
validation queries only, and one end-to-end run on the shipped model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ctrak_fast.bench.mark_scoring import mark_metrics, patch_search, row_results
from ctrak_fast.models.factor_unet import MarkJudge, load_model, save_model


class _FixedMap(MarkJudge):
    """A MarkJudge whose per-pixel logits are given (tests the box logic alone)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__(width=8, image_size=logits.shape[-1])
        self.logits = logits

    def forward(self, images):
        return self.logits[: len(images)]


def test_detect_boxes_the_pixels_above_threshold_near_the_peak():
    logits = torch.full((2, 16, 16), -9.0)
    logits[0, 3:6, 10:14] = 2.0
    logits[0, 4, 11] = 5.0  # the peak
    logits[0, 14, 1] = 3.0  # above threshold but out of reach of the peak: not in the box
    score, boxes = _FixedMap(logits).detect(torch.zeros(2, 3, 16, 16), threshold=0.5)
    assert boxes[0].tolist() == [10, 3, 14, 6]
    assert boxes[1].tolist() == [-1, -1, -1, -1] and score[1] < 0.5
    assert score[0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())


def test_mark_judge_round_trips_through_a_model_file(tmp_path):
    judge = MarkJudge(width=8)
    save_model(judge, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert isinstance(back, MarkJudge) and torch.allclose(back(x), judge.eval()(x))


def _ncc_loop(train, image, box):
    x0, y0, x1, y1 = box
    p = image[:, y0:y1, x0:x1].flatten().double()
    p = p - p.mean()
    h, w = y1 - y0, x1 - x0
    out = []
    for t in train:
        best = -np.inf
        for y in range(t.shape[1] - h + 1):
            for x in range(t.shape[2] - w + 1):
                v = t[:, y : y + h, x : x + w].flatten().double()
                v = v - v.mean()
                den = p.norm() * v.norm()
                best = max(best, float(p @ v / den) if den > 0 else 0.0)
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


def test_patch_search_equals_a_loop_over_every_window():
    g = torch.Generator().manual_seed(5)
    train = torch.rand(4, 3, 9, 8, generator=g) * 2 - 1
    image = torch.rand(3, 9, 8, generator=g) * 2 - 1
    got = patch_search(train, image, (2, 1, 5, 5))
    assert torch.allclose(got.double(), _ncc_loop(train, image, (2, 1, 5, 5)), atol=1e-5)


def test_patch_search_finds_a_moved_glyph_that_a_fixed_region_misses():
    from ctrak_fast.bench.harness import pixel_cosine
    from ctrak_fast.data.marks import glyph

    train = torch.ones(2, 3, 16, 16)
    train[1, :, 10:15, 2:7] -= 2 * glyph(5)  # the glyph elsewhere in training image 1
    query = torch.ones(3, 16, 16)
    query[:, 1:6, 8:13] -= 2 * glyph(5)
    box = (8, 1, 13, 6)
    found = patch_search(train, query, box)
    assert found[1] > 0.99 and found[0] == 0.0
    fixed = pixel_cosine(train[:, :, 1:6, 8:13], query[:, 1:6, 8:13])[:, 0]
    assert fixed[0] == pytest.approx(fixed[1].item())  # same place: both white, no signal


def test_mark_metrics_by_hand():
    truth = torch.tensor([0, 1, 1, 0, 0, 1]) > 0
    m = mark_metrics(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]), truth)
    # ranks of the marked: 2, 3, 6 -> AP = (1/2 + 2/3 + 3/6) / 3; top R = 3 holds 2 of them
    assert m["ap"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 6) / 3)
    assert m["r-precision"] == pytest.approx(2 / 3) and m["p@10"] == pytest.approx(0.5)


def test_lambda_is_chosen_on_validation_queries_only():
    lambdas = [0.1, 1.0]
    good, bad = np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0])
    # validation queries favour lambda 1.0, the test queries lambda 0.1
    per_row = {
        "concept-trak · region": [
            np.stack([bad, good]),
            np.stack([good, bad]),
            np.stack([bad, good]),
            np.stack([good, bad]),
        ],
        "random": [np.stack([bad])] * 4,
    }
    roles = ["validation", "test", "validation", "test"]
    rows, chosen = row_results(per_row, roles, lambdas, "ap")
    assert chosen == {"concept-trak · region": 1.0}
    assert rows["concept-trak · region"]["test"]["ap"][0] == 0.0
    assert rows["concept-trak · region"]["validation"]["ap"] == 1.0
    assert rows["concept-trak · region"]["paired_ap"]["random"][0] == 0.0


@pytest.fixture(scope="module")
def marked_inputs():
    from ctrak_fast.data import make_dataset
    from ctrak_fast.models.shipped import shipped

    model, _, spec = shipped()
    data = make_dataset(dataclasses.replace(spec, mark_fraction=0.2, per_combo=20))
    return model, data


def test_mark_benchmark_refuses_before_featurizing(tmp_path, marked_inputs):
    from ctrak_fast.bench.mark import MarkConfig, run_mark

    model, data = marked_inputs
    cfg = MarkConfig(
        per_combo=3, k=64, candidates=8, queries=4, min_test_queries=2, threshold=1.0
    )  # a probability of 1.0 is never reached: nothing is found
    with pytest.raises(ValueError, match="found the mark in 0 of 8"):
        run_mark(model, MarkJudge(width=8), data, cfg, tmp_path, progress=False)
    assert not (tmp_path / "stores").exists()


def test_mark_benchmark_end_to_end(tmp_path, marked_inputs):
    """Every row scored against the stamped images; results.json keeps each query's top ids."""
    import json

    from ctrak_fast.bench.mark import MarkConfig, run_mark, write_mark_gallery
    from ctrak_fast.bench.mark_scoring import mark_table

    model, data = marked_inputs
    cfg = MarkConfig(
        per_combo=4,
        k=64,
        candidates=4,
        queries=4,
        min_test_queries=2,
        threshold=0.0,  # every sample "shows" it: the pipeline, not the judge, is under test
        lambdas=(0.1, 10.0),
        lambda_r=10.0,
        methods=("d-trak", "das", "pixel"),
        top=5,
    )
    res = run_mark(model, MarkJudge(width=8), data, cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = set(saved["rows"])
    assert {"d-trak · region", "d-trak · whole image", "das · region", "random"} <= rows
    assert {
        "caption lookup",
        "pixel · patch search (any place)",
        "das weight alone (no query)",
    } <= rows
    assert saved["n_marked"] == int(res["_train"].marked.sum()) > 0
    top = saved["queries"][0]["top"]["d-trak · region"]
    assert len(top["ids"]) == 5 and top["scores"] == sorted(top["scores"], reverse=True)
    assert set(saved["lambda_r"]) == {"d-trak · region", "d-trak · whole image"} | {
        "das · region",
        "das · whole image",
    }
    assert "caption lookup" in mark_table(saved)
    assert write_mark_gallery(res, tmp_path / "g.png").stat().st_size > 0


def test_cli_bench_mark_refuses_a_model_without_a_mark(tmp_path, capsys):
    from ctrak_fast.cli.app import main
    from ctrak_fast.models.shipped import ASSETS

    for f in ("unet_shapes16.safetensors", "judge_shapes16.safetensors", "shapes16.json"):
        (tmp_path / f).write_bytes((ASSETS / f).read_bytes())
    assert main(["bench", "mark", "--assets", str(tmp_path), "--name", "shapes16"]) == 1
    assert "no mark judge" in capsys.readouterr().err
    save_model(MarkJudge(width=8), tmp_path / "markjudge_shapes16.safetensors")
    assert main(["bench", "mark", "--assets", str(tmp_path), "--name", "shapes16"]) == 1
    assert "has no stamped mark" in capsys.readouterr().err


def test_mark_judge_learns_to_find_the_stamp(tmp_path):
    """A short training on fresh renders finds the stamp on held-back images it never saw."""
    from ctrak_fast.data import SyntheticConfig
    from ctrak_fast.train.mark_judge import synthetic_pool, train_mark_judge

    pool = synthetic_pool(SyntheticConfig(), 12, seed=123)
    judge = train_mark_judge(pool, tmp_path / "mj.safetensors", steps=250, batch_size=64)
    v = judge.validation
    assert v["found_on_marked"] >= 0.8 and v["found_on_unmarked"] <= 0.2 and v["box_iou"] > 0.5
    assert isinstance(load_model(tmp_path / "mj.safetensors"), MarkJudge)


def test_controls_are_samples_without_the_mark_asked_about_a_region_of_a_query_size(
    marked_inputs,
):
    from ctrak_fast.bench.mark import MarkConfig, draw_mark_queries

    model, _ = marked_inputs
    logits = torch.full((4, 16, 16), -9.0)
    logits[0, 2:5, 3:6] = 4.0  # samples 0 and 2 show a mark, 1 and 3 do not
    logits[2, 9:14, 9:14] = 4.0
    cfg = MarkConfig(candidates=4, queries=2, min_test_queries=1, controls=2, pad=1)
    queries, controls, found = draw_mark_queries(
        model, _FixedMap(logits), [(0, 0), (1, 1)], cfg, progress=False
    )
    assert found == 2 and [q["box"] for q in queries] == [[2, 1, 7, 6], [8, 8, 15, 15]]
    assert len(controls) == 2 and all(q["score"] < cfg.control_below for q in controls)
    for c, q in zip(controls, queries, strict=True):  # each control: a query's box size
        (x0, y0, x1, y1), (a0, b0, a1, b1) = c["box"], q["box"]
        assert (x1 - x0, y1 - y0) == (a1 - a0, b1 - b0) and 0 <= x0 and x1 <= 16 and y1 <= 16


def test_control_queries_are_scored_at_the_rows_chosen_lambda():
    lambdas = [0.1, 1.0]
    good, bad = np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0])
    per_row = {"d-trak · region": [np.stack([bad, good]), np.stack([bad, good])]}
    controls = {"d-trak · region": [np.stack([good, bad])]}  # at the chosen 1.0: AP 0
    rows, chosen = row_results(per_row, ["validation", "test"], lambdas, "ap", controls)
    assert chosen["d-trak · region"] == 1.0 and rows["d-trak · region"]["control"]["ap"][0] == 0.0


def test_the_shipped_mark_model_draws_the_mark_and_its_judge_finds_it():
    """shapes16mark: 15% of its training images stamped; the mark judge finds the mark in a
    similar share of its samples (19% measured over 320) and never in the unstamped renders."""
    from ctrak_fast.data import make_dataset
    from ctrak_fast.method import diffusion
    from ctrak_fast.models.shipped import ASSETS, MARKED, shipped

    model, _, spec = shipped(MARKED)
    mark_judge = load_model(ASSETS / f"markjudge_{MARKED}.safetensors")
    data = make_dataset(spec)
    assert spec.mark_fraction == 0.15 and int(data.marked.sum()) == 525
    cond = torch.tensor([[s, c] for s in (1, 2) for c in range(4)] * 8)
    x0, _ = diffusion.ddim_sample(
        model, cond, guidance=2.0, generator=torch.Generator().manual_seed(3)
    )
    score, _ = mark_judge.detect(x0.clamp(-1, 1))
    assert 0.05 <= (score >= 0.5).float().mean() <= 0.4
    clean, _ = mark_judge.detect(data.images[~data.marked][:200])
    stamped, _ = mark_judge.detect(data.images[data.marked][:200])
    assert (clean < 0.5).all() and (stamped >= 0.5).float().mean() > 0.95
