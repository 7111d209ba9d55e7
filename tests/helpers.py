"""Builders the test files share (a test file never imports another): tiny text-to-image
components (no downloads), the small featurizer, the fuzz corpus's runner and snapshots, and the
top-k search's data and tolerance check. Fixtures are conftest.py's."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import weakref
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

from ctrak_fast.cli.app import main
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.search import fp32_error_bound, topk_reference
from ctrak_fast.engine.search_inputs import TopK
from ctrak_fast.engine.store import FeatureStore
from ctrak_fast.method.diffusion import NoiseSchedule
from ctrak_fast.method.featurize import FeatureSpec, Featurizer
from ctrak_fast.models.text2image import TextToImageAdapter

# ---- tiny text-to-image components -------------------------------------------------------------

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=4,
    norm_num_groups=4,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "triangle", "circle"]
VOCAB += ["in", "the", "style", "of", "picasso", "pikachu", "drawn", "pencil"]


def perturb(module: nn.Module, std: float = 0.05, seed: int = 1) -> nn.Module:
    """Random weights everywhere: diffusers zero-inits output layers, which hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return perturb(
        UNet2DConditionModel(**{**UNET, "in_channels": in_channels, "out_channels": in_channels})
    )


def tiny_vae(shift_factor=None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return perturb(AutoencoderKL(**VAE, scaling_factor=0.5, shift_factor=shift_factor), 0.02, 2)


class WordTokenizer:
    """Whitespace tokenizer over VOCAB with the transformers call convention."""

    model_max_length = 8

    def __call__(self, prompts, padding, max_length, truncation, return_tensors):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            toks = [2] + [VOCAB.index(w) if w in VOCAB else 1 for w in p.lower().split()] + [3]
            toks = toks[:max_length]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TinyTextEncoder(nn.Module):
    """Embedding + one attention layer; returns (hidden states [B, L, 12],) like transformers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(len(VOCAB), 12)
        self.pos = nn.Parameter(torch.randn(8, 12) * 0.1)
        self.layer = nn.TransformerEncoderLayer(12, 2, 24, dropout=0.0, batch_first=True)

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        return (self.layer(h, src_key_padding_mask=pad),)


def tiny_adapter(latent: bool = True, dtype=None, prediction_type: str = "epsilon", **kw):
    """Latent (VAE 16x16 pixels -> 4x8x8) or pixel (3x8x8) adapter with random weights."""
    from diffusers import DDPMScheduler

    return TextToImageAdapter(
        tiny_unet(4 if latent else 3),
        DDPMScheduler(prediction_type=prediction_type, clip_sample=not latent),
        vae=tiny_vae() if latent else None,
        text_encoder=TinyTextEncoder(),
        tokenizer=WordTokenizer(),
        dtype=dtype,
        **kw,
    )


def tiny_sd_pipeline(text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline of the tiny VAE and UNet; the text encoder is built by the
    callable ``text_encoder`` after the VAE (the order in which the weights are drawn)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer,
        unet=tiny_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_clip(folder: Path):
    """(a factory of a one-layer CLIPTextModel over VOCAB, a BertTokenizer over VOCAB), the
    vocabulary written to folder/vocab.txt; skips the test without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    tokenizer = transformers.BertTokenizer(str(vocab), model_max_length=8)
    return (lambda: transformers.CLIPTextModel(cfg).eval()), tokenizer


def tiny_sdxl_pipeline(folder: Path, scheduler=None):
    """A StableDiffusionXLPipeline of random tiny parts: a text_time UNet (8x8 latents), the tiny
    VAE, a 2-layer CLIPTextModel (hidden 12) and CLIPTextModelWithProjection (hidden 12, pooled
    8), BertTokenizers over VOCAB (written to folder/vocab.txt). Hidden states: 24 wide."""
    import pytest

    transformers = pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    text = dict(vocab_size=len(VOCAB), intermediate_size=24, num_hidden_layers=2)
    # pooled output at [SEP] (VOCAB's id 3), which attends to the whole prompt
    text.update(num_attention_heads=2, max_position_embeddings=8, eos_token_id=3, bos_token_id=2)
    torch.manual_seed(0)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=12, **text))
    te2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(hidden_size=12, projection_dim=8, **text)
    )
    unet = UNet2DConditionModel(
        **{**UNET, "cross_attention_dim": 24},
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=te1.eval(),
        text_encoder_2=te2.eval(),
        tokenizer=transformers.BertTokenizer(str(vocab), model_max_length=8),
        tokenizer_2=transformers.BertTokenizer(str(vocab), model_max_length=8),
        unet=perturb(unet),
        scheduler=scheduler or DDIMScheduler(clip_sample=False, steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )


def captioned_images(folder: Path, captions: list[str], seed: int = 0, size: int = 16) -> Path:
    """A folder of random RGB PNGs 0.png, 1.png, ... with metadata.jsonl captions."""
    import json

    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, text in enumerate(captions):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


# ---- the small featurizer (FactorUNet-like models of conftest.py) ------------------------------

NULL = torch.tensor([3, 2])
TS = (99, 499)  # two timesteps keep the tests fast; the formulas do not depend on how many


def small_featurizer(model, **kw):
    spec = FeatureSpec(**{"timesteps": TS, "inversion_steps": 10, **kw})
    return Featurizer(
        model,
        NoiseSchedule(),
        spec,
        ProjectionSpec(k=16, seed=3),
        NULL,
        projector_backend="reference",
    )


# ---- the CLI fuzz corpus ------------------------------------------------------------------------

FUZZ = settings(
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under root: a file's bytes, a symlink's target, None for a folder."""
    out: dict[str, bytes | str | None] = {}
    for p in root.rglob("*"):
        name = str(p.relative_to(root))
        if p.is_symlink():
            out[name] = os.readlink(p)
        elif p.is_file():
            out[name] = p.read_bytes()
        else:
            out[name] = None
    return out


def check_contract(rc: int, err: str, before: dict, after: dict, outputs=()) -> bool:
    """Snapshots before / after (see snapshot): every file that existed before keeps its bytes,
    whatever the outcome (but the command's `outputs`, relative names, if it worked). True if
    the command worked; else assert the error contract (one line, exit 1, or 2 for a usage error
    the parser refuses, nothing new)."""
    mine = set(outputs) if rc == 0 else set()
    changed = sorted(p for p in before if p not in mine and after.get(p, "<gone>") != before[p])
    assert changed == [], f"changed or removed existing files: {changed}"
    if rc == 0:
        return True
    lines = err.strip().splitlines()
    assert rc in (1, 2), (rc, err)
    assert len(lines) == 1 and lines[0].startswith("ctrak: error: "), err
    assert set(after) <= set(before), f"left new files: {sorted(set(after) - set(before))}"
    return False


TEXT = st.one_of(
    st.integers(-3, 10**4).map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "",
            "1,2",
            "0.5, 2",
            "1,,2",
            "1,1",
            "a",
            "(",
            "[a-",
            "@x",
            "1e400",
            "nan",
            "-inf",
            "0x10",
            " 3 ",
            "5000",
            "-0",
            "1_0",
            "0.5",
            "2,1,0",
        ]
    ),
    st.text(max_size=6),
)


# ---- top-k search --------------------------------------------------------------------------------


class FakeStore:
    """The FeatureStore contract topk relies on: iter_shards(), n_rows, k, shards."""

    def __init__(self, features: torch.Tensor, ids: torch.Tensor, sizes: list[int]):
        assert sum(sizes) == features.shape[0]
        self._parts = list(zip(features.split(sizes), ids.split(sizes), strict=True))
        self.n_rows, self.k = features.shape
        self.shards = [{"rows": s} for s in sizes]

    def iter_shards(self):
        yield from self._parts


def make_data(n, dim, m, dtype, kind="random", seed=0):
    """-> features [n, dim] dtype, ids int64 [n] (distinct, shuffled, sparse), u [m, dim]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        feats = torch.randn(n, dim, generator=g)
        u = torch.randn(m, dim, generator=g)
    elif kind == "duplicates":  # many identical rows: exact ties whatever the arithmetic
        base = torch.randn(23, dim, generator=g)
        feats = base[torch.randint(0, 23, (n,), generator=g)]
        u = torch.randn(m, dim, generator=g)
    elif kind == "integers":  # small integers: every score exact in fp32, ties across rows
        feats = torch.randint(-2, 3, (n, dim), generator=g).float()
        u = torch.randint(-2, 3, (m, dim), generator=g).float()
    else:
        raise ValueError(kind)
    ids = torch.randperm(3 * n, generator=g)[:n].to(torch.int64) + 10**6
    return feats.to(dtype), ids, u


def check(res: TopK, feats, ids, u, k, tails="both", exact_ids=False, engine="fma"):
    """Assert the tolerance policy of the module docstring for every requested tail."""
    ref = topk_reference(feats, ids, u, k, tails)
    exact = (feats.double() @ u.double().T).T  # [m, n]
    bound = fp32_error_bound(feats, u, engine)[:, None] + 1e-12  # [m, 1]
    order = torch.argsort(ids)
    for tail in ("top", "bottom"):
        values = getattr(res, f"{tail}_values")
        got = getattr(res, f"{tail}_ids")
        if tails not in (tail, "both"):
            assert values is None and got is None
            continue
        want = getattr(ref, f"{tail}_ids")
        assert values.shape == got.shape == (u.shape[0], k)
        assert values.dtype == torch.float32 and got.dtype == torch.int64
        assert not torch.isnan(values).any()
        # every id is a real row, once per query
        pos = order[torch.searchsorted(ids[order], got)]
        assert torch.equal(ids[pos], got)
        assert (got.sort(dim=1).values.diff(dim=1) != 0).all(), "duplicate ids"
        ex = exact.gather(1, pos)  # exact scores of the returned ids
        assert ((values.double() - ex).abs() <= bound).all(), "value off its exact score"
        ex_ref = exact.gather(1, order[torch.searchsorted(ids[order], want)])
        assert ((ex - ex_ref).abs() <= 2 * bound).all(), "rank-wise score differs"
        # ordered best first; equal values by ascending id
        step = values.diff(dim=1) if tail == "bottom" else -values.diff(dim=1)
        assert (step >= 0).all()
        assert ((step > 0) | (got.diff(dim=1) > 0)).all(), "tie not broken by smaller id"
        if exact_ids:
            assert torch.equal(got, want)


# ---- stores ------------------------------------------------------------------------------------


def write_store(
    path, features, ids, shard_rows: int, meta=None, dtype=None, sources=None
) -> FeatureStore:
    """A FeatureStore at ``path`` holding these rows (features [n, k], ids [n]), stored in
    ``dtype`` (default: the features' own); with ``sources`` (a sources record), its
    sources.json too."""
    from ctrak_fast.engine.store.sources import sources_meta, write_sources

    dtype = dtype or str(features.dtype).removeprefix("torch.")
    if sources is not None:
        meta = {**(meta or {}), "sources": sources_meta(sources)}
    store = FeatureStore.create(
        path, k=features.shape[1], dtype=dtype, shard_rows=shard_rows, meta=meta
    )
    with store.writer() as w:
        w.append(features, ids)
    if sources is not None:
        write_sources(path, sources)
    return store


def copy_store(root: Path, name: str) -> Path:
    """A fresh copy of root/store at root/name (replacing an older one)."""
    dst = root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(root / "store", dst)
    return dst


class LiveRows:
    """Counts the decoded training images alive: every tensor an ImageSequence hands out (a
    batch, or the whole set) counts until it is freed; `read`: images decoded in all."""

    def __init__(self) -> None:
        self.live = self.peak = self.read = 0

    @classmethod
    def counting(cls, monkeypatch) -> LiveRows:
        """A counter of every ImageSequence's rows (monkeypatched for the test)."""
        from ctrak_fast.data.image_sequence import ImageSequence

        live = cls()
        rows, whole = ImageSequence.__getitem__, ImageSequence.tensor
        monkeypatch.setattr(ImageSequence, "__getitem__", lambda s, r: live.track(rows(s, r)))
        monkeypatch.setattr(ImageSequence, "tensor", lambda s, b=64: live.track(whole(s, b)))
        return live

    def track(self, images: torch.Tensor) -> torch.Tensor:
        self.live += len(images)
        self.read += len(images)
        self.peak = max(self.peak, self.live)
        weakref.finalize(images, self._free, len(images))
        return images

    def _free(self, n: int) -> None:
        self.live -= n
