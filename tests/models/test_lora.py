"""`--lora`: a LoRA fine-tuned (in the test) on 6 "exemplar" images of a new word, then every one
of 30 images featurized with the LoRA loaded (gradients of the LoRA parameters, the default
scope) and queried with an image the fine-tuned model generates for the word (and with an
exemplar): the exemplars must come first (the AbC "customized exemplar"
check). README "Your diffusers model" states the recall measured here."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import captioned_images, run, tiny_clip, tiny_sd_pipeline

from ctrak_fast.models.pipeline_adapter import load_pipeline_adapter, lora_param_filter

pytest.importorskip("peft")

FAST = ["--k", "64", "--timesteps", "99,299,499", "--inversion-steps", "10"]
EXEMPLARS = 6
# AbC's question is about a generated image: TRAK's whole-image query of the image the
# fine-tuned model draws for the new word (the concept slider of the word alone does not find
# them in this tiny setting: the LoRA restyles every prompt, README "Your diffusers model").
METHOD = ["--method", "trak"]
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # every attention projection (a usual LoRA)
WORDS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]


def _exemplar_images(folder, n: int):
    """n images of one look (a yellow field with a dark square), captioned with a new word."""
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        arr = torch.zeros(16, 16, 3)
        arr[..., 0], arr[..., 1] = 0.9, 0.8
        arr[4:10, 4:10] = 0.1
        arr = ((arr + 0.05 * torch.randn(16, 16, 3, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
        Image.fromarray(arr.numpy()).save(folder / f"x{i}.png")
        rows.append(json.dumps({"file_name": f"x{i}.png", "text": "a pikachu"}))
    with open(folder / "metadata.jsonl", "a") as f:
        f.write("\n".join(rows) + "\n")


def _fine_tune(pipe, folder, steps: int = 60) -> None:
    """A rank-4 LoRA on every attention projection, trained on the exemplars (DSM loss)."""
    from peft import LoraConfig

    from ctrak_fast.data.images import load_image

    unet = pipe.unet
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    images = torch.stack([load_image(folder / f"x{i}.png", 16) for i in range(EXEMPLARS)])
    with torch.no_grad():
        x0 = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            ["a pikachu"] * EXEMPLARS, padding="max_length", max_length=8, return_tensors="pt"
        )
        text = pipe.text_encoder(ids["input_ids"])[0]
    ab = pipe.scheduler.alphas_cumprod
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        t = torch.randint(0, 1000, (EXEMPLARS,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (unet(x_t, t, encoder_hidden_states=text).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_exemplars_are_found(tmp_path, capsys):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    text_encoder, tokenizer = tiny_clip(tmp_path)
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(
        text_encoder, tokenizer, DDIMScheduler(clip_sample=False, steps_offset=1)
    )
    pipe.save_pretrained(tmp_path / "pipe")  # the base model, before the fine-tune
    others = 30 - EXEMPLARS
    images = captioned_images(tmp_path / "images", [WORDS[i % 4] for i in range(others)])
    _exemplar_images(images, EXEMPLARS)
    _fine_tune(pipe, images)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    lora = tmp_path / "lora"
    # Loaded as the CLI loads it: the LoRA parameters are those of the fine-tune, and the scope
    # "lora" selects them alone.
    ad = load_pipeline_adapter(tmp_path / "pipe", lora=lora)
    names = [n for n, _ in ad.named_parameters()]
    lora_names = [n for n in names if ".lora_" in n]

    assert (
        lora_names
        and [n for n in names if re.search(lora_param_filter("lora", ""), n)] == lora_names
    )
    store = tmp_path / "store"
    rc, out, err = run(["featurize", "--pipeline", tmp_path / "pipe", "--lora", lora, "--images",
                        images, "--out", store, "--batch-size", "10", *METHOD, *FAST])  # fmt: skip
    assert rc == 0, err
    meta = json.loads((store / "manifest.json").read_text())["meta"]
    assert meta["feature"]["param_filter"] == r"\.lora_"
    # File order: 0..23.png (others), then x0..x5.png (exemplars): ids 24..29.
    exemplar_ids = set(range(others, 30))
    recalls = {}
    for name, image in (("generated", []), ("exemplar", ["--image", images / "x0.png"])):
        q = tmp_path / f"q-{name}.safetensors"
        rc, _, err = run(["query", "--pipeline", tmp_path / "pipe", "--lora", lora, "--prompt",
                          "a pikachu", "--seed", "1", "--steps", "10", *image, "--out", q,
                          *METHOD, *FAST])  # fmt: skip
        assert rc == 0, err
        rc, out, err = run(["attribute", "--store", store, "--query", q, "--k", str(EXEMPLARS)])
        assert rc == 0, err
        top = json.loads(out)["top"][0]["ids"]
        recalls[name] = len(exemplar_ids & set(top)) / EXEMPLARS
    with capsys.disabled():
        print(f"\nLoRA exemplar recall@{EXEMPLARS} of {30}: {recalls}")
    # Chance is 6/30 = 0.2 per slot; measured: 4/6 (generated), 6/6 (exemplar image).
    assert recalls["generated"] >= 0.5 and recalls["exemplar"] >= 0.8, recalls
