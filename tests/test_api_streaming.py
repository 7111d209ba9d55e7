"""Attributor.featurize streams a pixel model's training images (image paths, PIL images, a
`datasets.Dataset`) a batch at a time, for FactorUNet and diffusers UNet2DModel alike, with DAS
rows and caption completion (which reads the uncaptioned images again from disk): at most one
batch of decoded images alive, and every store byte for byte the one written from the whole
set decoded into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LiveRows
from PIL import Image

from ctrak_fast.api import Attributor, das_store_path
from ctrak_fast.data import SyntheticConfig, make_dataset
from ctrak_fast.data.image_sequence import ImageSequence
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.models.base import ModelKind
from ctrak_fast.models.factor import FactorKind
from ctrak_fast.models.factor_unet import FactorUNet

BATCH = 2
VALUES = {"shape": ["circle", "square"], "colour": ["red", "green"]}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def data():
    """12 synthetic 8 x 8 images, half of each factor's captions dropped."""
    cfg = SyntheticConfig(image_size=8, shapes=("circle", "square"), colours=("red", "green"),
                          per_combo=3, n_heldout=0, caption_drop=0.5)  # fmt: skip
    return make_dataset(cfg)


def pil_images(data) -> list[Image.Image]:
    pixels = ((data.images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte()
    return [Image.fromarray(np.ascontiguousarray(p.numpy())) for p in pixels]


@pytest.fixture(scope="module")
def paths(data, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    for i, im in enumerate(pil_images(data)):
        im.save(folder / f"{i:02d}.png")
    return [folder / f"{i:02d}.png" for i in range(len(data))]


def factor_model() -> FactorUNet:
    torch.manual_seed(0)
    layout = {"block_out_channels": (8, 8), "attention": (False, False), "norm_num_groups": 4}
    return FactorUNet([2, 2], image_size=8, factors=list(VALUES), values=VALUES, **layout).eval()


def in_memory(monkeypatch) -> None:
    """Decode the whole set before featurizing and completing (what Attributor.featurize did)."""
    dense = lambda x: x.tensor() if isinstance(x, ImageSequence) else x  # noqa: E731
    x0, complete = ModelKind.training_x0, FactorKind.complete
    monkeypatch.setattr(ModelKind, "training_x0", lambda s, im, i, st: x0(s, dense(im), i, st))
    monkeypatch.setattr(FactorKind, "complete", lambda s, im, c: complete(s, dense(im), c))


def files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name != ".lock"}


def inputs(form: str, data, paths):
    if form == "paths":
        return (paths, data.captions)
    if form == "pil":
        return (pil_images(data), data.captions)
    datasets = pytest.importorskip("datasets")
    captions = [", ".join(f"{f}={VALUES[f][v]}" for f, v in zip(VALUES, row, strict=True))
                for row in data.labels.tolist()]  # fmt: skip
    return datasets.Dataset.from_dict({"image": pil_images(data), "text": captions})


@pytest.mark.parametrize("form", ["paths", "pil", "dataset"])
def test_factor_model_streams_das_rows_to_the_in_memory_bytes(
    form, data, paths, tmp_path, monkeypatch
):
    spec = FeatureSpec.baseline("eps-norm", timesteps=(499,))
    att = Attributor(factor_model(), "das", feature=spec, projection=ProjectionSpec(k=16))
    kw = {"batch_size": BATCH, "shard_rows": 2 * BATCH}
    live = LiveRows.counting(monkeypatch)
    att.featurize(inputs(form, data, paths), tmp_path / "stream", **kw)
    assert live.read == len(data) and live.peak == BATCH  # each image decoded once, a batch alive
    in_memory(monkeypatch)
    att.featurize(inputs(form, data, paths), tmp_path / "memory", **kw)
    assert live.peak == len(data)  # the counter sees a whole set in memory
    for store in (tmp_path / "stream", das_store_path(tmp_path / "stream")):
        memory = (
            tmp_path / "memory" if store.name == "stream" else das_store_path(tmp_path / "memory")
        )
        assert files(store) == files(memory), store
    assert ("sources.json" in files(tmp_path / "stream")) == (form == "paths")


def test_completion_reads_the_uncaptioned_images_again_from_disk(
    data, paths, tmp_path, monkeypatch
):
    spec = FeatureSpec(timesteps=(499,), inversion_steps=4, normalize="layer",
                       param_filter="@condition")  # fmt: skip
    att = Attributor(factor_model(), "concept-trak-complete", feature=spec,
                     projection=ProjectionSpec(k=16))  # fmt: skip
    live = LiveRows.counting(monkeypatch)
    att.featurize((paths, data.captions), tmp_path / "stream", batch_size=BATCH)
    uncaptioned = int(data.uncaptioned.sum())
    assert uncaptioned and live.read == len(data) + uncaptioned  # one more pass, those rows only
    assert live.peak == max(BATCH, *data.uncaptioned.sum(0).tolist()) < len(data)
    in_memory(monkeypatch)
    att.featurize((paths, data.captions), tmp_path / "memory", batch_size=BATCH)
    assert files(tmp_path / "stream") == files(tmp_path / "memory")


def test_unet2d_pipeline_streams_image_files_to_the_in_memory_bytes(paths, tmp_path, monkeypatch):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)  # fmt: skip
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    att = Attributor.from_pipeline(pipe, "d-trak", projection=ProjectionSpec(k=16))
    live = LiveRows.counting(monkeypatch)
    att.featurize((paths, None), tmp_path / "stream", batch_size=BATCH, shard_rows=2 * BATCH)
    assert live.read == len(paths) and live.peak == BATCH
    in_memory(monkeypatch)
    att.featurize((paths, None), tmp_path / "memory", batch_size=BATCH, shard_rows=2 * BATCH)
    assert files(tmp_path / "stream") == files(tmp_path / "memory")


def test_a_bad_file_is_refused_before_the_store_is_touched(data, paths, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    att = Attributor(factor_model(), "d-trak", projection=ProjectionSpec(k=16),
                     feature=FeatureSpec.baseline("eps-norm", timesteps=(499,)))  # fmt: skip
    with pytest.raises(ValueError, match=r"bad\.png: unreadable image"):
        att.featurize(([*paths[:-1], bad], data.captions), tmp_path / "s", batch_size=BATCH)
    assert not (tmp_path / "s").exists()
