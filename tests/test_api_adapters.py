"""Attributor.from_pipeline on diffusers pipeline objects built in memory (tiny, random weights)."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyTextEncoder, WordTokenizer, perturb, tiny_sd_pipeline

import ctrak_fast as cf
from ctrak_fast.models.unet2d import UNet2DAdapter

T1 = cf.FeatureSpec(timesteps=(499,), inversion_steps=10)


def tiny_unet2d(num_class_embeds=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return perturb(
        UNet2DModel(
            sample_size=8,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            num_class_embeds=num_class_embeds,
        )
    )


def test_ddpm_pipeline_unconditional(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler())
    base = cf.FeatureSpec.baseline("dsm", timesteps=(299, 799))
    att = cf.Attributor.from_pipeline(
        pipe, "trak", projection=cf.ProjectionSpec(k=16), feature=base
    )
    assert isinstance(att.model, UNet2DAdapter) and att.model.unet is pipe.unet  # no copy
    ct = cf.Attributor.from_pipeline(pipe, projection=cf.ProjectionSpec(k=16))
    assert ct.feature_spec.inversion_guidance == 1.0  # no unconditional branch to guide with
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    store = att.featurize((images, None, torch.arange(6) + 100), tmp_path / "s", batch_size=3)
    q = att.image_query(images[2:3])
    res = att.attribute(q, store, k=2, tails="top")
    assert res.top_ids[0, 0] == 102  # a training image supports itself most
    with pytest.raises(ValueError, match="no concept to remove"):
        ct.query(torch.zeros(0, dtype=torch.int64), image=images[0])


def test_class_conditional_unet2d(tmp_path):
    from diffusers import DDIMScheduler

    class Pipe:  # any object with .unet and .scheduler, as a custom pipeline would be
        unet = tiny_unet2d(num_class_embeds=3)
        scheduler = DDIMScheduler(prediction_type="v_prediction")

    no_cfg = cf.FeatureSpec(timesteps=(499,), inversion_steps=10, inversion_guidance=1.0)
    att = cf.Attributor.from_pipeline(Pipe(), projection=cf.ProjectionSpec(k=16), feature=no_cfg)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 700])
    cond = torch.tensor([[0], [2]])
    with torch.no_grad():  # v-prediction is converted to eps
        v = Pipe.unet(x, t, class_labels=cond[:, 0]).sample
        ab = att.model.schedule.alpha_bar(t, x)
        torch.testing.assert_close(att.model(x, t, cond), ab.sqrt() * v + (1 - ab).sqrt() * x)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    store = att.featurize((images, [0, 1, 2, 0]), tmp_path / "s", batch_size=2)
    q = att.query(0, negatives=[1, 2], draws="global", n_draws=1, steps=10)
    assert q.labels == ("vs 1", "vs 2") and q.features.shape == (2, 16)
    assert att.attribute(q, store, k=2).top_ids.shape == (2, 2)
    with pytest.raises(ValueError, match="no concept to remove"):
        att.query(0)
    with pytest.raises(ValueError, match="no unconditional class"):
        cf.Attributor.from_pipeline(Pipe(), feature=T1)
    with_null = cf.Attributor.from_pipeline(Pipe(), null_class=2, feature=T1)
    assert with_null.featurize((images, [0, 1, 2, 0]), tmp_path / "cfg", batch_size=2).n_rows == 4


def test_text_to_image_pipeline(tmp_path):
    from diffusers import DDPMScheduler

    pipe = tiny_sd_pipeline(
        TinyTextEncoder, WordTokenizer(), DDPMScheduler(clip_sample=False, steps_offset=1)
    )
    att = cf.Attributor.from_pipeline(pipe, projection=cf.ProjectionSpec(k=16), feature=T1)
    assert att.query_spec.weight == 3.0  # the paper's slider weight for text-to-image
    assert att.feature_spec.param_filter == r"\.attn2\."  # cross-attention, as the paper
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    captions = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]
    store = att.featurize((images, captions), tmp_path / "s", batch_size=2)
    assert store.n_rows == 4 and "text2image" in store.meta
    q = att.query("a red triangle", remove=["red", "triangle"], n_draws=1, steps=10)
    assert q.labels == ("-red", "-triangle") and q.image.shape == (3, 16, 16)
    res = att.attribute(q, store, k=2)
    assert set(res.top_ids.flatten().tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="remove="):
        att.query("a red triangle")
