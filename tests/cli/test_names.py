"""Names, not just ids: a store records each row's image file and caption (sources.json), the
attribute result names them beside the ids, and `ctrak report` draws the store's own images, or
refuses, naming what is missing (never the shipped data in their place)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run, small_featurizer, snapshot, write_store
from PIL import Image

from ctrak_fast.data.images import load_image
from ctrak_fast.data.sources import file_sources, source_images
from ctrak_fast.engine.store import FeatureStore, SpecMismatch
from ctrak_fast.engine.store.sources import SOURCES, read_sources
from ctrak_fast.method.pipeline import featurize
from ctrak_fast.results import Query

N = 6


def image_folder(root: Path) -> tuple[list[Path], list[str]]:
    """N random 16 x 16 PNGs, half of them in a subfolder, with a caption each."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(N):
        path = root / ("sub" if i % 2 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files, [f"caption number {i}" for i in range(N)]


@pytest.fixture
def named_store(tmp_path, tiny_unet):
    files, captions = image_folder(tmp_path / "images")
    images = torch.stack([load_image(f, 8) for f in files])
    ids = torch.arange(N)
    sources = file_sources(tmp_path / "images", files, captions, ids.tolist())
    fz = small_featurizer(tiny_unet, loss="dsm", inversion=False)
    conds = torch.zeros(N, 2, dtype=torch.int64)
    store = featurize(fz, images, conds, ids, tmp_path / "store", batch_size=2, sources=sources)
    query = Query(torch.randn(1, fz.k), ("-thing",), {}, images[0])
    query.save(tmp_path / "q.safetensors")
    return tmp_path, store, fz, (images, conds, ids, sources)


def test_the_store_records_files_captions_and_versions(named_store):
    root, store, _, _ = named_store
    record = read_sources(store.path, store.meta)
    assert record["root"] == str((root / "images").resolve())
    assert record["files"] == ["img0.png", "sub/img1.png", "img2.png", "sub/img3.png", "img4.png",
                               "sub/img5.png"]  # fmt: skip
    assert record["captions"][3] == "caption number 3" and record["ids"] == list(range(N))
    assert store.meta["sources"]["rows"] == N
    versions = store.manifest["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"]
    assert {"ctrak_fast", "torch", "diffusers"} <= set(versions)
    assert store.verify() == []


def test_verify_names_a_missing_or_altered_record(named_store):
    _, store, _, _ = named_store
    path = store.path / SOURCES
    text = path.read_text()
    path.write_text(text.replace("caption number 3", "caption number 9"))
    assert any("sha256 differs" in p for p in store.verify())
    path.unlink()
    assert any("sources.json is missing" in p for p in store.verify())


def test_a_resume_with_other_images_is_refused(named_store):
    root, store, fz, (images, conds, ids, sources) = named_store
    other = dict(sources, captions=[c + "!" for c in sources["captions"]])
    with pytest.raises(SpecMismatch, match="meta.sources.sha256"):
        featurize(fz, images, conds, ids, store.path, batch_size=2, sources=other)
    # The same sources: resumes (nothing to do), the record rewritten where it was deleted.
    (store.path / SOURCES).unlink()
    featurize(fz, images, conds, ids, store.path, batch_size=2, sources=sources)
    assert store.verify() == []


def test_files_through_attribute_json_csv_and_report(named_store):
    root, store, _, (_, _, _, sources) = named_store
    argv = ["attribute", "--store", store.path, "--query", root / "q.safetensors", "--k", "2"]
    rc, out, err = run([*argv, "--out", root / "hits.json"])
    assert rc == 0, err
    hits = json.loads((root / "hits.json").read_text())
    for row in hits["top"] + hits["bottom"]:
        assert row["files"] == [sources["files"][i] for i in row["ids"]]
        assert row["captions"] == [f"caption number {i}" for i in row["ids"]]
    rc, out, err = run([*argv, "--format", "csv"])
    header, first = out.splitlines()[:2]
    assert header.endswith("id,score,file,caption"), header
    row_id = int(first.split(",")[5])
    assert first.endswith(f"{sources['files'][row_id]},caption number {row_id}")
    rc, out, err = run(["report", "--result", root / "hits.json", "--out", root / "g.png"])
    assert rc == 0, err
    assert Image.open(root / "g.png").size[0] > 300


def test_report_refuses_missing_images_and_follows_a_moved_folder(named_store, monkeypatch):
    root, store, _, _ = named_store
    monkeypatch.chdir(root)  # the result names its store and query relative to here
    rc, _, err = run(["attribute", "--store", "store", "--query", "q.safetensors", "--k", "2",
                      "--out", "hits.json"])  # fmt: skip
    assert rc == 0, err
    hits = json.loads((root / "hits.json").read_text())
    shown = {f for row in hits["top"] + hits["bottom"] for f in row["files"]}
    shutil.move(root / "images", root / "moved")
    before = snapshot(root)
    rc, _, err = run(["report", "--result", "hits.json", "--out", "g.png"])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith("ctrak: error: hits.json: ") and "missing" in lines[0]
    named = lines[0].split("e.g. ")[1].split(" (")[0]
    assert Path(named).relative_to(root / "images").as_posix() in shown
    assert "--image-root" in lines[0]
    assert snapshot(root) == before  # no gallery of other images, nothing written
    rc, _, err = run(["report", "--result", "hits.json", "--out", "g.png", "--image-root",
                      "moved"])  # fmt: skip
    assert rc == 0 and (root / "g.png").is_file(), err


def test_a_store_without_sources_names_ids_only_and_report_refuses(tmp_path):
    store = write_store(tmp_path / "old", torch.randn(5, 8), torch.arange(5), 4)
    Query(torch.randn(1, 8), ("q",), {}, torch.zeros(3, 16, 16)).save(tmp_path / "q.st")
    argv = ["attribute", "--store", store.path, "--query", tmp_path / "q.st", "--k", "2"]
    rc, _, err = run([*argv, "--out", tmp_path / "r.json"])
    assert rc == 0 and "records no sources" in err
    assert "files" not in json.loads((tmp_path / "r.json").read_text())["top"][0]
    rc, _, err = run(["report", "--result", tmp_path / "r.json", "--store", store.path,
                      "--query", tmp_path / "q.st", "--out", tmp_path / "g.png"])  # fmt: skip
    assert rc == 1 and "records no sources of its rows" in err
    assert not (tmp_path / "g.png").exists()


def test_shipped_data_stores_record_their_generator(tmp_path, monkeypatch):
    """`ctrak featurize` on the shipped data: the store names the generator, and report draws
    its images again (the same pixels as the data set)."""
    from ctrak_fast.data import SyntheticConfig, make_dataset
    from ctrak_fast.models.shipped import ASSETS, SHIPPED

    monkeypatch.chdir(tmp_path)
    flags = ["--k", "32", "--timesteps", "499"]
    rc, _, err = run(["featurize", "--per-combo", "1", *flags, "--no-inversion", "--out", "st"])
    assert rc == 0, err
    record = read_sources(Path("st"), FeatureStore.open("st").meta)
    assert "synthetic" in record["generator"] and "files" not in record
    data = make_dataset(SyntheticConfig.load_json(ASSETS / f"{SHIPPED}.json"))
    ids = record["ids"][:3]
    assert torch.equal(source_images(record, ids, data.image_size), data.images[ids])
    assert record["captions"][0].startswith("shape=")
