"""Incomplete captions (README, "Incomplete captions"): a labels file may leave a factor out of an
image's caption; the model is then told its null token, in training and in featurization; the
truth (what images show) is kept apart from the captions; the caption-lookup calibration row; the
recall of the uncaptioned carriers; and captions the model completes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctrak_fast.bench.metrics import factor_metrics, uncaptioned_recall
from ctrak_fast.bench.protocol import CAPTION_LOOKUP, METRICS, QueryLog
from ctrak_fast.data import ConceptDataset, SyntheticConfig, drop_captions, make_dataset, render
from ctrak_fast.data.folder import load_image_folder
from ctrak_fast.method.completion import complete_captions, value_losses
from ctrak_fast.method.diffusion import NoiseSchedule, add_noise
from ctrak_fast.models.factor_unet import FactorUNet

COLOURS = ["blue", "red", "green"]


def _folder(tmp_path, n=6):
    imgs = ((render("square", "blue", n, seed=0) + 1) * 127.5).round().clamp(0, 255)
    names = []
    for i, im in enumerate(imgs.to(torch.uint8)):
        names.append(f"img{i}.png")
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / names[-1])
    return names


@pytest.mark.parametrize("missing", ["absent", "null", "empty"])
def test_json_missing_caption_is_the_null_token(tmp_path, missing):
    names = _folder(tmp_path)
    table = {n: {"shape": "square", "colour": COLOURS[i % 3]} for i, n in enumerate(names)}
    if missing == "absent":
        del table[names[1]]["colour"]
    else:
        table[names[1]]["colour"] = None if missing == "null" else ""
    (tmp_path / "l.json").write_text(json.dumps(table))
    ds = load_image_folder(tmp_path, tmp_path / "l.json")
    assert ds.values["colour"] == ["blue", "green", "red"]
    null = len(ds.values["colour"])
    assert ds.captions[:, 1].tolist() == [0, null, 1, 0, 2, 1]
    # without a truth file the truth of a missing caption is unknown: a carrier of no value
    assert ds.labels[1, 1] == null and not ds.known[1] and ds.known.sum() == 5
    assert ds.uncaptioned[:, 1].tolist() == [False, True, False, False, False, False]
    assert ds.describe(ds.labels[1]) == "shape=square, colour=?"


def test_csv_empty_cell_and_a_truth_file(tmp_path):
    names = _folder(tmp_path, n=4)
    rows = ["filename,shape,colour"] + [
        f"{n},square,{'' if i in (1, 2) else COLOURS[i % 2]}" for i, n in enumerate(names)
    ]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    truth = {names[1]: {"colour": "red"}, names[2]: {"colour": "blue"}}
    (tmp_path / "t.json").write_text(json.dumps(truth))
    plain = load_image_folder(tmp_path, tmp_path / "l.csv")
    ds = load_image_folder(tmp_path, tmp_path / "l.csv", truth_file=tmp_path / "t.json")
    # --truth changes the ground truth and not the captions
    assert torch.equal(ds.captions, plain.captions)
    assert ds.captions[:, 1].tolist() == [0, 2, 2, 1]  # blue, -, -, red (null = 2)
    assert ds.labels[:, 1].tolist() == [0, 1, 0, 1]
    assert plain.labels[:, 1].tolist() == [0, 2, 2, 1]
    assert ds.uncaptioned[:, 1].tolist() == [False, True, True, False]
    (tmp_path / "bad.json").write_text(json.dumps({"other.png": {"colour": "red"}}))
    with pytest.raises(ValueError, match="not in the labels file"):
        load_image_folder(tmp_path, tmp_path / "l.csv", truth_file=tmp_path / "bad.json")


def test_drop_captions_is_seeded_and_keeps_the_truth():
    cfg = SyntheticConfig(per_combo=6, caption_drop=0.5)
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert torch.equal(a.captions, b.captions)
    assert a.uncaptioned.sum(0).tolist() == [len(a) // 2] * 2
    kept = ~a.uncaptioned
    assert torch.equal(a.captions[kept], a.labels[kept])
    assert torch.equal(make_dataset(SyntheticConfig(per_combo=6)).labels, a.labels)
    other = drop_captions(a.labels, a.n_values, 0.5, seed=1)
    assert not torch.equal(other, a.captions)
    # the config round-trips; a complete-caption config is written as before (no new key)
    assert SyntheticConfig.from_dict(cfg.to_dict()).caption_drop == 0.5
    assert "caption_drop" not in SyntheticConfig().to_dict()


def test_dataset_round_trip_keeps_the_captions(tmp_path):
    ds = make_dataset(SyntheticConfig(per_combo=2, caption_drop=0.5))
    ds.save(tmp_path / "d.safetensors")
    back = ConceptDataset.load(tmp_path / "d.safetensors")
    assert torch.equal(back.captions, ds.captions) and torch.equal(back.labels, ds.labels)
    sub = ds.subset(torch.arange(3))
    assert torch.equal(sub.captions, ds.captions[:3])


def test_the_null_token_reaches_training(monkeypatch, tmp_path):
    """train_diffusion conditions on the captions: every uncaptioned factor is the null token."""
    from ctrak_fast.train import diffusion as train_mod

    ds = make_dataset(SyntheticConfig(per_combo=2, caption_drop=0.5))
    seen = []
    real = FactorUNet.forward

    def spy(self, x_t, t, cond):
        seen.append(cond.clone())
        return real(self, x_t, t, cond)

    monkeypatch.setattr(FactorUNet, "forward", spy)
    train_mod.train_diffusion(
        ds,
        tmp_path / "m.safetensors",
        steps=3,
        batch_size=len(ds),
        cond_dropout=0.0,
        null_dropout=0.0,
        progress=False,
        checkpoint_every=0,
        model_kwargs={"block_out_channels": (8, 8), "attention": (False, False),
                      "norm_num_groups": 4},
    )  # fmt: skip
    conds = torch.cat(seen[:3])
    null = torch.tensor(ds.n_values)
    hidden = (conds == null).sum(0)
    assert hidden.tolist() == (ds.uncaptioned.sum(0) * 3).tolist()  # whole-set batches, 3 steps


def test_the_null_token_reaches_featurization(tmp_path):
    from ctrak_fast.api import Attributor
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.method.featurize import FeatureSpec

    model = FactorUNet([4, 4], image_size=16, block_out_channels=(8, 8),
                       attention=(False, False), norm_num_groups=4).eval()  # fmt: skip
    ds = make_dataset(SyntheticConfig(per_combo=1, caption_drop=0.5))
    spec = FeatureSpec(loss="eps-norm", inversion=False, timesteps=(499,))
    att = Attributor(model, "d-trak", projection=ProjectionSpec(k=32), feature=spec)
    got = att.featurize(ds, tmp_path / "a").read_all()[0]
    want = att.featurize((ds.images, ds.captions, ds.ids), tmp_path / "b").read_all()[0]
    told = att.featurize((ds.images, ds.labels, ds.ids), tmp_path / "c").read_all()[0]
    assert torch.equal(got, want) and not torch.allclose(got, told)


def test_caption_lookup_on_a_hand_made_example():
    # 6 training images, factor 0; the query asks for value 1. Images 0, 1, 2 show it; only
    # image 0's caption says so (1 and 2 are uncaptioned: null = 2); image 3 is captioned 0.
    labels = torch.tensor([[1], [1], [1], [0], [0], [0]])
    captions = torch.tensor([[1], [2], [2], [0], [2], [0]])
    log = QueryLog(("f",), lambdas=(1.0,))
    log.record({}, labels, (1,), "heldout", "test", seed=0, captions=captions)
    row = log.values(CAPTION_LOOKUP, "heldout", "f", "test")[0, 0]
    m = dict(zip(METRICS, row, strict=True))
    assert m["p@1"] == 1.0  # the one captioned carrier comes first
    # every other caption states none of the concept: images 1-5 tie below rank 1, so the top
    # R = 3 holds image 0 and two of the five, in the tie-break's order
    assert m["recall_uncaptioned"] in (0.0, 0.5, 1.0)
    # over many tie-breaks: the expected 2 of 5 of the 2 hidden carriers
    means = []
    for seed in range(300):
        lg = QueryLog(("f",), lambdas=(1.0,))
        lg.record({}, labels, (1,), "heldout", "test", seed=seed, captions=captions)
        means.append(lg.values(CAPTION_LOOKUP, "heldout", "f", "test")[0, 0, -1])
    assert abs(np.mean(means) - 2 / 5) < 0.06
    # with complete captions the lookup is perfect
    lg = QueryLog(("f",), lambdas=(1.0,))
    lg.record({}, labels, (1,), "heldout", "test", seed=0)
    full = dict(zip(METRICS, lg.values(CAPTION_LOOKUP, "heldout", "f", "test")[0, 0], strict=True))
    assert full["ap"] == 1.0 and np.isnan(full["recall_uncaptioned"])


def test_uncaptioned_recall_by_hand():
    relevant = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    hidden = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    scores = torch.tensor([8.0, 7.0, 1.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    # top R = 4: rows 0, 1, 3, 4; of the hidden carriers {1, 2}, row 1 is in it
    assert uncaptioned_recall(scores, relevant, hidden) == 0.5
    labels = relevant.long()[:, None]
    m = factor_metrics(scores, labels, (1,), 0, hidden[:, None])
    assert m["recall_uncaptioned"] == 0.5
    assert np.isnan(factor_metrics(scores, labels, (1,), 0)["recall_uncaptioned"])


def test_completion_picks_the_value_of_least_denoising_loss():
    model = FactorUNet([3, 2], image_size=8, block_out_channels=(8, 8),
                       attention=(False, False), norm_num_groups=4).eval()  # fmt: skip
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    caps = torch.tensor([[3, 0], [1, 2], [3, 2], [0, 1]])
    sched = NoiseSchedule.for_model(model)
    losses = value_losses(model, sched, x0, caps, 0, 3, timesteps=(99, 499), seed=5)
    # by hand: the loss of image 0 under value 2 at the two timesteps
    gen = torch.Generator().manual_seed(5)
    noises = torch.randn((2, 3, 8, 8), generator=gen)
    want = 0.0
    for j, t in enumerate((99, 499)):
        tt = torch.tensor([t])
        x_t = add_noise(x0[:1], noises[j][None], tt, sched)
        eps = model(x_t, tt, torch.tensor([[2, 0]]))
        want += (eps - noises[j]).pow(2).mean().item() / 2
    assert losses[0, 2].item() == pytest.approx(want, rel=1e-5)
    out = complete_captions(model, x0, caps, [3, 2], timesteps=(99, 499), seed=5)
    assert out[0, 0] == losses[0].argmin() and out[3].tolist() == [0, 1]
    assert (out[:, 0] < 3).all() and (out[:, 1] < 2).all()
    assert out[1, 0] == 1  # captioned values are kept


def test_labels_command_counts_missing_captions(tmp_path, capsys):
    from ctrak_fast.cli.app import main

    names = _folder(tmp_path, n=4)
    table = {n: {"shape": "square", "colour": COLOURS[i % 2]} for i, n in enumerate(names)}
    table[names[0]]["colour"] = None
    table[names[1]]["colour"] = ""
    (tmp_path / "l.json").write_text(json.dumps(table))
    main(["labels", "--folder", str(tmp_path), "--labels", str(tmp_path / "l.json")])
    out = capsys.readouterr().out
    assert "colour: 2 values ['blue', 'red']; 2 image(s) without it" in out
    assert "shape: 1 values ['square']\n" in out
    assert "2 combinations fully captioned, 1-1 images each" in out


def test_stamped_mark_generator_and_its_truth(tmp_path):
    """The uncaptioned mark: a seeded fraction of the images, position over the whole image, size
    and tint jittered, the other images untouched; the truth (where) travels with the dataset."""
    from ctrak_fast.data.marks import SIZES, glyph, stamp_marks

    images = torch.ones(200, 3, 16, 16)
    x, marked, boxes = stamp_marks(images, 0.15, seed=3)
    again, _, _ = stamp_marks(images, 0.15, seed=3)
    assert torch.equal(x, again) and int(marked.sum()) == 30
    assert torch.equal(x[~marked], images[~marked]) and (boxes[~marked] == -1).all()
    b = boxes[marked]
    sizes = (b[:, 2] - b[:, 0]).tolist()
    assert set(sizes) <= set(SIZES) and len(set(sizes)) > 1  # size jitter
    assert torch.equal(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    assert len({(int(r[0]), int(r[1])) for r in b}) > 20  # positions vary: no fixed region
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 16).all()
    for i in marked.nonzero().flatten().tolist()[:5]:  # pixels change only inside the box
        x0, y0, x1, y1 = boxes[i].tolist()
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = glyph(x1 - x0) > 0
        changed = (x[i] != images[i]).any(0)
        assert torch.equal(changed, inside)
    darkest = [x[i].min().item() for i in marked.nonzero().flatten().tolist()]
    assert max(darkest) - min(darkest) > 0.05  # tint and opacity jitter
    # synthetic data: never captioned, its truth saved and loaded with the dataset
    ds = make_dataset(SyntheticConfig(per_combo=10, mark_fraction=0.15))
    assert int(ds.marked.sum()) == round(0.15 * len(ds))
    assert torch.equal(ds.captions, ds.labels)  # no caption names the mark
    plain = make_dataset(SyntheticConfig(per_combo=10))
    assert torch.equal(ds.images[~ds.marked], plain.images[~ds.marked])
    ds.save(tmp_path / "m.safetensors")
    back = ConceptDataset.load(tmp_path / "m.safetensors")
    assert torch.equal(back.marks, ds.marks)
    assert back.subset(ds.marked).marked.all()
    assert "mark_fraction" not in SyntheticConfig().to_dict()


def test_attributor_featurizes_concept_trak_complete_under_the_completed_captions(tmp_path):
    from ctrak_fast.api import Attributor
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.method.featurize import FeatureSpec

    model = FactorUNet([4, 4], image_size=16, block_out_channels=(8, 8),
                       attention=(False, False), norm_num_groups=4).eval()  # fmt: skip
    ds = make_dataset(SyntheticConfig(per_combo=1, caption_drop=0.5))
    spec = FeatureSpec(timesteps=(499,), inversion_steps=10, normalize="layer",
                       param_filter="@condition")  # fmt: skip
    att = Attributor(model, "concept-trak-complete", projection=ProjectionSpec(k=32), feature=spec)
    got = att.featurize(ds, tmp_path / "a").read_all()[0]
    done = complete_captions(model, ds.images, ds.captions, model.n_values)
    assert not torch.equal(done, ds.captions)
    cond = Attributor(model, "concept-trak-cond", projection=ProjectionSpec(k=32), feature=spec)
    want = cond.featurize((ds.images, done, ds.ids), tmp_path / "b").read_all()[0]
    plain = cond.featurize(ds, tmp_path / "c").read_all()[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
