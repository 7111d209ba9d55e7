"""SDXL behind the model interface (models/sdxl.py): eps against diffusers' own SDXL conditioning,
the condition-path rule (attn2 + add_embedding), and `ctrak featurize|query|attribute
--pipeline` end to end on a tiny random SDXL folder."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import captioned_images, run, tiny_sdxl_pipeline

from ctrak_fast.api import Attributor
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.models.pipeline_adapter import load_pipeline_adapter
from ctrak_fast.models.registry import kind_of, kind_of_pipeline
from ctrak_fast.models.sdxl import SDXL_PARAM_FILTER, SDXLAdapter, SDXLKind

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(the pipeline object, its saved folder)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe"


def test_eps_matches_diffusers_sdxl_conditioning(sdxl):
    """The adapter's eps equals the UNet called as StableDiffusionXLPipeline calls it: its own
    encode_prompt (both encoders, pooled) and add_time_ids (size, no crop, size)."""
    pipe, folder = sdxl
    ad = load_pipeline_adapter(folder)
    assert isinstance(ad, SDXLAdapter) and kind_of_pipeline(pipe) is SDXLKind
    assert isinstance(kind_of(ad), SDXLKind)
    prompt = "a red triangle in the style of picasso"
    emb, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([321])
    added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        got = ad(x, t, ad.prompt_ids([prompt]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The unconditional input is zeros (force_zeros_for_empty_prompt), as diffusers' CFG uses.
    hidden, pooled0, ids0 = ad.layout.unpack(ad.encode_prompts([""]))
    assert not hidden.any() and not pooled0.any() and ids0.tolist() == time_ids.tolist()
    # The Attributor takes the pipeline object too (it failed inside diffusers before: no
    # added_cond_kwargs), with the condition path as concept-trak-cond's parameters.
    att = Attributor.from_pipeline(pipe, "concept-trak-cond", projection=ProjectionSpec(k=16))
    assert isinstance(att.model, SDXLAdapter)
    feats = att.image_query(torch.rand(1, 3, 16, 16) * 2 - 1, [prompt]).features
    assert feats.shape == (1, 16) and torch.isfinite(feats).all() and feats.abs().sum() > 0


def _text_inputs(unet):
    """The modules the prompt reaches first: attn2's to_k / to_v (the hidden states) and
    add_embedding (the pooled embedding with the time ids)."""
    names = [n for n, _ in unet.named_modules() if re.search(r"attn2\.to_[kv]$", n)]
    return [*names, "add_embedding"]


def test_condition_path_rule(sdxl):
    """The condition enters the UNet only through the filter's modules: with their text inputs
    held at prompt A's, eps under prompt B is eps under A, exactly; holding only the
    cross-attention inputs is not enough (the pooled text reaches add_embedding)."""
    _, folder = sdxl
    ad = load_pipeline_adapter(folder)
    selected = {n for n, _ in ad.named_parameters() if re.search(SDXL_PARAM_FILTER, n)}
    assert selected and all(".attn2." in n or ".add_embedding." in n for n in selected)
    assert any(".add_embedding." in n for n in selected)
    assert ad.condition_param_filter == SDXL_PARAM_FILTER
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    a, b = ad.prompt_ids(["a red triangle"]), ad.prompt_ids(["a blue circle drawn in pencil"])
    modules = dict(ad.unet.named_modules())

    def eps_holding(names, source):
        held, hooks = {}, []
        for n in names:  # record A's inputs, then replay them under B
            hooks.append(
                modules[n].register_forward_pre_hook(lambda m, i, n=n: held.setdefault(n, i))
            )
        with torch.no_grad():
            ad(x, t, source)
            for h in hooks:
                h.remove()
            hooks = [modules[n].register_forward_pre_hook(lambda m, i, n=n: held[n]) for n in names]
            out = ad(x, t, b)
        for h in hooks:
            h.remove()
        return out

    with torch.no_grad():
        eps_a, eps_b = ad(x, t, a), ad(x, t, b)
    assert not torch.allclose(eps_a, eps_b)
    torch.testing.assert_close(eps_holding(_text_inputs(ad.unet), a), eps_a, rtol=0, atol=0)
    cross_only = eps_holding(_text_inputs(ad.unet)[:-1], a)
    assert not torch.allclose(cross_only, eps_a, atol=1e-6)


def test_cli_end_to_end(sdxl, tmp_path):
    """featurize (concept-trak-cond: attn2 + add_embedding), query, attribute with a lambda
    sweep and exported scores, on the SDXL folder."""
    _, folder = sdxl
    words = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]
    images = captioned_images(tmp_path / "images", [words[i % 4] for i in range(6)])
    fast = ["--k", "32", "--timesteps", "99,499", "--inversion-steps", "10"]
    store, q = tmp_path / "store", tmp_path / "q.safetensors"
    rc, out, err = run(["featurize", "--pipeline", folder, "--images", images, "--out", store,
                        "--batch-size", "3", *fast])  # fmt: skip
    assert rc == 0, err
    assert "6 rows x k=32 (concept-trak-cond)" in out
    meta = json.loads((store / "manifest.json").read_text())["meta"]
    assert meta["method"] == "concept-trak-cond"
    assert meta["feature"]["param_filter"] == "@condition"
    assert (
        meta["text2image"]["text_encoder_2"] and meta["text2image"]["force_zeros_for_empty_prompt"]
    )
    rc, out, err = run(["query", "--pipeline", folder, "--prompt", "a red triangle", "--concept",
                        "red", "--n-draws", "1", "--steps", "3", "--out", q, *fast])  # fmt: skip
    assert rc == 0, err
    assert "c-: ['a triangle']" in out
    res, scores = tmp_path / "res.json", tmp_path / "scores.safetensors"
    rc, out, err = run(["attribute", "--store", store, "--query", q, "--k", "3", "--lambda-r",
                        "0.1,1", "--out", res, "--export-scores", scores])  # fmt: skip
    assert rc == 0, err
    top = json.loads(res.read_text())["top"]
    assert [r["label"] for r in top] == ["-red @ lambda_r=0.1", "-red @ lambda_r=1"]
    assert all(len(set(r["ids"])) == 3 for r in top) and scores.is_file()
