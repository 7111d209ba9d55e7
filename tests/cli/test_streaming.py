"""`ctrak featurize --folder` streams a pixel model's training images from disk: at most one
batch of decoded images is alive at any time, the store (and its DAS store) is byte for byte the
one written from the whole set decoded into memory, and a run killed at random points resumes
to those same bytes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from forkserver import not_progress, shared_server, store_files, tiny_assets
from helpers import LiveRows, run
from PIL import Image

import ctrak_fast.data
from ctrak_fast.data import SyntheticConfig, make_dataset

BATCH = 2
ARGV = ["featurize", "--method", "d-trak", "--timesteps", "499", "--k", "16"]
LAYOUT = ["--batch-size", str(BATCH), "--shard-rows", "4"]  # 24 images: 6 shards of 2 batches


@pytest.fixture
def live_rows(monkeypatch):
    return LiveRows.counting(monkeypatch)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model and its 24 synthetic training images as a labelled PNG folder."""
    root = tmp_path_factory.mktemp("stream")
    model, config = tiny_assets(root / "assets")
    data = make_dataset(SyntheticConfig.load_json(config))
    (root / "images").mkdir()
    labels = {}
    for i, (image, row) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(root / "images" / f"{i:03d}.png")
        labels[f"{i:03d}.png"] = {
            f: data.values[f][v] for f, v in zip(data.factors, row, strict=True)
        }
    (root / "labels.json").write_text(json.dumps(labels))
    return root, model


def featurize_argv(root: Path, model: Path, out: Path) -> list:
    data = ["--folder", root / "images", "--labels", root / "labels.json", "--image-size", "8"]
    return [*ARGV, "--model", model, *data, *LAYOUT, "--out", out / "s", "--das-out", out / "das"]


def in_memory(monkeypatch):
    """The folder decoded whole before featurization (what `featurize --folder` did before)."""
    load = ctrak_fast.data.load_image_folder
    monkeypatch.setattr(
        ctrak_fast.data, "load_image_folder", lambda *a, **kw: load(*a, **{**kw, "decode": True})
    )


def test_a_folder_streams_one_batch_at_a_time_to_the_in_memory_bytes(
    folder, tmp_path, monkeypatch, live_rows, one_thread
):
    root, model = folder
    rc, out, err = run(featurize_argv(root, model, tmp_path / "stream"))
    assert rc == 0 and out.strip() == f"24 rows x k=16 in {tmp_path / 'stream' / 's'}", err
    assert live_rows.read == 24 and live_rows.peak == BATCH  # each image decoded once, alone
    in_memory(monkeypatch)
    rc, _, err = run(featurize_argv(root, model, tmp_path / "memory"))
    assert rc == 0, err
    for name in ("s", "das"):
        streamed = store_files(tmp_path / "stream" / name)
        assert streamed == store_files(tmp_path / "memory" / name), name
        assert "sources.json" in streamed  # the rows are named by their files either way


def test_a_folder_with_a_bad_file_is_refused_before_the_store_is_touched(folder, tmp_path):
    root, model = folder
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("000.png", "001.png"):
        (bad / name).write_bytes((root / "images" / name).read_bytes())
    (bad / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # its header is unreadable
    labels = {n: {"shape": "circle", "colour": "red"} for n in ("000.png", "001.png")}
    (bad / "labels.json").write_text(json.dumps(labels))
    argv = [*ARGV, "--model", model, "--folder", bad, "--labels", bad / "labels.json"]
    rc, _, err = run([*argv, "--image-size", "8", "--out", tmp_path / "s"])
    assert rc == 1 and err.strip().startswith("ctrak: error: ") and "001.png: unreadable" in err
    assert not (tmp_path / "s").exists()


def test_a_streaming_run_killed_at_random_points_resumes_to_the_same_bytes(
    folder, tmp_path_factory
):
    root, model = folder
    server = shared_server(tmp_path_factory)
    ref = tmp_path_factory.mktemp("ref")
    done = server.run(featurize_argv(root, model, ref))
    assert done.rc == 0 and not_progress(done.stderr) == [], done.stderr
    want = {name: store_files(ref / name) for name in ("s", "das")}
    rng = random.Random(3)
    outs = [tmp_path_factory.mktemp(f"kill{t}") for t in range(6)]
    kills = [
        server.start(featurize_argv(root, model, o), kill_at=rng.randint(1, done.calls))
        for o in outs
    ]
    assert sum(server.wait(child).rc == -9 for child in kills) == len(outs)
    for out in outs:
        res = server.run(featurize_argv(root, model, out))
        assert res.rc == 0 and not_progress(res.stderr) == [], res.stderr
        for name in ("s", "das"):
            assert store_files(out / name) == want[name], (out, name)
