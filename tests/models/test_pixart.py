"""The PixArt kind (models/pixart.py): a tiny random PixArtAlphaPipeline (T5 encoder from a
config) saved and loaded from tmp_path, featurized, queried and attributed through
Attributor.from_pipeline; its condition path."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import tiny_pixart_pipeline

import ctrak_fast as cf
from ctrak_fast.method.grads.layout import parameter_layout
from ctrak_fast.models.pixart import PixArtAdapter, PixArtKind
from ctrak_fast.models.registry import kind_of, kind_of_pipeline

T1 = cf.FeatureSpec(timesteps=(299, 699), inversion_steps=10)
CAPTIONS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"] * 2


@pytest.fixture
def pixart_pipe(tmp_path):
    from diffusers import PixArtAlphaPipeline

    tiny_pixart_pipeline(tmp_path).save_pretrained(tmp_path / "pixart")
    return PixArtAlphaPipeline.from_pretrained(tmp_path / "pixart", local_files_only=True)


def test_pixart_end_to_end(pixart_pipe, tmp_path):
    assert kind_of_pipeline(pixart_pipe) is PixArtKind
    att = cf.Attributor.from_pipeline(pixart_pipe, projection=cf.ProjectionSpec(k=16), feature=T1)
    assert isinstance(att.model, PixArtAdapter) and att.model.transformer is pixart_pipe.transformer
    assert all(".attn2." in s.name for s in att.featurizer.grads.slots)  # the default filter
    assert kind_of(att.model).pixel_size() == 16  # 8x8 latents of a 2-level VAE
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    store = att.featurize((images, CAPTIONS), tmp_path / "store", batch_size=4)
    assert store.n_rows == 8 and store.meta["text2image"]["text_encoder"] is not None
    q = att.query("a red triangle", remove="red", n_draws=1, steps=10)
    assert q.labels == ("-red",) and q.features.shape == (1, 16)
    assert torch.isfinite(q.features).all() and q.features.abs().sum() > 0
    res = att.attribute(q, store, k=3)
    assert res.top_ids.shape == (1, 3) and torch.isfinite(res.top_scores).all()
    assert set(res.top_ids[0].tolist()) <= set(range(8))


def test_pixart_condition_is_what_the_pipeline_feeds(pixart_pipe):
    """The packed condition holds the pipeline's T5 states and token mask; the adapter's eps is
    the transformer's eps half with that mask."""
    ad = PixArtAdapter(pixart_pipe)
    assert ad.max_length == 120  # PixArt-alpha's max_sequence_length
    cond = ad.encode_prompts(["a red triangle"])
    states, mask, _, _ = pixart_pipe.encode_prompt(
        "a red triangle", do_classifier_free_guidance=False, max_sequence_length=120
    )
    torch.testing.assert_close(cond[..., :-1], states.float())
    assert cond[0, :, -1].tolist() == mask[0].float().tolist() and 0 < mask.sum() < 120
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        raw = pixart_pipe.transformer(
            x,
            encoder_hidden_states=states,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        torch.testing.assert_close(ad(x, t, cond), raw[:, :4])
        assert not torch.allclose(ad(x, t, cond), ad(x, t, ad.encode_prompts(["a blue circle"])))


def test_pixart_condition_path(pixart_pipe):
    """The rule is exactly every block's cross-attention and the caption projection; the layers
    that read the caption and not x_t (the caption projection, attn2's keys and values) all lie
    in it; the featurizer's @condition gradient is the full gradient at those parameters."""
    ad = PixArtAdapter(pixart_pipe)
    names = {s.name for s in parameter_layout(ad, "@condition")}
    expected = {
        f"unet.caption_projection.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    for b in range(2):
        for layer in ("to_q", "to_k", "to_v", "to_out.0"):
            expected |= {
                f"unet.transformer_blocks.{b}.attn2.{layer}.{p}" for p in ("weight", "bias")
            }
    assert names == expected

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().clone()))
        for n, m in ad.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    red, blue = ad.encode_prompts(["a red triangle"]), ad.encode_prompts(["a blue circle"])

    def inputs(x_t, cond):
        seen.clear()
        with torch.no_grad():
            ad(x_t, t, cond)
        return dict(seen)

    base, other_x, other_c = inputs(x, red), inputs(x + 1, red), inputs(x, blue)
    for h in hooks:
        h.remove()
    reads_text_only = {
        n for n in base if torch.equal(base[n], other_x[n]) and not torch.equal(base[n], other_c[n])
    }
    want = {"unet.caption_projection.linear_1", "unet.caption_projection.linear_2"}
    want |= {f"unet.transformer_blocks.{b}.attn2.to_{p}" for b in range(2) for p in "kv"}
    assert reads_text_only == want and {n + ".weight" for n in want} <= names

    fz = cf.Attributor(ad, "concept-trak-cond", feature=None).featurizer
    assert {s.name for s in fz.grads.slots} == names
    xt, tt = torch.randn(2, 4, 8, 8), torch.tensor([300, 600])
    cond, r = torch.cat([red, blue]), torch.randn(2, 4, 8, 8)
    blocks = fz.grads(xt, tt, cond, r)
    params = dict(ad.named_parameters())
    for i in range(2):  # one backward pass per sample over every parameter
        out = ad(xt[i : i + 1], tt[i : i + 1], cond[i : i + 1])
        loss = (out * r[i : i + 1]).sum() * (2.0 / xt[0].numel())
        grads = dict(
            zip(
                params,
                torch.autograd.grad(loss, list(params.values()), allow_unused=True),
                strict=True,
            )
        )
        for slot, (off, b) in zip(fz.grads.slots, blocks, strict=True):
            assert off == slot.offset
            torch.testing.assert_close(b[i], grads[slot.name].flatten(), rtol=1e-4, atol=1e-6)


def test_pixart_sigma_is_the_same_kind_with_its_token_length(pixart_pipe):
    from diffusers import PixArtSigmaPipeline

    sigma = PixArtSigmaPipeline(**pixart_pipe.components)
    assert kind_of_pipeline(sigma) is PixArtKind
    ad = PixArtAdapter(sigma)
    assert ad.max_length == 300  # PixArt-Sigma's max_sequence_length
    cond = ad.encode_prompts(["a red triangle", ""])
    assert cond.shape == (2, 300, 13) and cond[1, :, -1].sum() < cond[0, :, -1].sum()
