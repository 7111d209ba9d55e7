"""Data in, the way users hold it: preprocessing as diffusers' training scripts (short side,
centre crop, optional random crop and flip), metadata.jsonl / .csv with their column names,
uncaptioned images named in a warning, and image paths, PIL images and `datasets.Dataset`
read a batch at a time."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ctrak_fast.data import images as images_module
from ctrak_fast.data.captions import read_captions
from ctrak_fast.data.images import Preprocess, load_image
from ctrak_fast.data.inputs import ImageSequence, sources_of, training_inputs


def striped(tmp_path, w=12, h=6):
    """A w x h image whose column x has the value 10 * x (red), so a crop shows its offset."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :, 0] = (np.arange(w) * 10)[None, :]
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    return path


def red_columns(t: torch.Tensor) -> list[int]:
    return [round(v) for v in ((t[0, 0] + 1) * 127.5).tolist()]


def test_centre_crop_of_a_hand_made_image(tmp_path):
    images_module.warn_not_square.cache_clear()
    path = striped(tmp_path)  # 12 x 6: the short side is already 6
    with pytest.warns(UserWarning, match="not square"):
        t = load_image(path, 6)
    assert t.shape == (3, 6, 6)
    assert red_columns(t) == [30, 40, 50, 60, 70, 80]  # columns 3..8: the centre, not squashed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second image is quiet
        flipped = load_image(path, 6, Preprocess(flip=True), index=1)
    # index 1 flips (seeded); the centre window mirrored
    seen = [load_image(path, 6, Preprocess(flip=True), index=i) for i in range(8)]
    assert any(red_columns(s) == [80, 70, 60, 50, 40, 30] for s in seen)
    assert all(red_columns(s) in ([30, 40, 50, 60, 70, 80], [80, 70, 60, 50, 40, 30]) for s in seen)
    assert torch.equal(flipped, load_image(path, 6, Preprocess(flip=True), index=1))


def test_random_crop_is_seeded_by_row_and_stays_inside(tmp_path):
    path = striped(tmp_path)
    crops = [red_columns(load_image(path, 6, Preprocess(center_crop=False), i)) for i in range(12)]
    starts = {c[0] for c in crops}
    assert len(starts) > 1 and starts <= {0, 10, 20, 30, 40, 50, 60}
    assert all(c == list(range(c[0], c[0] + 60, 10)) for c in crops)
    again = red_columns(load_image(path, 6, Preprocess(center_crop=False), 5))
    assert again == crops[5]


def test_a_square_image_is_only_resized(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "sq.png")
    t = load_image(tmp_path / "sq.png", 8)
    assert t.shape == (3, 8, 8) and torch.allclose(t[0], torch.ones(8, 8))


@pytest.mark.parametrize("kind", ["jsonl-text", "jsonl-caption", "csv-caption", "csv-columns"])
def test_metadata_files_and_their_columns(tmp_path, kind):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    rows = [("a.png", "a cat"), ("b.png", "a dog")]
    cols = {"image_column": None, "caption_column": None}
    if kind == "jsonl-text":
        lines = [json.dumps({"file_name": f, "text": t}) for f, t in rows]
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    elif kind == "jsonl-caption":
        lines = [json.dumps({"file_name": f, "caption": t}) for f, t in rows]
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    elif kind == "csv-caption":
        text = "file_name,caption\n" + "".join(f"{f},{t}\n" for f, t in rows)
        (tmp_path / "metadata.csv").write_text(text)
    else:
        text = "img,prompt\n" + "".join(f"{f},{t}\n" for f, t in rows)
        (tmp_path / "metadata.csv").write_text(text)
        cols = {"image_column": "img", "caption_column": "prompt"}
    with pytest.warns(UserWarning, match=r"1 image\(s\) in .* have no caption row .*: c\.png"):
        files, captions = read_captions(tmp_path, None, **cols)
    assert [f.name for f in files] == ["a.png", "b.png"] and captions == ["a cat", "a dog"]


def test_a_missing_column_is_named(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "txt": "x"}))
    with pytest.raises(ValueError, match=r"no column 'caption' .*--caption-column"):
        read_captions(tmp_path)


def test_paths_pil_and_a_dataset_read_a_batch_at_a_time(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    pils = [Image.new("RGB", (10, 10), c) for c in colours]
    paths = []
    for i, im in enumerate(pils):
        im.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    ref = torch.stack([load_image(p, 8) for p in paths])
    for items in (pils, paths):
        seq, caps = training_inputs((items, ["r", "g", "b"]), 8)
        assert isinstance(seq, ImageSequence) and caps == ["r", "g", "b"]
        assert torch.equal(seq.tensor(batch_size=2), ref)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"img": pils, "prompt": ["r", "g", "b"]})
    ds = ds.cast_column("img", datasets.Image())
    seq, caps = training_inputs(ds, 8, image_column="img", caption_column="prompt")
    assert caps == ["r", "g", "b"] and torch.equal(seq[1:3], ref[1:3])
    with pytest.raises(ValueError, match="no column 'text'"):
        training_inputs(ds, 8)
    record = sources_of(training_inputs((paths, ["r", "g", "b"]), 8), torch.arange(3))
    assert record["files"] == ["0.png", "1.png", "2.png"] and record["captions"][2] == "b"


def test_rows_and_subsets_decode_the_pixels_of_the_whole_set(tmp_path):
    paths = []
    for i in range(5):
        arr = np.random.default_rng(i).integers(0, 255, (6, 10, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    crop = Preprocess(center_crop=False, flip=True)  # seeded per row: a subset must keep seeds
    with pytest.warns(UserWarning, match="not square"):
        images_module.warn_not_square.cache_clear()
        seq = ImageSequence(paths, 6, crop)
        whole = seq.tensor()
    assert seq.shape == (5, 3, 6, 6) and torch.equal(whole[3:5], seq[3:5])
    assert torch.equal(seq[[4, 1]], whole[[4, 1]])
    assert torch.equal(seq[torch.tensor([2, 3])], whole[2:4])
    subset = seq.select(torch.tensor([False, True, False, True, True]))
    assert len(subset) == 3 and torch.equal(subset.tensor(), whole[[1, 3, 4]])
    assert torch.equal(subset.select([2, 0])[0:2], whole[[4, 1]])
    assert seq[2:2].shape == (0, 3, 6, 6)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [Image.open(p) for p in paths]})
    hf = ImageSequence(ds.cast_column("image", datasets.Image()), 6, crop)
    assert torch.equal(hf[[4, 1]], whole[[4, 1]])
    assert torch.equal(hf.select([3, 0]).tensor(), whole[[3, 0]])


def test_files_are_checked_by_their_headers_before_any_is_decoded(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.jpg")
    ImageSequence([tmp_path / "ok.png"], 4).check_files()
    for name, message in [
        ("bad.png", r"bad\.png: unreadable image"),
        ("gone.png", r"image file missing: .*gone\.png"),
        ("cmyk.jpg", r"cmyk\.jpg: unsupported image mode 'CMYK'"),
    ]:
        with pytest.raises(ValueError, match=message):
            ImageSequence([tmp_path / "ok.png", tmp_path / name], 4).check_files()
