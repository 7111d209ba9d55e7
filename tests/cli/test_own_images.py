"""The README's "Your own images" walk-through, through the CLI at toy size: a folder of real
handwritten digits (3 factors, two held-out digit-colour pairs) -> train -> featurize -> concept
query -> attribute -> report -> benchmark. Also: training resumes from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from ctrak_fast.data.digit_folder import make_digit_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--channels", "8,16", "--batch-size", "16", "--judge-steps", "40", "--eval-n", "1"]
FEATURES = ["--k", "64", "--timesteps", "499", "--n-draws", "1"]


def ctrak(*args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ctrak_fast.cli", *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    labels = make_digit_folder(root / "digits", per_combo=2)
    train = ctrak(
        "train",
        "--folder",
        root / "digits",
        "--labels",
        labels,
        "--out",
        root / "m",
        "--name",
        "digits",
        "--steps",
        "30",
        *TINY,
    )
    return root, labels, train


def test_train_writes_model_judge_samples_and_eval(walk):
    root, labels, train = walk
    for name in (
        "unet_digits.safetensors",
        "judge_digits.safetensors",
        "digits.json",
        "digits_eval.json",
        "digits_samples.png",
    ):
        assert (root / "m" / name).is_file(), name
    assert "train_diffusion: N=40" in train.stderr  # progress as log lines (not a terminal)
    report = json.loads((root / "m" / "digits_eval.json").read_text())
    rows = report["results"]["guidance_1"]["per_combo"]
    assert len(rows) == 24 and sum(r["heldout"] for r in rows.values()) == 4
    assert set(report["judge_validation_accuracy"]) == {"digit", "colour", "background"}


def test_walk_featurize_query_attribute_report_benchmark(walk):
    root, labels, _ = walk
    model = root / "m" / "unet_digits.safetensors"
    data = ["--folder", root / "digits", "--labels", labels]
    feat = ctrak(
        "featurize",
        "--model",
        model,
        *data,
        "--method",
        "concept-trak",
        "--k",
        "64",
        "--timesteps",
        "499",
        "--out",
        root / "store",
    )
    assert "40 rows x k=64" in feat.stdout
    assert "featurize dps" in feat.stderr  # a log line of the progress, not a bar
    q = ctrak(
        "query",
        "--model",
        model,
        "--method",
        "concept-trak",
        "--concept",
        "digit=3,colour=red",
        *FEATURES,
        "--out",
        root / "q.safetensors",
    )
    # Only the factors the concept sets are removed: background is left alone.
    assert "(-digit, -colour)" in q.stdout
    ctrak(
        "attribute",
        "--store",
        root / "store",
        "--query",
        root / "q.safetensors",
        "--k",
        "5",
        "--out",
        root / "hits.json",
    )
    hits = json.loads((root / "hits.json").read_text())
    assert hits["concept"] == "digit=3,colour=red" and len(hits["top"]) == 2
    assert all(len(t["ids"]) == 5 for t in hits["top"])
    # The gallery draws the images the store records; the result names their files.
    assert all((root / "digits" / f).is_file() for f in hits["top"][0]["files"])
    ctrak("report", "--result", root / "hits.json", "--out", root / "gallery.png")
    assert (root / "gallery.png").stat().st_size > 1000
    bench = ctrak(
        "bench",
        "quality",
        *data,
        "--model",
        model,
        "--out",
        root / "bench",
        "--per-combo",
        "2",
        "--k",
        "64",
        "--queries-per-combo",
        "1",
        "--heldout-queries-per-combo",
        "2",
        "--methods",
        "d-trak,concept-trak",
        "--keep-unconfirmed",
        "--quiet",
    )
    results = json.loads((root / "bench" / "results.json").read_text())
    assert set(results["chance"]) == {"digit", "colour", "background"}
    assert "P@10" in bench.stdout
    # a handful of held-out queries, unconfirmed ones kept: marked underpowered, not refused
    assert "heldout" in results["underpowered"]
    assert "UNDERPOWERED" in bench.stdout


class Killed(Exception):
    """Stands for a kill -9 right after a checkpoint."""


def test_a_killed_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """train_diffusion's state file: a run killed after a checkpoint continues to the same
    weights as an uninterrupted run."""
    import ctrak_fast.train.diffusion as train
    from ctrak_fast.data import load_image_folder

    labels = make_digit_folder(tmp_path / "d", per_combo=1, digits=(0, 1), held_out=())
    ds = load_image_folder(tmp_path / "d", labels)
    kw = dict(
        steps=6,
        batch_size=4,
        checkpoint_every=3,
        progress=False,
        model_kwargs={"block_out_channels": (8, 16), "attention": (False, True)},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train.train_diffusion(ds, tmp_path / "full.safetensors", **kw)
        real_save = train.save_state

        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            raise Killed

        monkeypatch.setattr(train, "save_state", save_then_die)
        with pytest.raises(Killed):
            train.train_diffusion(ds, tmp_path / "cut.safetensors", **kw)
        monkeypatch.undo()
        assert (tmp_path / "cut.safetensors.state").is_file()
        resumed = train.train_diffusion(ds, tmp_path / "cut.safetensors", **kw)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "cut.safetensors.state").exists()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="a training state of another run"):
        monkeypatch.setattr(train, "save_state", save_then_die)
        with pytest.raises(Killed):
            train.train_diffusion(ds, tmp_path / "other.safetensors", **kw)
        monkeypatch.undo()
        train.train_diffusion(ds, tmp_path / "other.safetensors", **{**kw, "lr": 1e-3})


def test_a_folder_with_a_stamped_mark_trains_its_detector_and_reaches_bench_mark(tmp_path):
    """`train --folder --mark-fraction`: the mark's truth is in <name>.json (regenerated with
    the data), a MarkJudge is written beside the model, and `bench mark` reads them; this
    30-step model draws no mark, so the benchmark refuses before featurizing, in one line."""
    from ctrak_fast.models.shipped import asset_dataset, load_data_spec

    labels = make_digit_folder(tmp_path / "digits", per_combo=2)
    args = ["--out", tmp_path / "m", "--name", "digits", "--steps", "30", *TINY]
    ctrak("train", "--folder", tmp_path / "digits", "--labels", labels, *args,
          "--mark-fraction", "0.25")  # fmt: skip
    assert (tmp_path / "m" / "markjudge_digits.safetensors").is_file()
    spec = load_data_spec(tmp_path / "m" / "digits.json")
    assert spec.mark_fraction == 0.25
    data = asset_dataset(spec)
    assert int(data.marked.sum()) == 10 and (data.marks[data.marked] >= 0).all()
    res = ctrak("bench", "mark", "--assets", tmp_path / "m", "--name", "digits", "--out",
                tmp_path / "b", "--candidates", "8", "--k", "64", check=False)  # fmt: skip
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("ctrak: error: the mark judge found")
    assert not (tmp_path / "b" / "stores").exists()
