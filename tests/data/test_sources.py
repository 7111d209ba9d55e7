"""A training set's sources record (data/sources.py): each row's file named relative to its
folder, whether the folder was given as an absolute or a relative path, and read back from it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import captioned_images

from ctrak_fast.data.captions import read_captions
from ctrak_fast.data.folder import load_image_folder
from ctrak_fast.data.images import load_image
from ctrak_fast.data.sources import dataset_sources, file_sources, source_images


def test_a_relative_folder_names_its_files_once(tmp_path, monkeypatch):
    """`--images images` from the folder's parent: read_captions gives images/0.png, and the
    record names 0.png under the absolute folder (not images/images/0.png)."""
    captioned_images(tmp_path / "images", ["a", "b", "c"], size=8)
    (tmp_path / "images" / "sub").mkdir()
    (tmp_path / "images" / "0.png").rename(tmp_path / "images" / "sub" / "0.png")
    meta = tmp_path / "images" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"0.png"', '"sub/0.png"'))
    monkeypatch.chdir(tmp_path)
    files, captions = read_captions("images")
    assert [f.as_posix() for f in files] == ["images/1.png", "images/2.png", "images/sub/0.png"]
    record = file_sources("images", files, captions, [0, 1, 2])
    assert record["root"] == str(tmp_path / "images")
    assert record["files"] == ["1.png", "2.png", "sub/0.png"]
    assert file_sources(
        tmp_path / "images", [p.absolute() for p in files], captions, [0, 1, 2]
    ) == (record)  # the same record from absolute paths
    monkeypatch.chdir(tmp_path / "images" / "sub")  # read back from anywhere (report's cwd)
    want = torch.stack([load_image(tmp_path / f, 8) for f in files])
    assert torch.equal(source_images(record, [0, 1, 2], 8), want)


def test_a_file_outside_the_folder_is_refused(tmp_path, monkeypatch):
    captioned_images(tmp_path / "images", ["a"], size=8)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"0\.png is not a file inside the image folder images"):
        file_sources("images", ["0.png"], ["a"], [0])  # relative to the cwd: outside images/
    with pytest.raises(ValueError, match="not a file inside"):
        file_sources("images", ["images/../images.png"], ["a"], [0])


def test_a_labelled_folder_loaded_by_a_relative_path(tmp_path, monkeypatch):
    captioned_images(tmp_path / "data", ["a", "b"], size=8)
    labels = {"0.png": {"colour": "red"}, "1.png": {"colour": "blue"}}
    (tmp_path / "data" / "labels.json").write_text(json.dumps(labels))
    monkeypatch.chdir(tmp_path)
    data = load_image_folder("data", "data/labels.json", image_size=8)
    record = dataset_sources(data)
    assert record["root"] == str(tmp_path / "data") and record["files"] == ["0.png", "1.png"]
    assert torch.equal(source_images(record, [1], 8), data.images[1:2])
