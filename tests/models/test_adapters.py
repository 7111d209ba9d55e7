"""TextToImageAdapter on tiny randomly initialised components built from configs (no downloads;
the builders are tests/helpers.py's)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_adapter, tiny_clip, tiny_sd_pipeline, tiny_unet, tiny_vae

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.method.featurize import FeatureSpec
from ctrak_fast.models.latent_cache import encode_images_cached, latent_cache_path
from ctrak_fast.models.prompts import concept_prompts, remove_phrase
from ctrak_fast.models.t2i_features import make_featurizer
from ctrak_fast.models.text2image import (
    T2I_PARAM_FILTER,
    TextToImageAdapter,
    schedule_from_scheduler,
)


def _inputs(adapter, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = adapter.config["in_channels"]
    x = torch.randn(b, c, 8, 8, generator=g)
    t = torch.tensor([50, 400, 900][:b])
    cond = adapter.prompt_ids(["a red triangle", "a blue circle", "a red"][:b])  # int64 [b, 1]
    return x, t, cond


# ---- prompt concepts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, phrase, want",
    [
        ("a pikachu in the style of picasso", "a pikachu", "in the style of picasso"),
        ("Pikachu, drawn in pencil", "pikachu", "drawn in pencil"),
        ("a red triangle", "red", "a triangle"),
        ("a red triangle", "triangle", "a red"),
        ("a  Red   Triangle on red", "red  triangle", "a on red"),  # whitespace-insensitive
        ("a reddish red box, red", "red", "a reddish box"),  # whole words; every occurrence
        ("portrait of pikachu.", "pikachu", "portrait of."),
    ],
    ids=["leading", "comma", "colour", "shape", "spaces", "words", "punct"],
)
def test_remove_phrase(prompt, phrase, want):
    assert remove_phrase(prompt, phrase) == want


def test_remove_phrase_errors():
    with pytest.raises(ValueError, match="does not occur"):
        remove_phrase("a red triangle", "blue")
    with pytest.raises(ValueError, match="does not occur"):
        remove_phrase("a reddish triangle", "red")  # part of a word is not the phrase
    with pytest.raises(ValueError, match="empty"):
        remove_phrase("a red triangle", "  ")
    assert concept_prompts("a red triangle", ["red"], ["a blue triangle"]) == [
        "a triangle",
        "a blue triangle",
    ]
    with pytest.raises(ValueError, match="needs a concept"):
        concept_prompts("a red triangle")


# ---- eps interface, schedule, prediction types ---------------------------------------------------


def test_schedule_and_config_from_diffusers():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        sch = schedule_from_scheduler(cls(**sd))
        want = DDIMScheduler(**sd).alphas_cumprod.double()
        assert torch.allclose(sch.alphas_cumprod, want, rtol=1e-5)
    with pytest.raises(ValueError, match="zero-terminal"):
        schedule_from_scheduler(DDIMScheduler(rescale_betas_zero_snr=True))
    ad = tiny_adapter()
    assert ad.config["image_size"] == 8 and ad.config["in_channels"] == 4
    # Only the UNet is a sub-module: gradients and the fingerprint cover its parameters alone.
    names = [n for n, _ in ad.named_parameters()]
    assert names and all(n.startswith("unet.") for n in names)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_convert_to_eps(prediction_type):
    ad = tiny_adapter(prediction_type=prediction_type)
    x, t, cond = _inputs(ad)
    with torch.no_grad():
        out = ad.unet(x, t, encoder_hidden_states=ad.embed_ids(cond)).sample
        eps = ad(x, t, cond)
    ab = ad.schedule.alpha_bar(t, x)
    if prediction_type == "v_prediction":  # v = sqrt(ab) eps - sqrt(1-ab) x0
        x0 = ab.sqrt() * x - (1 - ab).sqrt() * out
    else:
        x0 = out
    # The converted eps and x0 must reproduce x_t = sqrt(ab) x0 + sqrt(1-ab) eps.
    assert torch.allclose(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, x, atol=1e-5)


def test_prompts_ids_embeddings_and_null_cond():
    ad = tiny_adapter(prompt_cache=2)
    emb = ad.encode_prompts(["a red triangle", ""])
    assert emb.shape == (2, 8, 12) and emb.dtype == torch.float32
    ids = ad.prompt_ids(["a red triangle", "", "a red triangle"])
    assert ids.dtype == torch.int64 and ids.flatten().tolist() == [0, 1, 0]
    assert ad.prompt_of(ids) == ["a red triangle", "", "a red triangle"]
    null = ad.null_cond(3)
    assert null.shape == (3, 1) and (null == 1).all()  # the empty prompt
    torch.testing.assert_close(ad.embed_ids(ids), emb[[0, 1, 0]])
    # Ids and embeddings are the same condition to the model.
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    with torch.no_grad():
        torch.testing.assert_close(ad(x, t, ids), ad(x, t, emb[[0, 1, 0]]))
    ad.embed_ids(ad.prompt_ids(["a blue", "a red", "a circle"]))
    assert len(ad._emb_cache) == 3  # a batch is kept whole, then trimmed to prompt_cache
    ad.embed_ids(ad.prompt_ids(["a blue"]))
    assert len(ad._emb_cache) == 2
    with pytest.raises(ValueError, match="unknown prompt id"):
        ad.embed_ids(torch.tensor([[99]]))
    # The attention mask reaches the encoder only when asked for.
    ad_mask = tiny_adapter(text_attention_mask=True)
    assert not torch.allclose(ad_mask.encode_prompts(["a red"]), ad.encode_prompts(["a red"]))
    bare = TextToImageAdapter(tiny_unet(), ad.scheduler)
    with pytest.raises(ValueError, match="no text encoder"):
        bare.encode_prompts("a red")


# ---- latents -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [None, 0.3], ids=["sd", "shifted"])
def test_latent_round_trip(shift):
    from diffusers import DDPMScheduler

    vae = tiny_vae(shift)
    ad = TextToImageAdapter(tiny_unet(), DDPMScheduler(), vae=vae)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    x0 = ad.encode_images(images, batch_size=2)
    assert x0.shape == (3, 4, 8, 8) and x0.dtype == torch.float32
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        want = vae.decode(mean).sample.clamp(-1, 1)
    # x0 is the diffusers convention (mean - shift) * scaling_factor, and decoding inverts it.
    assert torch.allclose(x0, (mean - (shift or 0.0)) * 0.5, atol=1e-6)
    assert torch.allclose(ad.decode_latents(x0), want, atol=1e-5)
    pixel = tiny_adapter(latent=False)
    assert torch.equal(pixel.encode_images(images), images)


def test_latent_cache_written_once_and_keyed(tmp_path, monkeypatch):
    ad = tiny_adapter()
    images, ids = torch.rand(5, 3, 16, 16) * 2 - 1, torch.arange(10, 15)
    store = tmp_path / "store"
    calls = []
    real = ad.encode_images
    monkeypatch.setattr(ad, "encode_images", lambda x, b=16: calls.append(len(x)) or real(x, b))
    a = encode_images_cached(ad, images, ids, store)
    path = latent_cache_path(store, ad.fingerprints()["vae"])
    assert path.is_file() and path.parent == tmp_path and calls == [5]
    assert not list(tmp_path.glob("*.tmp"))
    b = encode_images_cached(ad, images, ids, store)
    assert calls == [5] and torch.equal(a, b)  # reused
    c = encode_images_cached(ad, images.flip(0), ids, store)  # other images: recomputed, replaced
    assert calls == [5, 5] and torch.allclose(c, a.flip(0), atol=1e-6)
    other = tiny_adapter()
    with torch.no_grad():
        next(other.vae.parameters()).add_(0.01)
    other._fingerprints = {}
    assert latent_cache_path(store, other.fingerprints()["vae"]) != path


def test_latent_cache_streams_image_files(tmp_path):
    from PIL import Image

    from ctrak_fast.data.images import load_image

    ad = tiny_adapter()
    g = torch.Generator().manual_seed(0)
    files = []
    for i in range(5):
        arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(files[-1])
    ids = torch.arange(5)
    got = encode_images_cached(ad, files, ids, tmp_path / "s", batch_size=2, image_size=16)
    pixels = torch.stack([load_image(f, 16) for f in files])  # resized to the model's 16x16
    torch.testing.assert_close(got, ad.encode_images(pixels), rtol=1e-5, atol=1e-6)
    assert torch.equal(encode_images_cached(ad, files, ids, tmp_path / "s", image_size=16), got)
    Image.fromarray(arr[::-1].copy()).save(files[-1])  # an image changed: recomputed
    again = encode_images_cached(ad, files, ids, tmp_path / "s", image_size=16)
    torch.testing.assert_close(again[:4], got[:4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(again[4], got[4])


def test_a_pixel_adapter_leaves_image_files_on_disk(tmp_path):
    from PIL import Image

    from ctrak_fast.data.image_sequence import ImageSequence
    from ctrak_fast.data.images import load_image

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(files[-1])
    x0 = encode_images_cached(tiny_adapter(latent=False), files, torch.arange(3), tmp_path / "s",
                              image_size=16)  # fmt: skip
    assert isinstance(x0, ImageSequence) and x0.shape == (3, 3, 16, 16)  # read per batch
    assert torch.equal(x0[0:3], torch.stack([load_image(f, 16) for f in files]))
    assert not list(tmp_path.glob("s.latents-*"))  # nothing cached: pixels are the x0


# ---- gradients: cross-attention filter against the reference ------------------------------------


def _reference_grads(adapter, x, t, cond, r, names):
    """Loop of single-example backward passes of (2/D) <eps, r> (the oracle)."""
    ref = copy.deepcopy(adapter)
    ref.grad_scale = 1.0
    params = dict(ref.named_parameters())
    out = []
    for i in range(len(x)):
        eps = ref(x[i : i + 1], t[i : i + 1], cond[i : i + 1])
        loss = (eps * r[i : i + 1]).sum() * 2.0 / r[0].numel()
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        out.append(torch.cat([g.float().flatten() for g in gs]))
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["hooks", "func"])
def test_attn2_gradients_match_reference(backend):
    ad = tiny_adapter()
    if backend == "func":  # SDPA has no vmap batching rule on the CPU (slow fallback)
        from diffusers.models.attention_processor import AttnProcessor

        ad.unet.set_attn_processor(AttnProcessor())
    fz = make_featurizer(
        ad, FeatureSpec(timesteps=(99,)), ProjectionSpec(k=16), grad_backend=backend
    )
    names = [s.name for s in fz.grads.slots]
    assert fz.spec.param_filter == T2I_PARAM_FILTER
    assert names and all(".attn2." in n for n in names)
    assert {n.split("attn2.")[1].split(".")[0] for n in names} == {"to_q", "to_k", "to_v", "to_out"}
    # Everything outside the filter is frozen while gradients are taken (the backward stops at
    # the first attn2 layer), and thawed after.
    seen = []
    hook = ad.unet.conv_in.register_forward_hook(
        lambda *_: seen.append({n for n, p in ad.named_parameters() if p.requires_grad})
    )
    x, t, cond = _inputs(ad)
    r = torch.randn_like(x)
    got = torch.cat([b for _, b in fz.grads(x, t, cond, r)], 1)
    hook.remove()
    assert seen and seen[-1] == set(names)
    assert all(p.requires_grad for p in ad.parameters())
    want = _reference_grads(ad, x, t, cond, r, names)
    assert got.dtype == torch.float32 and got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Offsets are those of the full UNet parameter vector (projection rows of a full gradient).
    offsets, off = {}, 0
    for n, p in ad.named_parameters():
        offsets[n] = off
        off += p.numel()
    assert [o for o, _ in fz.grads(x, t, cond, r)] == [offsets[n] for n in names]


def test_featurizers_with_other_filters_share_an_adapter():
    ad = tiny_adapter()
    every = make_featurizer(ad, FeatureSpec(param_filter=".*"), ProjectionSpec(k=16))
    make_featurizer(ad, FeatureSpec(), ProjectionSpec(k=16))  # attn2: must not freeze `every`
    x, t, cond = _inputs(ad, b=2)
    r = torch.randn_like(x)
    names = [s.name for s in every.grads.slots]
    assert len(names) == len(list(ad.parameters()))
    got = torch.cat([b for _, b in every.grads(x, t, cond, r)], 1)
    want = _reference_grads(ad, x, t, cond, r, names)
    assert got[:, : ad.unet.conv_in.weight.numel()].abs().sum() > 0  # the first layer too
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---- precision -----------------------------------------------------------------------------------

# Measured on this model (cosine to float32): float16 >= 0.9999, bfloat16 >= 0.997 for features
# without inversion; with CFG-7.5 inversion float16 0.9994, bfloat16 0.991.
TOL = {torch.float16: 0.999, torch.bfloat16: 0.99}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_execution_agrees_with_fp32(dtype):
    spec = FeatureSpec(loss="dps", inversion=False, timesteps=(99, 499))
    ref = tiny_adapter()
    low = tiny_adapter(dtype=dtype)
    assert next(low.unet.parameters()).dtype == dtype
    x, t, cond = _inputs(ref)
    assert torch.equal(low.prompt_ids(ref.prompt_of(cond)), cond)  # same prompts, same ids
    with torch.no_grad():
        e32, elow = ref(x, t, cond), low(x, t, cond)
    assert elow.dtype == torch.float32
    assert (elow - e32).abs().max() < (0.02 if dtype == torch.float16 else 0.1) * e32.abs().max()
    x0 = ref.encode_images(torch.rand(3, 3, 16, 16) * 2 - 1)
    phi32, _ = make_featurizer(ref, spec, ProjectionSpec(k=256))(x0, cond)
    philow, _ = make_featurizer(low, spec, ProjectionSpec(k=256))(x0, cond)
    cos = torch.nn.functional.cosine_similarity(philow, phi32)
    assert philow.dtype == torch.float32 and (cos > TOL[dtype]).all(), cos


def test_fp16_loss_scaling_unscaled_and_backs_off():
    ad = tiny_adapter(dtype=torch.float16)
    assert ad.grad_scale == 2.0**10
    fz = make_featurizer(ad, FeatureSpec(timesteps=(99,)), ProjectionSpec(k=16))
    x, t, cond = _inputs(ad)
    r = torch.randn_like(x)
    scaled = torch.cat([b for _, b in fz.grads(x, t, cond, r)], 1)
    ref = tiny_adapter()  # float32 oracle, same weights, same prompt ids ("" came first in ad)
    assert torch.equal(ref.prompt_ids(["", *ad.prompt_of(cond)])[1:], cond)
    want = _reference_grads(ref, x, t, cond, r, [s.name for s in fz.grads.slots])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(scaled, want) < 5e-3  # float16 rounding; the scale itself is removed
    ad.grad_scale = 2.0**40  # overflows float16: the featurizer backs off and still agrees
    backed = torch.cat([b for _, b in fz.grads(x, t, cond, r)], 1)
    assert ad.grad_scale < 2.0**40 and torch.isfinite(backed).all()
    assert rel(backed, want) < 5e-3


# ---- construction from a pipeline folder ---------------------------------------------------------


def test_from_pretrained_pipeline_folder(tmp_path):
    from diffusers import DDIMScheduler

    text_encoder, tok = tiny_clip(tmp_path)
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(
        text_encoder,
        tok,
        DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
        ),
    )
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["unet"][1] == (
        "UNet2DConditionModel"
    )
    direct = TextToImageAdapter.from_pipeline(pipe)
    loaded = TextToImageAdapter.from_pretrained(tmp_path / "pipe")
    assert loaded.latent and loaded.max_length == 8
    assert loaded.fingerprints() == direct.fingerprints()
    cond = loaded.encode_prompts(["a red triangle"])
    assert cond.shape == (1, 8, 12)
    torch.testing.assert_close(cond, direct.encode_prompts(["a red triangle"]))
    assert not torch.allclose(cond, loaded.encode_prompts(["a blue circle"]))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, torch.tensor([500]), cond), direct(x, torch.tensor([500]), cond)
        )
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        TextToImageAdapter.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
def test_generate_through_scheduler_api(name):
    import diffusers

    ad = tiny_adapter()
    sch = getattr(diffusers, name).from_config(ad.scheduler.config)
    a = ad.generate("a red triangle", guidance=3.0, steps=5, seed=7, n=2, scheduler=sch)
    b = ad.generate("a red triangle", guidance=3.0, steps=5, seed=7, n=2, scheduler=sch)
    c = ad.generate("a red triangle", guidance=3.0, steps=5, seed=8, n=2, scheduler=sch)
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)  # a query image is its (prompt, seed)
    pid = ad.prompt_ids(["a red triangle"])[0]
    emb = ad.encode_prompts(["a red triangle"])[0]
    for prompt in (pid, emb):  # a prompt as text, id or embedding is the same prompt
        torch.testing.assert_close(
            ad.generate(prompt, guidance=3.0, steps=5, seed=7, n=2, scheduler=sch), a
        )
