"""bench counterfactual: LDS on a toy linear problem, deterministic subsets, the resumable
retraining queue, the caption-lookup arm and the command end to end on a tiny setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ctrak_fast.bench.counterfactual.bench import removal_arms
from ctrak_fast.bench.counterfactual.ground_truth import lds_jobs, parse_concept, prepare
from ctrak_fast.bench.counterfactual.lds import lds_per_query, spearman, subset_predictions
from ctrak_fast.bench.counterfactual.probes import Probes
from ctrak_fast.bench.counterfactual.queue import Job, copy_identical, pending, run_jobs
from ctrak_fast.bench.counterfactual.setting import (
    CounterfactualSetting,
    mask_from_text,
    mask_to_text,
    subset_masks,
)
from ctrak_fast.bench.counterfactual.tables import removal_summary

TINY = {
    "shapes": ["circle", "triangle"],
    "colours": ["red", "blue"],
    "common_count": 2,
    "rare_count": 1,
    "block_out_channels": [8, 16],
    "steps": 3,
    "batch_size": 4,
    "n_subsets": 3,
    "judge_steps": 2,
    "judge_renders": 4,
    "queries_per_combo": 1,
    "query_candidates": 1,
    "confirm_queries": False,
    "n_draws": 1,
    "whole_points": 2,
    "removal_samples": 2,
    "removal_queries": 1,
    "removal_fractions": [0.1],
    "removal_seeds": [0],
}


def tiny_truth(folder: Path, work: Path) -> Path:
    folder.mkdir(parents=True)
    CounterfactualSetting(**TINY).save(folder / "setting.json")
    prepare(folder, work, progress=False)
    return folder


def test_lds_recovers_a_linear_datamodel():
    """Outputs that are exactly a sum of per-image effects: their own effects score LDS 1, their
    negation -1, and the rank correlation is scipy's."""
    g = torch.Generator().manual_seed(1)
    n, m, q = 40, 30, 5
    effects = torch.randn(q, n, generator=g)
    masks = subset_masks(n, m, 0.5, seed=3)
    measured = subset_predictions(effects, masks)
    assert np.allclose(lds_per_query(effects, masks, measured), 1.0)
    assert np.allclose(lds_per_query(-effects, masks, measured), -1.0)
    noisy = effects + 2.0 * torch.randn(q, n, generator=g)
    mine = lds_per_query(noisy, masks, measured)
    pred = subset_predictions(noisy, masks)
    ref = [spearmanr(pred[:, j], measured[:, j]).statistic for j in range(q)]
    assert np.allclose(mine, ref) and (mine < 1).all()


def test_spearman_ties_match_scipy():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 1.0], [3.0, 0.0], [3.0, 2.0]])
    b = np.array([[5.0, 1.0], [4.0, 2.0], [4.0, 2.0], [1.0, 3.0], [0.0, 0.0]])
    ref = [spearmanr(a[:, j], b[:, j]).statistic for j in range(2)]
    assert np.allclose(spearman(a, b), ref)
    with pytest.raises(ValueError, match="non-finite"):
        spearman([[np.nan], [1.0]], [[1.0], [2.0]])


def test_subset_masks_are_deterministic_and_halves():
    a = subset_masks(50, 6, 0.5, seed=7)
    assert torch.equal(a, subset_masks(50, 6, 0.5, seed=7))
    assert torch.equal(a[:3], subset_masks(50, 3, 0.5, seed=7))  # one mask never depends on M
    assert not torch.equal(a, subset_masks(50, 6, 0.5, seed=8))
    assert (a.sum(1) == 25).all()
    assert torch.equal(mask_from_text(mask_to_text(a[0]), 50), a[0])
    with pytest.raises(ValueError):
        mask_from_text("012", 3)


def test_setting_round_trip_and_refusals(tmp_path):
    s = CounterfactualSetting(**TINY)
    s.save(tmp_path / "s.json")
    assert CounterfactualSetting.load(tmp_path / "s.json") == s
    data = s.dataset()
    # 1 common combination (no rare value) x 2 + 3 rare ones x 1
    assert len(data) == 1 * 2 + 3 * 1 and torch.equal(data.ids, torch.arange(len(data)))
    (tmp_path / "bad.json").write_text(json.dumps({**TINY, "colour_count": 3}))
    with pytest.raises(ValueError, match="unknown keys"):
        CounterfactualSetting.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="rare"):
        CounterfactualSetting(rare=("purple",))


def test_setting_caption_drop_tells_the_model_less_and_keeps_the_truth():
    complete = CounterfactualSetting(**TINY).dataset()
    partial = CounterfactualSetting(**{**TINY, "caption_drop": 0.5}).dataset()
    assert torch.equal(partial.labels, complete.labels)  # what the images show
    assert torch.equal(partial.images, complete.images)
    null = torch.tensor([len(complete.values["shape"]), len(complete.values["colour"])])
    dropped = partial.captions == null
    assert dropped.any() and not (complete.captions == null).any()
    told = ~dropped
    assert torch.equal(partial.captions[told], complete.labels[told])
    # the shipped setting (no key) still reads, with every caption complete
    shipped = Path(__file__).parents[2] / "ctrak_fast/assets/counterfactual/shapes9/setting.json"
    raw = json.loads(shipped.read_text())
    assert "caption_drop" not in raw and CounterfactualSetting(**raw).caption_drop == 0.0


def _outputs(folder: Path) -> dict:
    return {
        p.name: {k: v for k, v in json.loads(p.read_text()).items() if "seconds" not in k}
        for p in sorted((folder / "outputs").glob("*.json"))
    }


def test_queue_resumes_after_a_kill(tmp_path):
    """kill -9 of a running queue: the rerun does only the jobs left, and every measured output
    equals an uninterrupted run's."""
    clean = tiny_truth(tmp_path / "clean", tmp_path / "work_clean")
    run_jobs(lds_jobs(clean), clean, tmp_path / "work_clean", workers=1)
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("setting.json", "unet_full.safetensors", "judge.safetensors",
                 "probes.safetensors", "masks.json"):  # fmt: skip
        (killed / name).write_bytes((clean / name).read_bytes())
    code = (
        "import sys; from pathlib import Path;"
        "from ctrak_fast.bench.counterfactual.ground_truth import lds_jobs;"
        "from ctrak_fast.bench.counterfactual.queue import run_jobs;"
        "f = Path(sys.argv[1]); run_jobs(lds_jobs(f), f, Path(sys.argv[2]), workers=1)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(killed), str(tmp_path / "wk")], env=env
    )
    first = killed / "outputs" / "lds-000.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    left = pending(lds_jobs(killed), killed / "outputs")
    assert 0 < len(left) < len(lds_jobs(killed)) or not left
    done = run_jobs(lds_jobs(killed), killed, tmp_path / "wk", workers=1)
    assert sorted(done) == sorted(j.name for j in left)
    assert _outputs(killed) == _outputs(clean)


def test_identical_jobs_are_copied_not_retrained(tmp_path):
    # two methods that remove the same images at the same seed: one model, two outputs files
    a = Job("remove-a-s0", "0101", 0, ((1, 0),), "q1f0/a/50")
    b = Job("remove-b-s0", "0101", 0, ((1, 0),), "q1f0/b/50")
    c = Job("remove-c-s0", "0101", 1, ((1, 0),), "q1f0/c/50")  # another seed: its own model
    out = tmp_path / "outputs"
    out.mkdir()
    assert copy_identical([a, b, c], [a, b, c], out) == []  # nothing done yet
    (out / "remove-a-s0.json").write_text(json.dumps({"job": a.name, "loss": 1.5}))
    assert copy_identical([a, b, c], [b, c], out) == ["remove-b-s0"]
    got = json.loads((out / "remove-b-s0.json").read_text())
    assert got == {"job": "remove-b-s0", "loss": 1.5, "same_as": "remove-a-s0"}
    assert [j.name for j in pending([a, b, c], out)] == ["remove-c-s0"]


def test_caption_lookup_arm_removes_carriers_first():
    s = CounterfactualSetting(**{**TINY, "common_count": 6, "rare_count": 2,
                                 "removal_fractions": [0.3]})  # fmt: skip
    data = s.dataset()
    n = len(data)
    combos = torch.tensor([[1, 1], [0, 0]])  # triangle/blue (rare values), circle/red
    probes = Probes(
        images=torch.zeros(2, 3, 16, 16), combos=combos, roles=["test", "validation"],
        whole_t=torch.zeros(2, 1, dtype=torch.long), whole_eps=torch.zeros(2, 1, 3, 16, 16),
        concept_x=torch.zeros(2, 1, 3, 16, 16), concept_t=torch.zeros(2, 1, dtype=torch.long),
        target=torch.zeros(2, 2, 1, 3, 16, 16), negatives=torch.zeros(2, 2, 2, 2, dtype=torch.long),
    )  # fmt: skip
    named = (data.captions[None] == combos[:, None]).float()
    scores = {"caption lookup": named[None], "random": torch.rand(1, 2, n, 2)}
    arms = removal_arms(scores, {}, [1.0], probes, s, n)
    q, f = parse_concept(next(iter(arms)))
    assert (q, f) == (0, 0)  # the first rare test unit: query 0's shape (triangle)
    keep = mask_from_text(arms["q0f0/caption lookup/30"], n)
    removed = (~keep).nonzero().flatten()
    carriers = (data.labels[:, 0] == 1).nonzero().flatten()
    assert len(removed) == round(0.3 * n)
    assert set(carriers.tolist()) <= set(removed.tolist())  # every triangle goes first
    assert mask_from_text(arms["q0f0/random/30"], n).sum() == n - len(removed)


def test_removal_summary_pairs_by_concept_and_seed():
    table = {
        "q0f0": {
            "no removal": {"0": {"rate": [0.9, 0.8], "slider": [0, 0]}},
            "concept-trak-cond": {"10": {"rate": [0.2, 0.3], "slider": [0, 0]}},
            "random": {"10": {"rate": [0.9, 0.7], "slider": [0, 0]}},
        }
    }
    s = removal_summary(table, "concept-trak-cond")["10"]
    assert s["concept-trak-cond"]["drop"][0] == pytest.approx(0.6)
    assert s["random"]["drop"][0] == pytest.approx(0.05)
    assert s["random"]["concept-trak-cond − this (drop)"][0] == pytest.approx(0.55)


def test_command_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    from ctrak_fast.cli import main

    (tmp_path / "s.json").write_text(json.dumps(TINY))
    truth, out = tmp_path / "truth", tmp_path / "out"
    args = ["bench", "counterfactual", "--truth", str(truth), "--setting", str(tmp_path / "s.json"),
            "--retrain", "--workers", "1", "--work", str(tmp_path / "work"), "--out", str(out),
            "--k", "64", "--methods", "concept-trak-cond,d-trak,pixel", "--quiet"]  # fmt: skip
    assert main(args) in (0, None)
    text = capsys.readouterr().out
    for row in ("concept-trak-cond", "d-trak", "pixel", "caption lookup", "random"):
        assert row in text
    results = json.loads((out / "results.json").read_text())
    assert results["n_subsets"] == 3 and (out / "lds_scatter.png").exists()
    assert results["removal"]  # the removal arms were retrained and measured
    masks = json.loads((truth / "masks.json").read_text())
    assert len(masks["lds"]) == 3 and masks["removal"]
    # a GPU asked for on a machine without one: one line, before any work
    if not torch.cuda.is_available():
        assert main([*args[:2], "--truth", str(truth), "--device", "cuda", "--out", str(out)]) == 1
        assert "no CUDA device" in capsys.readouterr().err
    # the ground truth is never overwritten by an output
    args = ["bench", "counterfactual", "--truth", str(truth), "--out", str(truth / "x")]
    assert main(args) == 1
    assert "inside the ground-truth folder" in capsys.readouterr().err
