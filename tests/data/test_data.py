"""Synthetic concept data and the image-folder loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctrak_fast.data import ConceptDataset, SyntheticConfig, load_image_folder, make_dataset, render
from ctrak_fast.data.synthetic import COLOURS, latin_heldout


@pytest.fixture(scope="module")
def small_cfg():
    return SyntheticConfig(per_combo=6, n_heldout=3, seed=3)


@pytest.fixture(scope="module")
def small_ds(small_cfg):
    return make_dataset(small_cfg)


def test_render_shape_range_and_determinism():
    a = render("triangle", "red", 5, seed=11)
    b = render("triangle", "red", 5, seed=11)
    c = render("triangle", "red", 5, seed=12)
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # A prefix of a longer draw is the same images (nuisances drawn per image, vectorised).
    assert render("cross", 1, 4, seed=1).shape == (4, 3, 16, 16)


def test_dataset_bit_identical_by_seed(small_cfg, small_ds):
    again = make_dataset(SyntheticConfig(per_combo=6, n_heldout=3, seed=3))
    assert torch.equal(small_ds.images, again.images)
    assert torch.equal(small_ds.labels, again.labels)
    other = make_dataset(SyntheticConfig(per_combo=6, n_heldout=3, seed=4))
    assert not torch.equal(small_ds.images, other.images)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_heldout_is_latin_transversal(seed, n):
    pairs = latin_heldout(4, 4, n, seed)
    assert len(pairs) == n
    assert len({s for s, _ in pairs}) == n and len({c for _, c in pairs}) == n
    assert pairs == latin_heldout(4, 4, n, seed)


def test_heldout_validation():
    with pytest.raises(ValueError, match="Latin"):
        SyntheticConfig(heldout=[(0, 1), (0, 2)])
    with pytest.raises(ValueError, match="n_heldout"):
        SyntheticConfig(n_heldout=5)


def test_heldout_absent_and_counts(small_cfg, small_ds):
    seen = {tuple(r) for r in small_ds.labels.tolist()}
    assert seen.isdisjoint(small_cfg.heldout)
    assert seen == set(small_cfg.combos("seen"))
    assert len(small_ds) == 6 * (16 - 3)
    assert torch.equal(small_ds.ids, torch.arange(len(small_ds)))
    assert small_ds.factors == ["shape", "colour"] and small_ds.n_values == [4, 4]
    # Every shape and every colour is still seen in training.
    assert set(small_ds.labels[:, 0].tolist()) == {0, 1, 2, 3}
    assert set(small_ds.labels[:, 1].tolist()) == {0, 1, 2, 3}


def test_labels_match_pixels(small_cfg, small_ds):
    """Fully covered pixels carry the labelled colour; shape areas are sane and ordered sensibly."""
    rgb = (small_ds.images + 1) / 2  # [N,3,H,W] in [0,1]
    for img, (s, c) in zip(rgb, small_ds.labels.tolist(), strict=True):
        target = torch.tensor(COLOURS[small_cfg.colours[c]])
        dist = (img - target[:, None, None]).abs().amax(0)  # [H,W]
        bg = (img - 1).abs().amax(0)
        core = dist < 1e-4
        assert core.sum() >= 4, "shape must cover some pixels fully"
        # Every pixel is a blend of background and the labelled colour: rgb = bg + a (colour - bg).
        alpha = ((1 - img) / (1 - target[:, None, None]).clamp(min=1e-6)).mean(0)
        blend = 1 - alpha[None] * (1 - target[:, None, None])
        assert torch.allclose(blend, img, atol=1e-4)
        area = alpha.sum().item() / img[0].numel()
        assert 0.04 < area < 0.6, (small_cfg.shapes[s], area)
        assert bg.lt(1e-6).sum() > 0.3 * img[0].numel()  # mostly background


def test_save_load_round_trip(tmp_path, small_cfg, small_ds):
    small_ds.save(tmp_path / "d.safetensors")
    back = ConceptDataset.load(tmp_path / "d.safetensors")
    assert torch.equal(back.images, small_ds.images) and torch.equal(back.labels, small_ds.labels)
    assert back.values == small_ds.values and back.heldout == small_ds.heldout
    small_cfg.save_json(tmp_path / "c.json")
    assert SyntheticConfig.load_json(tmp_path / "c.json") == small_cfg


def _write_folder(tmp_path, n=4):
    imgs = ((render("square", "blue", n, seed=0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    labels = {}
    for i, im in enumerate(imgs):
        name = f"img{i}.png"
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / name)
        labels[name] = {"shape": "square", "colour": "blue" if i % 2 else "red"}
    return imgs, labels


def test_folder_json_and_csv_round_trip(tmp_path):
    imgs, labels = _write_folder(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    ds = load_image_folder(tmp_path, tmp_path / "labels.json")
    assert ds.images.shape == (4, 3, 16, 16)
    assert torch.allclose((ds.images + 1) * 127.5, imgs.float(), atol=1e-3)
    assert ds.values == {"shape": ["square"], "colour": ["blue", "red"]}
    assert ds.labels[:, 1].tolist() == [1, 0, 1, 0]
    csv = "filename,shape,colour\n" + "".join(
        f"{k},{v['shape']},{v['colour']}\n" for k, v in labels.items()
    )
    (tmp_path / "labels.csv").write_text(csv)
    ds2 = load_image_folder(tmp_path, tmp_path / "labels.csv")
    assert torch.equal(ds2.images, ds.images) and torch.equal(ds2.labels, ds.labels)
    # Resizing and fixed value order.
    ds3 = load_image_folder(
        tmp_path,
        tmp_path / "labels.json",
        image_size=8,
        values={"shape": ["circle", "square"], "colour": ["red", "blue"]},
    )
    assert ds3.images.shape == (4, 3, 8, 8) and ds3.labels[:, 0].tolist() == [1] * 4


def test_a_folder_left_on_disk_reads_the_pixels_of_the_decoded_one(tmp_path):
    from ctrak_fast.data.image_sequence import ImageSequence
    from ctrak_fast.data.images import Preprocess

    _write_folder(tmp_path, n=6)
    labels = {f"img{i}.png": {"shape": "square", "colour": "rgb"[i % 3]} for i in range(6)}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    crop = Preprocess(center_crop=False, flip=True)  # seeded by the row: kept by subsets
    kw = {"image_size": 8, "preprocess": crop}
    decoded = load_image_folder(tmp_path, tmp_path / "labels.json", **kw)
    lazy = load_image_folder(tmp_path, tmp_path / "labels.json", decode=False, **kw)
    assert isinstance(lazy.images, ImageSequence) and lazy.image_size == 8 and len(lazy) == 6
    assert torch.equal(lazy.images.tensor(), decoded.images) and lazy.meta == decoded.meta
    first = lazy.train_subset(1)  # rows 0, 1, 2: one per colour
    assert first.ids.tolist() == [0, 1, 2]
    assert torch.equal(first.images.tensor(), decoded.train_subset(1).images)
    lazy.subset(torch.tensor([5, 3])).save(tmp_path / "d.safetensors")  # decoded into the file
    back = ConceptDataset.load(tmp_path / "d.safetensors")
    assert torch.equal(back.images, decoded.images[[5, 3]])


def test_folder_bad_inputs(tmp_path):
    _, labels = _write_folder(tmp_path, n=2)
    lf = tmp_path / "labels.json"

    def check(table, match):
        lf.write_text(json.dumps(table))
        with pytest.raises(ValueError, match=match):
            load_image_folder(tmp_path, lf)

    check({**labels, "nope.png": {"shape": "square", "colour": "red"}}, "nope.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    check({**labels, "broken.png": {"shape": "square", "colour": "red"}}, "broken.png")
    Image.fromarray(np.zeros((16, 16, 2), dtype=np.uint8)[..., 0], mode="L").convert("LA").save(
        tmp_path / "la.png"
    )
    check({**labels, "la.png": {"shape": "square", "colour": "red"}}, "la.png")
    # a factor no image has a value for (a missing value alone is a caption that leaves it out)
    check({"img0.png": {"shape": "square", "colour": None}, "img1.png": {"shape": "square"}},
          "no image has a value for factor")  # fmt: skip
    with pytest.raises(ValueError, match="labels file not found"):
        load_image_folder(tmp_path, tmp_path / "missing.json")


def test_paper_2x2_setting_holds_out_the_red_triangle():
    from ctrak_fast.data.synthetic import paper_config

    cfg = paper_config(per_combo=6)
    assert cfg.values == {"shape": ["triangle", "circle"], "colour": ["red", "blue"]}
    assert cfg.heldout == [(0, 0)] and cfg.combos("heldout") == [(0, 0)]
    data = make_dataset(cfg)
    seen = sorted({tuple(r) for r in data.labels.tolist()})
    assert seen == [(0, 1), (1, 0), (1, 1)] and len(data) == 18  # no red triangle is trained on
    # The outline: dark pixels (all channels low) around each shape, none without the option.
    outlined = render("circle", "blue", 6, seed=3, cfg=cfg)
    plain = render("circle", "blue", 6, seed=3, cfg=SyntheticConfig())
    dark = lambda x: ((x + 1) / 2).amax(1) < 0.35  # noqa: E731
    assert dark(outlined).flatten(1).sum(1).min() > 3
    assert dark(plain).sum() == 0
    # Same seed, same nuisances: the outline only darkens the shape's border.
    assert (outlined <= plain + 1e-6).all()
    again = render("circle", "blue", 6, seed=3, cfg=cfg)
    assert torch.equal(outlined, again)
