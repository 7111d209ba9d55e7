"""The SD3 kind (models/sd3.py): a tiny random StableDiffusion3Pipeline (two CLIPs and a T5 from
configs, a flow-matching scheduler) saved and loaded from tmp_path, featurized, queried and
attributed through Attributor.from_pipeline; its flow schedule and its condition path."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import SD3_BLOCKS as N_BLOCKS
from tiny_pipelines import tiny_sd3_pipeline

import ctrak_fast as cf
from ctrak_fast.method.grads.layout import parameter_layout
from ctrak_fast.method.schedules import FlowSchedule
from ctrak_fast.models.registry import kind_of, kind_of_pipeline
from ctrak_fast.models.sd3 import SD3Adapter, SD3Kind

T1 = cf.FeatureSpec(timesteps=(299, 699), inversion_steps=10)
CAPTIONS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"] * 2


@pytest.fixture
def sd3_pipe(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    tiny_sd3_pipeline(tmp_path).save_pretrained(tmp_path / "sd3")
    return StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", local_files_only=True)


def test_sd3_end_to_end(sd3_pipe, tmp_path):
    assert kind_of_pipeline(sd3_pipe) is SD3Kind
    att = cf.Attributor.from_pipeline(sd3_pipe, projection=cf.ProjectionSpec(k=16), feature=T1)
    model = att.model
    assert isinstance(model, SD3Adapter) and model.transformer is sd3_pipe.transformer
    assert isinstance(att.featurizer.schedule, FlowSchedule)
    assert kind_of(att.model).pixel_size() == 16  # 8x8 latents of a 2-level VAE
    assert att.featurizer.schedule.config["shift"] == 3.0 and model.prediction_type == "velocity"
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    store = att.featurize((images, CAPTIONS), tmp_path / "store", batch_size=4)
    assert store.n_rows == 8
    fps = store.meta["text2image"]
    assert all(
        fps[k] is not None for k in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    )
    q = att.query("a red triangle", remove="red", n_draws=1, steps=10)
    assert q.labels == ("-red",) and q.features.shape == (1, 16)
    assert torch.isfinite(q.features).all() and q.features.abs().sum() > 0
    res = att.attribute(q, store, k=3)
    assert res.top_ids.shape == (1, 3) and torch.isfinite(res.top_scores).all()
    assert set(res.top_ids[0].tolist()) <= set(range(8))
    trak = cf.Attributor.from_pipeline(
        sd3_pipe,
        "trak",
        projection=cf.ProjectionSpec(k=16),
        feature=T1.baseline("dsm", timesteps=(499,)),
    )
    base = trak.featurize((images, CAPTIONS), tmp_path / "trak", batch_size=4)
    iq = trak.image_query(images[2:3], ["a red circle"])
    assert trak.attribute(iq, base, k=1, tails="top").top_ids[0, 0] == 2  # it supports itself


def test_sd3_condition_is_what_the_pipeline_feeds(sd3_pipe):
    """Packed condition = (pooled, tokens) of the pipeline's encode_prompt; the adapter returns
    the transformer's velocity at timestep sigma_t * 1000."""
    ad = SD3Adapter(sd3_pipe, max_length=6)
    states, _, pooled, _ = sd3_pipe.encode_prompt(
        "a red triangle", None, None, do_classifier_free_guidance=False, max_sequence_length=6
    )
    cond = ad.encode_prompts("a red triangle")
    assert cond.shape == (1, 1 + 8 + 6, 24)
    torch.testing.assert_close(cond[:, 1:], states.float())
    torch.testing.assert_close(cond[:, 0, :12], pooled.float())
    assert (cond[:, 0, 12:] == 0).all()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    sigma = sd3_pipe.scheduler.sigmas.flip(0)[t]  # the scheduler's training sigmas
    with torch.no_grad():
        v = sd3_pipe.transformer(
            hidden_states=x,
            encoder_hidden_states=states.expand(2, -1, -1),
            pooled_projections=pooled.expand(2, -1),
            timestep=sigma * 1000,
        ).sample
        torch.testing.assert_close(ad(x, t, cond.expand(2, -1, -1)), v)


def test_sd3_condition_path(sd3_pipe):
    """The rule is exactly the context stream and the adaLN layers that read the pooled text:
    the layers that read the text and not x_t, and those on the context tokens; the featurizer's
    @condition gradient is the full per-sample gradient at those parameters."""
    ad = SD3Adapter(sd3_pipe, max_length=6)
    names = {s.name for s in parameter_layout(ad, "@condition")}
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().clone()))
        for n, m in ad.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    red, blue = ad.encode_prompts("a red triangle"), ad.encode_prompts("a blue circle")

    def inputs(x_t, cond):
        seen.clear()
        with torch.no_grad():
            ad(x_t, t, cond)
        return dict(seen)

    base, other_x, other_c = inputs(x, red), inputs(x + 1, red), inputs(x, blue)
    for h in hooks:
        h.remove()
    text_only = {
        n for n in base if torch.equal(base[n], other_x[n]) and not torch.equal(base[n], other_c[n])
    }
    context_tokens = {n for n, a in base.items() if a.dim() == 3 and a.shape[1] == red.shape[1] - 1}
    layers = text_only | context_tokens
    assert {p for p in names} == {f"{n}.{w}" for n in layers for w in ("weight", "bias")}
    last = f"unet.transformer_blocks.{N_BLOCKS - 1}."
    assert (
        last + "attn.add_k_proj.weight" in names
        and last + "ff_context.net.2.weight" not in dict(ad.named_parameters())
    )  # context_pre_only: the last block's context branch ends at the joint attention

    fz = cf.Attributor(ad, "concept-trak-cond", feature=None).featurizer
    assert {s.name for s in fz.grads.slots} == names
    xt, tt = torch.randn(2, 4, 8, 8), torch.tensor([300, 600])
    cond, r = torch.cat([red, blue]), torch.randn(2, 4, 8, 8)
    blocks = fz.grads(xt, tt, cond, r)
    params = dict(ad.named_parameters())
    for i in range(2):  # one backward pass per sample over every parameter
        out = ad(xt[i : i + 1], tt[i : i + 1], cond[i : i + 1])
        loss = (out * r[i : i + 1]).sum() * (2.0 / xt[0].numel())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        full = dict(zip(params, grads, strict=True))
        for slot, (off, b) in zip(fz.grads.slots, blocks, strict=True):
            assert off == slot.offset
            torch.testing.assert_close(b[i], full[slot.name].flatten(), rtol=1e-4, atol=1e-6)
